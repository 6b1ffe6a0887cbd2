"""Running an exported directory needs no torch and no transformers: `import hypermerge`,
``hm.OnnxModel`` on every task (embed, classify, generate, stream), ``hypermerge serve`` answering
each endpoint, and the CLI itself. Each runs in a subprocess where importing torch or transformers
fails (as in a serve-only install) and every attempt is logged; the log must stay empty. Commands
that do need torch say which extra to install, in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

import hypermerge as hm
from tests.helpers.common import subprocess_env
from tests.helpers.serving import Server

BLOCKER = textwrap.dedent('''\
    # sitecustomize: imports of torch and transformers fail, as where they are not installed
    import os
    import sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformers"):
                with open(os.environ["HM_BLOCKED_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
''')

TEXTS = ["a good film", "the plot never comes together , sadly ."]
PROMPTS = ["once upon a time", "the weather today"]


@pytest.fixture
def no_torch(tmp_path, monkeypatch) -> Path:
    """Subprocesses started from here cannot import torch or transformers; returns the attempts log."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked-imports.log"
    monkeypatch.setenv("PYTHONPATH", str(site))  # subprocess_env puts the checkout before it
    monkeypatch.setenv("HM_BLOCKED_LOG", str(log))
    return log


def _attempts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


RUN_EVERY_TASK = '''
import json, sys
import hypermerge
hypermerge.OnnxModel  # the public name, resolved lazily
exports, texts, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
out["embed"] = hypermerge.OnnxModel.load(exports["feature-extraction"], provider="cpu").embed(texts).tolist()
out["classify"] = hypermerge.OnnxModel.load(exports["sequence-classification"], provider="cpu").classify(texts)
lm = hypermerge.OnnxModel.load(exports["causal-lm"], provider="cpu")
out["generate"] = lm.generate(prompts, max_new_tokens=8)
out["stream"] = [step.text for step in lm.stream(prompts[0], 8)]
out["modules"] = sorted(name for name in sys.modules if name.partition(".")[0] in ("torch", "transformers"))
print(json.dumps(out))
'''


def test_onnx_model_runs_every_task_without_torch(exports, no_torch):
    done = _python(RUN_EVERY_TASK, json.dumps({k: str(v) for k, v in exports.items()}), json.dumps(TEXTS),
                   json.dumps(PROMPTS))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["modules"] == [] and _attempts(no_torch) == []
    # the same answers as this process gives, where torch and transformers are loaded
    np.testing.assert_array_equal(np.float32(out["embed"]),
                                  hm.OnnxModel.load(exports["feature-extraction"], provider="cpu").embed(TEXTS))
    assert out["classify"] == hm.OnnxModel.load(exports["sequence-classification"], provider="cpu").classify(TEXTS)
    lm = hm.OnnxModel.load(exports["causal-lm"], provider="cpu")
    assert out["generate"] == lm.generate(PROMPTS, max_new_tokens=8)
    assert "".join(out["stream"]) == out["generate"][0]


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_serve_answers_every_endpoint_without_torch(exports, no_torch):
    started = {task: Server(path, "-q") for task, path in exports.items()}
    try:
        servers = {task: server.wait_ready() for task, server in started.items()}
        embedded = _post(servers["feature-extraction"].url, "/v1/embeddings", {"input": TEXTS})
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 2, embedded.text
        classified = _post(servers["sequence-classification"].url, "/v1/classify", {"input": TEXTS})
        assert classified.status_code == 200, classified.text
        lm_url = servers["causal-lm"].url
        plain = _post(lm_url, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
        assert plain.status_code == 200, plain.text
        with httpx.stream("POST", f"{lm_url}/v1/completions", timeout=60,
                          json={"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True}) as sse:
            events = [line[len("data: "):] for line in sse.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert streamed == plain.json()["choices"][0]["text"]
    finally:
        logs = {task: server.stderr() for task, server in started.items()}
        # one SIGTERM each (terminate sends it and waits): a second one during shutdown may kill
        codes = {task: server.terminate() for task, server in started.items()}
    assert codes == dict.fromkeys(exports, 0), (codes, logs)
    assert _attempts(no_torch) == []


def test_cli_imports_without_torch_and_torch_commands_name_the_extra(tmp_path, no_torch):
    assert _python("import sys, hypermerge.cli, hypermerge.serve.app, hypermerge.serve.server; "
                   "assert not [m for m in sys.modules if m.startswith(('torch', 'transformers'))]").returncode == 0
    assert _attempts(no_torch) == []
    cli = [sys.executable, "-m", "hypermerge"]
    assert subprocess.run([*cli, "--help"], env=subprocess_env(), capture_output=True).returncode == 0
    assert _attempts(no_torch) == []
    for args, extra in ((["fold", "--adapter", str(tmp_path), "--out", str(tmp_path / "out")], "export"),
                        (["export", str(tmp_path), "--out", str(tmp_path / "out")], "export"),
                        (["train", str(tmp_path / "recipe.yaml")], "train")):
        done = subprocess.run([*cli, *args], env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert f"hypermerge {args[0]} needs torch" in done.stderr and f"hypermerge[{extra}]" in done.stderr
        assert not (tmp_path / "out").exists()
    done = _python("import hypermerge\ntry:\n    hypermerge.fold_checkpoint\nexcept hypermerge.HypermergeError as e:\n"
                   "    print(e)")
    assert "hypermerge.fold_checkpoint needs torch" in done.stdout and "hypermerge[export]" in done.stdout, done


PER_CALL_ADAPTER = '''
import sys
from hypermerge.errors import BackendUnavailableError
from hypermerge.runtime.adapter_scales import AdapterScalesCache, ScaleEntry, ScaleLayout

layout = ScaleLayout("adapter_scales", 6, (ScaleEntry("layer.weight", 0, 3, 3, 3, False),))
cache = AdapterScalesCache(layout)
assert cache.get(None).tolist() == [1.0] * 6  # the base model needs no adapter reader
try:
    cache.get(sys.argv[1])
except BackendUnavailableError as exc:
    print(exc)
'''


def test_a_per_call_adapter_without_torch_names_the_extra(tmp_path, no_torch):
    done = _python(PER_CALL_ADAPTER, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "reading a per-call adapter needs torch" in done.stdout and "hypermerge[export]" in done.stdout
