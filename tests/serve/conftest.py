"""Fixtures for the serving tests: tiny models with MiniLM's real tokenizer, exported once per
session (one per task), and `hypermerge serve` started in a subprocess on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import pytest

import hypermerge as hm
from tests.helpers.common import save_with_tokenizer
from tests.helpers.serving import Server

TASK_ARCH = {"feature-extraction": "bert-encoder", "sequence-classification": "bert", "causal-lm": "llama"}


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    """task -> an exported tiny model (with MiniLM's tokenizer)."""
    root = tmp_path_factory.mktemp("serve-exports")
    out = {}
    for task, arch in TASK_ARCH.items():
        source = save_with_tokenizer(arch, root / f"{arch}-source")
        out[task] = hm.export_model(source, root / arch, task=task, verify=False, progress=False).out
    return out


@pytest.fixture(scope="session")
def servers(exports):
    """task -> a running server (default options; started together, stopped at the end)."""
    started = {task: Server(path, "-q") for task, path in exports.items()}
    try:
        yield {task: server.wait_ready() for task, server in started.items()}
    finally:
        for server in started.values():  # all at once: each takes a moment to shut down
            server.signal()
        for server in started.values():
            server.terminate()


@pytest.fixture(scope="session")
def embed_url(servers) -> str:
    return servers["feature-extraction"].url


@pytest.fixture(scope="session")
def classify_url(servers) -> str:
    return servers["sequence-classification"].url


@pytest.fixture(scope="session")
def lm_url(servers) -> str:
    return servers["causal-lm"].url
