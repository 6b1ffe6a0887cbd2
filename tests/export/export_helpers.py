"""Fixtures for the export tests: tiny random models (some with MiniLM's real tokenizer, so the
text paths run) exported once per module; latency kept short (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from common import minilm_dir, save_with_tokenizer  # noqa: F401 - imported by the test modules from here

FAST = dict(batch=2, seq=8, iters=3, progress=False)


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()
