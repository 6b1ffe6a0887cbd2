"""API keys: Bearer auth on /v1/*, keys from options, the environment and files, 401s that reveal
nothing, /health open, /metrics behind a flag, keys never logged, the openai SDK as a client, and
one-line start-up errors and warnings."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.serve.app import ServeSettings
from hypermerge.serve.auth import KeyChecker, bearer_token, collect_api_keys, exposure_warning
from tests.helpers.serving import Server, ThreadServer, metric

KEY_OPTION, KEY_ENV_1, KEY_ENV_2, KEY_FILE = "sk-opt-0123456789", "sk-env-aaaa", "sk-env-bbbb", "sk-file-zzzz"
ALL_KEYS = (KEY_OPTION, KEY_ENV_1, KEY_ENV_2, KEY_FILE)
WRONG = "sk-wrong-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- keys ------------------------------------------------------------------------------------------

def test_keys_from_options_environment_and_files(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2026-12\n\n  {KEY_FILE}  \n{KEY_OPTION}\n")
    keys = collect_api_keys([KEY_OPTION], f" {KEY_ENV_1},{KEY_ENV_2} ,", [keys_file])
    assert keys == ALL_KEYS  # in order, the duplicate once
    assert collect_api_keys() == ()


def test_bad_key_sources_are_one_line_without_the_key(tmp_path):
    with pytest.raises(hm.ConfigError, match="cannot read the --api-key-file") as missing:
        collect_api_keys(files=[tmp_path / "absent"])
    assert str(tmp_path / "absent") in str(missing.value)
    empty = tmp_path / "empty"
    empty.write_text("# nothing but a comment\n\n")
    with pytest.raises(hm.ConfigError, match="holds no key"):
        collect_api_keys(files=[empty])
    with pytest.raises(hm.ConfigError, match="HYPERMERGE_API_KEY is set but holds no key"):
        collect_api_keys(env_value=" , ,")
    assert collect_api_keys(env_value="  ") == ()  # blank: unset
    with pytest.raises(hm.ConfigError, match="API key #2 has spaces") as spaced:
        ServeSettings(api_keys=["good-key", "secret with space"])
    assert "secret" not in str(spaced.value)


def test_settings_repr_hides_keys():
    assert KEY_OPTION not in repr(ServeSettings(api_keys=[KEY_OPTION]))


def test_key_checker_and_bearer_header():
    checker = KeyChecker([KEY_OPTION, KEY_FILE])
    assert checker.valid(KEY_FILE.encode()) and checker.valid(KEY_OPTION.encode())
    for wrong in (WRONG, KEY_OPTION[:-1], KEY_OPTION + "x", ""):
        assert not checker.valid(wrong.encode())
    assert not KeyChecker([])
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"Authorization", b"bearer  abc ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([]) is None


def test_exposure_warning_only_off_loopback_without_a_key():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert exposure_warning(host, ()) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example"):
        warning = exposure_warning(host, ())
        assert warning is not None and "\n" not in warning and host in warning and "--api-key" in warning
        assert exposure_warning(host, [KEY_OPTION]) is None


def test_serve_warns_once_on_a_public_host_without_a_key(exports, monkeypatch):
    """The warning comes from `serve` itself (uvicorn's loop replaced: nothing is served, and the
    socket is bound on loopback whatever the host says: the tests never listen beyond this machine)."""
    import uvicorn

    from hypermerge.serve import server as server_module

    real_bind = server_module.bind
    monkeypatch.setattr(server_module, "bind", lambda host, port: real_bind("127.0.0.1", port))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    serve = server_module.serve
    for keys, expected in (((), 1), ((KEY_OPTION,), 0)):
        warnings, announced = [], []
        serve(exports["feature-extraction"], ServeSettings(host="0.0.0.0", port=0, api_keys=keys),
              announce=announced.append, warn=warnings.append)
        assert len(warnings) == expected and len(announced) == 1
        assert KEY_OPTION not in announced[0]
        if keys:
            assert "1 API key" in announced[0]


@pytest.mark.parametrize("args, expected", [
    (["--max-queue", "0"], "--max-queue must be at least 1 (got 0)"),
    (["--request-timeout", "0"], "--request-timeout must be a positive number of seconds (got 0.0)"),
    (["--request-timeout", "nan"], "--request-timeout must be a positive number"),
    (["--api-key", "has a space"], "API key #1 has spaces"),
    (["--api-key", ""], "API key #1 is empty"),
    (["--api-key-file", "no-such-file"], "cannot read the --api-key-file"),
])
def test_new_flags_are_checked_at_start_up_in_one_line(exports, args, expected):
    result = CliRunner().invoke(cli, ["serve", str(exports["feature-extraction"]), "--port", "0", *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypermerge: error: ") and expected in lines[0], result.output
    assert "has a space" not in lines[0]  # the key itself is never echoed


# --- a server with keys from all three sources (the CLI path, access log on) -----------------------

@pytest.fixture(scope="module")
def keyed_server(exports, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# mounted secret\n{KEY_FILE}\n")
    server = Server(exports["feature-extraction"], "--api-key", KEY_OPTION, "--api-key-file", str(keys_file),
                    env={"HYPERMERGE_API_KEY": f"{KEY_ENV_1},{KEY_ENV_2}"}).wait_ready()
    try:
        yield server
    finally:
        server.terminate()


def test_every_key_is_accepted_and_others_get_401(keyed_server):
    url = keyed_server.url
    for key in ALL_KEYS:
        response = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, headers=bearer(key), timeout=60)
        assert response.status_code == 200, response.text
    assert httpx.get(f"{url}/v1/models", headers=bearer(KEY_ENV_2), timeout=30).status_code == 200
    cases = {"missing": {}, "wrong": bearer(WRONG), "not bearer": {"Authorization": f"Basic {KEY_OPTION}"},
             "empty": {"Authorization": "Bearer"}, "prefix of a key": bearer(KEY_OPTION[:-1])}
    for case, headers in cases.items():
        for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("POST", "/v1/nothing")):
            response = httpx.request(method, f"{url}{path}", json={"input": "hello"}, headers=headers, timeout=30)
            assert response.status_code == 401, (case, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
            assert not any(key[4:] in response.text for key in (*ALL_KEYS, WRONG)), (case, response.text)


def test_health_is_open_and_metrics_need_a_key(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", headers=bearer(WRONG), timeout=30).status_code == 401
    response = httpx.get(f"{url}/metrics", headers=bearer(KEY_FILE), timeout=30)
    assert response.status_code == 200
    assert metric(url, "hypermerge_requests_total", headers=bearer(KEY_FILE), endpoint="other", status="401") > 0
    assert not any(key in response.text for key in (*ALL_KEYS, WRONG))


def test_openai_sdk_with_a_valid_key_and_a_wrong_one(keyed_server, exports):
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY_ENV_1, max_retries=0)
    result = client.embeddings.create(model="served", input=["one text", "another"])
    model = hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")
    np.testing.assert_array_equal(np.array([d.embedding for d in result.data], dtype=np.float32),
                                  model.embed(["one text", "another"]))
    wrong = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.embeddings.create(model="served", input="one text")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


# --- generation with a key, streamed through the SDK; the open-metrics flag -----------------------

def test_openai_sdk_streams_completions_with_a_key(exports):
    model = hm.OnnxModel.load(exports["causal-lm"], provider="cpu")
    with ThreadServer(model, ServeSettings(api_keys=[KEY_OPTION], open_metrics=True)) as server:
        assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200  # --open-metrics
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"}, timeout=30).status_code == 401
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_OPTION, max_retries=0)
        stream = client.completions.create(model="served", prompt="once upon a time", max_tokens=8, temperature=0,
                                           stream=True)
        text = "".join(chunk.choices[0].text for chunk in stream)
        assert text == model.generate(["once upon a time"], max_new_tokens=8)[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=WRONG, max_retries=0).completions.create(
                model="served", prompt="a", max_tokens=2)


def test_keys_never_reach_the_log(keyed_server):
    """The access log is on (no -q): it shows the requests, never a key, valid or not. (Stops the
    module's server to read all it wrote: keep this test last.)"""
    for key in (KEY_OPTION, WRONG):
        httpx.post(f"{keyed_server.url}/v1/embeddings", json={"input": "x"}, headers=bearer(key), timeout=60)
    keyed_server.signal()
    log = keyed_server.process.stdout.read() + keyed_server.stderr()  # stdout: to the server's exit
    assert "/v1/embeddings" in log and " 401" in log  # the access log really is there
    assert not any(key in log for key in (*ALL_KEYS, WRONG))
    assert not any(base64.b64encode(key.encode()).decode() in log for key in ALL_KEYS)
