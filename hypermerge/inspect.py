"""A summary of an adapter checkpoint, for ``hypermerge inspect``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hypermerge.adapters.checkpoint import read_adapter
from hypermerge.errors import HypermergeError
from hypermerge.fold.engine import plan_fold
from hypermerge.fold.hfdir import open_base


def inspect_adapter(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Describe an adapter: method, config, targets, trainable values and their ratio to the base.

    Args:
        path: the adapter checkpoint directory.
        base: the base model directory (defaults to the recorded one; skipped if absent).

    Raises:
        HypermergeError: the adapter is damaged, or does not fit the base found (as ``fold`` would refuse it).
    """
    checkpoint = read_adapter(path)
    trainable = checkpoint.trainable_parameters()
    summary: dict[str, Any] = {
        "path": str(checkpoint.path),
        "method": checkpoint.method.name,
        "config": checkpoint.config.to_dict(),
        "base_model": checkpoint.base_model,
        "targets": len(checkpoint.targets),
        "target_suffixes": sorted({t.removesuffix(".weight").rsplit(".", 1)[-1] for t in checkpoint.targets}),
        "trainable_parameters": trainable,
    }
    summary["base_content"] = _base_content(checkpoint)
    if checkpoint.rank_pattern:
        summary["rank_pattern"] = checkpoint.rank_pattern
    base = base or checkpoint.base_model
    if base and Path(base).is_dir():
        try:
            base_checkpoint = open_base(base)
        except HypermergeError:
            base_checkpoint = None
        if base_checkpoint is not None:
            # A PEFT adapter records no shapes of its own: only the base can tell that a tensor was
            # cut or grown, and inspect must not describe as sound what fold would refuse.
            plan_fold(checkpoint, base_checkpoint)
            base_params = sum(math.prod(shape) for shape in base_checkpoint.shapes.values())
            summary["base_parameters"] = base_params
            summary["trainable_ratio"] = trainable / base_params if base_params else None
    return summary


def _base_content(checkpoint) -> str:
    """What fold and patch can check about the base, in one sentence."""
    digest = checkpoint.base_digest
    if digest is not None:
        return (f"recorded: {digest.model_type or 'unknown model type'}, {len(digest.weights)} weights sampled "
                f"(sha256 {digest.sha256[:16]}); fold and patch refuse another base")
    if checkpoint.metadata.get("source") == "peft":
        return "not recorded (PEFT adapters record no base content): fold and patch cannot check the base"
    return "not recorded (saved before base digests): fold and patch check names and shapes only"
