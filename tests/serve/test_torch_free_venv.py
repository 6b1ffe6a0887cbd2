"""`pip install "hypermerge[serve]"` in a clean virtualenv: no torch, no transformers, and
`hypermerge serve` from it answers embeddings (real all-MiniLM-L6-v2), classification (MiniLM with a
classification head) and completions, plain and streamed (a tiny Llama), on directories exported
by this (full) environment. Slow: it installs the serve extra from PyPI (pip's cache helps)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification

import hypermerge as hm
from tests.helpers.common import REPO_ROOT, minilm_dir, save_with_tokenizer

pytestmark = pytest.mark.slow

TEXTS = ["A gripping, beautifully acted film.", "The plot never comes together.", "short"]
PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """task -> a directory exported here, where torch is installed."""
    root = tmp_path_factory.mktemp("exports")
    classifier = root / "minilm-classifier-source"
    AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).save_pretrained(classifier)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, classifier / name)
    lm = save_with_tokenizer("llama", root / "llama-source")
    return {"feature-extraction": hm.export_model(minilm_dir(), root / "minilm", verify=False, progress=False).out,
            "sequence-classification": hm.export_model(classifier, root / "minilm-classifier", verify=False,
                                                       progress=False).out,
            "causal-lm": hm.export_model(lm, root / "llama", verify=False, progress=False).out}


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with hypermerge[serve] only, installed from a copy of this checkout."""
    root = tmp_path_factory.mktemp("serve-venv")
    source = root / "src"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hypermerge", source / "hypermerge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                           str(source / "constraints.txt"), f"{source}[serve]"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_serve_extra_installs_neither_torch_nor_transformers(serve_venv):
    done = subprocess.run([str(serve_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                          capture_output=True, text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(done.stdout)}
    assert {"hypermerge", "onnxruntime", "tokenizers", "fastapi", "uvicorn"} <= installed
    assert not installed & {"torch", "transformers", "accelerate", "onnx", "nvidia-cublas-cu12"}, installed


def _clean_env(venv: Path) -> dict[str, str]:
    """The serve-only venv's environment: its bin first, nothing of this checkout (no PYTHONPATH)."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home())}


class _Server:
    """``hypermerge serve`` run by the serve-only virtualenv's own entry point."""

    def __init__(self, venv: Path, export: Path, log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen([str(venv / "bin" / "hypermerge"), "serve", str(export), "--port", "0",
                                         "-q"], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=_clean_env(venv), cwd=log.parent)
        line = self.process.stdout.readline()
        assert "http://" in line, f"{line!r}: {log.read_text()}"
        self.url = "http://" + line.split("on http://", 1)[1].split()[0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"not ready: {log.read_text()}")

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


def test_serve_only_install_serves_every_task(serve_venv, exported, tmp_path):
    probe = subprocess.run([str(serve_venv / "bin" / "python"), "-c",
                            "import importlib.util as u, hypermerge; print(hypermerge.__file__, "
                            "u.find_spec('torch'), u.find_spec('transformers'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=_clean_env(serve_venv))
    assert str(serve_venv) in probe.stdout and probe.stdout.split()[1:] == ["None", "None"], probe.stdout
    servers = {task: _Server(serve_venv, path, tmp_path / f"{task}.log") for task, path in exported.items()}
    try:
        embedded = httpx.post(f"{servers['feature-extraction'].url}/v1/embeddings", json={"input": TEXTS}, timeout=60)
        classified = httpx.post(f"{servers['sequence-classification'].url}/v1/classify", json={"input": TEXTS},
                                timeout=60)
        lm_url = servers["causal-lm"].url
        plain = httpx.post(f"{lm_url}/v1/completions", timeout=60,
                           json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        with httpx.stream("POST", f"{lm_url}/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}) as sse:
            events = [line[len("data: "):] for line in sse.iter_lines() if line.startswith("data: ")]
    finally:
        codes = {task: server.stop() for task, server in servers.items()}
    assert codes == dict.fromkeys(exported, 0), codes
    # the answers are the full environment's hm.OnnxModel's
    assert embedded.status_code == 200, embedded.text
    served = np.float32([d["embedding"] for d in embedded.json()["data"]])
    reference = hm.OnnxModel.load(exported["feature-extraction"], provider="cpu")
    np.testing.assert_allclose(served, reference.embed(TEXTS), rtol=0, atol=1e-6)
    assert classified.status_code == 200, classified.text
    labels = [r["label"] for r in hm.OnnxModel.load(exported["sequence-classification"], provider="cpu")
              .classify(TEXTS)]
    assert [r["label"] for r in classified.json()["data"]] == labels
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["text"]
    assert text == hm.OnnxModel.load(exported["causal-lm"], provider="cpu").generate([PROMPT], 8)[0]
    assert events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text
