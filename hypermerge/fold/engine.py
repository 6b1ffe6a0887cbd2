"""The streaming fold engine: base checkpoint files + adapter checkpoint -> dense HF model directory.

No model code runs, and no shard is ever held whole in memory:

1. The base's safetensors headers are parsed (no tensor data) and the adapter's tensors are
   mapped onto base tensors by name; shapes are checked against the adapter's fingerprint and by
   running each method's fold once on zeros of the base's shape, so a mismatch is reported before
   any I/O (:mod:`.plan`).
2. The output layout is decided up front (the base's sharding, or ``max_shard_size``), so each
   output shard's header can be written first; every output tensor carries its typed operation
   (:mod:`.operations`).
3. Tensors are then produced one at a time in header order: a targeted weight is read (a plain
   positional read of its byte range), folded by its method's pure ``fold`` in float32, cast
   once to the output dtype, checked for NaN/Inf and written; an untouched tensor is copied
   byte for byte, file to file, in bounded chunks (:mod:`.shards`).

Peak memory is therefore about the largest folded tensor in float32 plus a couple of temporaries
plus the adapter, whatever the size of the model. The output is written into a temporary sibling
and renamed at the end, so a crash, a kill or an error leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.checkpoint import AdapterCheckpoint, read_adapter
from hypermerge.errors import ConfigError
from hypermerge.fold.base_check import BaseCheck, check_base, checkpoint_sampler

# (the imports marked noqa re-export the fold's steps from their own modules, for the old paths)
from hypermerge.fold.finite import all_finite, check_finite, check_finite_weights  # noqa: F401
from hypermerge.fold.hfdir import (
    DTYPES,
    INDEX_FILE,
    BaseCheckpoint,
    copy_model_files,
    open_base,
    update_config,
)
from hypermerge.fold.operations import fold_tensor  # noqa: F401
from hypermerge.fold.plan import FoldPlan, plan_fold  # noqa: F401
from hypermerge.fold.safetensors_io import parse_size
from hypermerge.fold.shards import OutputShard, layout_shards, write_shards
from hypermerge.fold.threads import FOLD_THREADS, torch_threads
from hypermerge.fold.verify import verify_fold

PROVENANCE_FILE = "hypermerge_fold.json"


@dataclasses.dataclass
class FoldResult:
    """What a fold wrote."""

    out: Path
    method: str
    folded: int  # number of weights changed
    replaced: int  # tensors trained in full, written as saved
    dtype: str
    seconds: float
    shards: int = 1
    bytes_written: int = 0  # tensor bytes, headers excluded
    verify: dict[str, Any] | None = None  # the --verify report, when asked for
    base_check: BaseCheck | None = None  # how the base given was compared with the adapter's record


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """``"auto"`` -> None (keep each tensor's dtype), else the torch dtype.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}", hint=f"use auto or one of {', '.join(DTYPES)}") from None


def fold_checkpoint(adapter: str | Path, out: str | Path, *, base: str | Path | None = None, dtype: str = "auto",
                    overwrite: bool = False, progress: bool = True, max_shard_size: str | int | None = None,
                    verify: bool = False, tolerance: float | None = None,
                    on_tensor: Callable[[str], None] | None = None, allow_other_base: bool = False) -> FoldResult:
    """Fold an adapter checkpoint (hypermerge or PEFT) into its base and write a HF model directory.

    Streams one tensor at a time; memory stays near the largest folded tensor in float32 plus
    the adapter, whatever the model's size (``verify`` aside, which loads both models).

    Args:
        adapter: the adapter directory (hypermerge checkpoint or PEFT LoRA/DoRA/AdaLoRA/IA³).
        out: the output directory (must not exist unless ``overwrite``).
        base: the base model directory; defaults to the one recorded in the adapter.
        dtype: ``auto`` (keep the base's) or float32 / float16 / bfloat16.
        overwrite: replace an existing ``out``.
        progress: show a progress bar (bytes).
        max_shard_size: largest output shard (bytes, or text such as ``"2GB"``); None keeps
            the base's sharding.
        verify: after writing, run the adapter model and the folded model on sample inputs and
            refuse (ParityError, no output left) if they differ by more than ``tolerance``.
        tolerance: the largest relative difference ``verify`` accepts (default by dtype).
        on_tensor: called with each tensor name once it is written.
        allow_other_base: fold even if the base's content differs from the adapter's record of
            its base (the difference is recorded in the provenance).

    Returns:
        A FoldResult describing what was written.

    Raises:
        CheckpointError: missing, truncated, pickle or non-safetensors files; NaN/Inf.
        AdapterMismatchError: the adapter was made for another base (names, shapes or content).
        ConfigError: bad options, unknown method, no base given or recorded.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        ParityError: ``verify`` found a difference above the tolerance.
        HypermergeError: a disk error while writing (out of space, file too large, permissions).
    """
    start = time.perf_counter()
    out_dtype, shard_limit = _check_options(dtype, max_shard_size, verify, tolerance)
    checkpoint = read_adapter(adapter)
    base = _base_dir(checkpoint, base)
    base_checkpoint = open_base(base)
    plan = plan_fold(checkpoint, base_checkpoint)
    base_check = check_base(checkpoint, base_checkpoint.path, checkpoint_sampler(base_checkpoint),
                            {t: b for b, t in plan.folds.items()}, allow_other_base=allow_other_base)
    shards = layout_shards(checkpoint, base_checkpoint, plan, out_dtype, shard_limit)
    total_bytes = sum(t.nbytes for shard in shards for t in shard.tensors)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _write_weights(checkpoint, base_checkpoint, shards, tmp, total_bytes, progress, on_tensor)
        _write_index(tmp, base_checkpoint, shards, shard_limit, total_bytes)
        _write_model_files(tmp, checkpoint, base_checkpoint, dtype if out_dtype is not None else None)
        result = FoldResult(Path(out), checkpoint.method.name, len(plan.folds),
                            len(plan.replacements) + len(plan.additions), dtype, 0.0, len(shards), total_bytes,
                            base_check=base_check)
        if verify:
            result.verify = verify_fold(checkpoint.path, base_checkpoint.path, tmp, dtype=out_dtype,
                                        tolerance=tolerance)
        result.seconds = time.perf_counter() - start
        (tmp / PROVENANCE_FILE).write_text(json.dumps(_provenance(adapter, base, checkpoint, result), indent=2) + "\n")
    return result


def _check_options(dtype: str, max_shard_size: str | int | None, verify: bool, tolerance: float | None
                   ) -> tuple[torch.dtype | None, int | None]:
    """The output dtype and shard limit, read from the options before anything else is read.

    Raises:
        ConfigError: an unknown dtype, an unreadable size, or a tolerance without ``verify``.
    """
    out_dtype = resolve_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    if tolerance is not None and not verify:
        raise ConfigError("--tolerance applies to --verify only", hint="add --verify, or drop --tolerance")
    return out_dtype, shard_limit


def _base_dir(checkpoint: AdapterCheckpoint, base: str | Path | None) -> str | Path:
    """The base model directory: the one given, else the one the adapter records.

    Raises:
        ConfigError: none given, and none (or no local directory) recorded.
    """
    if base is not None:
        return base
    if not checkpoint.base_model:
        raise ConfigError("the adapter records no base model", path=checkpoint.path,
                          hint="pass the base model directory with --base")
    if not Path(checkpoint.base_model).is_dir():
        raise ConfigError(f"the adapter's recorded base model {checkpoint.base_model!r} is not a local "
                          "directory", path=checkpoint.path, hint="pass the base model directory with --base")
    return checkpoint.base_model


def _write_weights(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, shards: list[OutputShard], tmp: Path,
                   total_bytes: int, progress: bool, on_tensor: Callable[[str], None] | None) -> None:
    """Every output shard, with a progress bar in bytes, on FOLD_THREADS torch threads."""
    metadata = base.headers[base.shards[0]].metadata or {"format": "pt"}
    with torch_threads(FOLD_THREADS), \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="fold", disable=not progress) as bar:
        write_shards(checkpoint, base, shards, tmp, metadata, bar.update, on_tensor)


