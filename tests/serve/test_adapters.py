"""One server, many adapters: ``hypermerge serve --adapter NAME=DIR`` on an export made with
``--adapter-inputs``; requests choose one with ``"adapter": NAME``. Real HTTP against a subprocess:
each adapter's answers equal ``hm.OnnxModel``'s with that adapter, the base stays the base, mixed
concurrent requests are never merged across adapters, unknown names and bad start-ups are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export.onnx_export import load_torch_model
from tests.helpers.common import TEST_CONFIGS, perturb_adapter, save_with_tokenizer
from tests.helpers.serving import Server

TEXTS = ["A gripping, beautifully acted film.", "short", "The plot never comes together and the jokes fall flat.",
         "Folding adapters into dense weights removes their runtime overhead."]
PROMPTS = ["the weather today is", "once upon a time"]


def make_adapter(method: str, source: Path, task: str, out: Path, seed: int) -> Path:
    """An adapter of ``method`` for ``source``, moved away from its initialisation as training would."""
    model = load_torch_model(source, task)
    hm.inject(model, TEST_CONFIGS[method]())
    perturb_adapter(model, seed)
    hm.save_adapter(model, out, base_model=source)
    return out


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """task -> (export with adapter inputs, {name: HyperAdapt adapter}, source), one per task."""
    root = tmp_path_factory.mktemp("serve-adapters")
    out = {}
    for task, arch in (("feature-extraction", "bert-encoder"), ("sequence-classification", "bert"),
                       ("causal-lm", "llama")):
        source = save_with_tokenizer(arch, root / f"{arch}-source")
        export = hm.export_model(source, root / f"{arch}-scaled", task=task, adapter_inputs=True, verify=False,
                                 progress=False).out
        adapters = {name: make_adapter("hyperadapt", source, task, root / f"{arch}-{name}", seed)
                    for seed, name in enumerate(("alpha", "beta"))}
        out[task] = (export, adapters, source)
    return out


@pytest.fixture(scope="module")
def embed_server(scaled):
    export, adapters, _ = scaled["feature-extraction"]
    server = Server(export, "-q", "--max-wait-ms", "20",
                    *(f"--adapter={name}={path}" for name, path in adapters.items())).wait_ready()
    yield server
    server.terminate()


def embeddings(url: str, texts, adapter: str | None = None) -> np.ndarray:
    body = {"input": texts} if adapter is None else {"input": texts, "adapter": adapter}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_each_adapter_equals_the_model_with_it_and_the_base_the_base(embed_server, scaled):
    export, adapters, _ = scaled["feature-extraction"]
    model = hm.OnnxModel.load(export, provider="cpu")
    base = embeddings(embed_server.url, TEXTS)
    np.testing.assert_array_equal(base, model.embed(TEXTS))
    np.testing.assert_array_equal(embeddings(embed_server.url, TEXTS, adapter=None), base)
    for name, path in adapters.items():
        got = embeddings(embed_server.url, TEXTS, name)
        np.testing.assert_array_equal(got, model.embed(TEXTS, adapter=path))
        assert np.abs(got - base).max() > 1e-3  # the adapter changes the answer


def test_concurrent_mixed_adapters_each_get_their_own(embed_server, scaled):
    """Requests of the base and two adapters at once (batching on, 20 ms wait): every answer equals
    its texts embedded alone with its own adapter, and batches did merge requests."""
    export, adapters, _ = scaled["feature-extraction"]
    model = hm.OnnxModel.load(export, provider="cpu")
    names = [None, "alpha", "beta"]
    expected = {name: {text: model.embed([text], adapter=None if name is None else adapters[name])[0]
                       for text in TEXTS} for name in names}
    requests = [(names[i % 3], [TEXTS[(i // 3) % len(TEXTS)]]) for i in range(90)]

    async def send_all():
        limits = httpx.Limits(max_connections=90)
        async with httpx.AsyncClient(base_url=embed_server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": texts, "adapter": name})
                                          for name, texts in requests))

    def batches() -> float:
        text = httpx.get(f"{embed_server.url}/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("hypermerge_batch_requests_count"))

    before = batches()
    responses = asyncio.run(send_all())
    for (name, texts), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        got = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(got, expected[name][texts[0]], atol=1e-6, err_msg=f"adapter {name}")
    assert batches() - before < len(requests)  # some requests shared a model run


def test_unknown_adapter_is_400_listing_the_known_ones(embed_server):
    for bad in ("gamma", "/etc", "../alpha"):
        response = httpx.post(f"{embed_server.url}/v1/embeddings", json={"input": "hi", "adapter": bad}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "adapter" and error["code"] == "unknown_adapter"
        assert "alpha, beta" in error["message"] and repr(bad) in error["message"]
    response = httpx.post(f"{embed_server.url}/v1/embeddings", json={"input": "hi", "adapter": ""}, timeout=60)
    assert response.status_code == 400


def test_models_and_health_list_the_adapters(embed_server):
    models = httpx.get(f"{embed_server.url}/v1/models", timeout=30).json()
    assert models["data"][0]["adapters"] == ["alpha", "beta"]
    assert httpx.get(f"{embed_server.url}/health", timeout=30).json()["adapters"] == ["alpha", "beta"]


def test_completions_take_an_adapter(scaled):
    export, adapters, _ = scaled["causal-lm"]
    model = hm.OnnxModel.load(export, provider="cpu")
    server = Server(export, "-q", "--adapter", f"alpha={adapters['alpha']}").wait_ready()
    try:
        for adapter in (None, "alpha"):
            body = {"prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "adapter": adapter}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            texts = [c["text"] for c in response.json()["choices"]]
            path = None if adapter is None else adapters[adapter]
            assert texts == [model.generate([p], max_new_tokens=6, adapter=path)[0] for p in PROMPTS]
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "adapter": "beta"}, timeout=60)
        assert response.status_code == 400 and "alpha" in response.json()["error"]["message"]
    finally:
        server.terminate()


def test_classify_takes_an_adapter(scaled):
    export, adapters, _ = scaled["sequence-classification"]
    model = hm.OnnxModel.load(export, provider="cpu")
    server = Server(export, "-q", *(f"--adapter={name}={path}" for name, path in adapters.items())).wait_ready()
    try:
        answers = {}
        for adapter in (None, "alpha", "beta"):
            response = httpx.post(f"{server.url}/v1/classify", json={"input": TEXTS, "adapter": adapter}, timeout=60)
            assert response.status_code == 200, response.text
            answers[adapter] = [{k: d[k] for k in ("label", "score", "scores")} for d in response.json()["data"]]
            assert answers[adapter] == model.classify(TEXTS, adapter=None if adapter is None else adapters[adapter])
        assert answers["alpha"] != answers[None] and answers["beta"] != answers["alpha"]
    finally:
        server.terminate()


def test_base_server_refuses_adapter_requests(embed_url):
    response = httpx.post(f"{embed_url}/v1/embeddings", json={"input": "hi", "adapter": "alpha"}, timeout=60)
    assert response.status_code == 400
    assert "serves no adapters" in response.json()["error"]["message"]


@pytest.mark.parametrize("case", ["no adapter inputs", "lora", "missing dir", "bad spec", "bad name"])
def test_adapter_start_up_errors_are_one_line(case, scaled, exports, tmp_path):
    export, adapters, source = scaled["feature-extraction"]
    args = {"no adapter inputs": [str(exports["feature-extraction"]), "--adapter", f"alpha={adapters['alpha']}"],
            "lora": [str(export), "--adapter", f"alpha={adapters['alpha']}", "--adapter",
                     f"low={make_adapter('lora', source, 'feature-extraction', tmp_path / 'lora', 0)}"],
            "missing dir": [str(export), "--adapter", f"gone={tmp_path / 'nope'}"],
            "bad spec": [str(export), "--adapter", str(adapters["alpha"])],
            "bad name": [str(export), "--adapter", f"a b={adapters['alpha']}"]}[case]
    result = CliRunner().invoke(cli, ["serve", *args, "--port", "0"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypermerge: error: "), result.output
    expected = {"no adapter inputs": "without --adapter-inputs", "lora": "--adapter low: a lora adapter",
                "missing dir": "--adapter gone:", "bad spec": "--adapter takes NAME=DIR",
                "bad name": "--adapter name 'a b'"}[case]
    assert expected in lines[0], lines[0]
