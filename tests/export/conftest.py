"""Fixtures for the export tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.common import minilm_dir


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()