def _write_index(tmp: Path, base: BaseCheckpoint, shards: list[OutputShard], shard_limit: int | None,
                 total_bytes: int) -> None:
    """``model.safetensors.index.json`` when there are several shards, or the base had an index and
    its sharding is kept (then the base's index is the template: its other metadata survives)."""
    if not (len(shards) > 1 or (shard_limit is None and base.index is not None)):
        return
    weight_map = {t.name: shard.name for shard in shards for t in shard.tensors}
    index = dict(base.index or {}) if shard_limit is None else {}
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_bytes}
    if "total_parameters" in index["metadata"]:
        index["metadata"]["total_parameters"] = sum(math.prod(t.shape) for s in shards for t in s.tensors)
    index["weight_map"] = dict(sorted(weight_map.items()))
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_model_files(tmp: Path, checkpoint: AdapterCheckpoint, base: BaseCheckpoint, dtype: str | None) -> None:
    """The base's config, tokenizer and other files, with the adapter's config changes (new
    labels) and the output ``dtype`` (None: unchanged)."""
    copy_model_files(base.path, tmp)
    config_updates = dict(checkpoint.config_overrides)
    if dtype is not None:
        config_updates["dtype"] = dtype
    update_config(tmp, config_updates)


def _provenance(adapter: str | Path, base: str | Path, checkpoint: AdapterCheckpoint, result: FoldResult) -> dict:
    """``hypermerge_fold.json``: what was folded into what, by which version, checked how."""
    return {
        "hypermerge_version": __version__,
        "adapter": str(Path(adapter).absolute()),
        "adapter_format": checkpoint.metadata.get("source", "hypermerge"),
        "adapter_sha256": checkpoint.content_sha256(),
        "base_check": result.base_check.to_dict(),
        "base_model": str(Path(base).absolute()),
        "method": checkpoint.method.name,
        "folded_weights": result.folded,
        "replaced_tensors": result.replaced,
        "dtype": result.dtype,
        "shards": result.shards,
        "verify": result.verify,
    }

