"""Fixtures for the patch and adapter-inputs tests: tiny bases exported once per session (parity
off: the export tests check it) and adapters of every registered method made on first use."""

from __future__ import annotations

from pathlib import Path

import pytest

import hypermerge as hm
from tests.helpers.patch import ARCHS, make_adapter, save_base


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """arch -> (base dir, export dir): one plain export per tiny architecture."""
    root = tmp_path_factory.mktemp("patch-bases")
    out = {}
    for arch in ARCHS:
        base = save_base(arch, root / arch / "base")
        hm.export_model(base, root / arch / "onnx", verify=False, progress=False)
        out[arch] = (base, root / arch / "onnx")
    return out


@pytest.fixture(scope="session")
def adapters(exported, tmp_path_factory):
    """(arch, method) -> adapter dir, made on first use."""
    root = tmp_path_factory.mktemp("patch-adapters")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, method: str) -> Path:
        if (arch, method) not in cache:
            cache[arch, method] = make_adapter(method, arch, exported[arch][0], root / f"{arch}-{method}")
        return cache[arch, method]

    return get
