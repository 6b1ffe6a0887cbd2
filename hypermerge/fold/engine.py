"""The fold engine: base checkpoint files + adapter checkpoint -> dense HF model directory.

No model code runs: adapter tensors are mapped onto base tensors by name, each targeted
weight goes through its method's pure ``fold`` in float32 and is cast once to the output dtype.
Untouched tensors are copied as they are. The output is written into a temporary sibling and
renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.base import AdapterMethod
from hypermerge.adapters.checkpoint import AdapterCheckpoint, check_fingerprint, read_adapter
from hypermerge.adapters.targets import match_suffix
from hypermerge.errors import AdapterMismatchError, CheckpointError, ConfigError
from hypermerge.fold.hfdir import (
    DTYPES,
    INDEX_FILE,
    BaseCheckpoint,
    copy_model_files,
    open_base,
    update_config,
)

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


@dataclasses.dataclass
class FoldPlan:
    """For every base tensor name, how to produce its output."""

    folds: dict[str, str]  # base weight name -> adapter target name
    bias_folds: dict[str, str]  # base bias name -> adapter target name (methods that scale biases)
    replacements: dict[str, str]  # base tensor name -> name in adapter's full tensors
    additions: dict[str, str]  # new tensor name in output -> name in adapter's full tensors


def plan_fold(adapter: AdapterCheckpoint, base: BaseCheckpoint) -> FoldPlan:
    """Map the adapter's tensors onto the base's and check shapes against the fingerprint.

    Raises:
        AdapterMismatchError: a target is missing from the base, or a shape differs.
    """
    names = list(base.shapes)
    folds, missing = {}, []
    for target in adapter.targets:
        match = match_suffix(target, names)
        if match is None:
            missing.append(target)
        else:
            folds[match] = target
    if missing:
        raise AdapterMismatchError(
            f"{len(missing)} weight(s) the adapter targets are not in the base checkpoint (first: {missing[0]})",
            path=base.path, hint="fold onto the base model the adapter was trained on (--base)",
        )
    check_fingerprint(adapter, base.shapes, {t: b for b, t in folds.items()}, where="the base checkpoint")
    check_finite(adapter)
    bias_folds = {}
    if adapter.method.fold_bias is not AdapterMethod.fold_bias:
        for weight_name, target in folds.items():
            bias_name = weight_name.removesuffix("weight") + "bias"
            if bias_name in base.shapes:
                bias_folds[bias_name] = target
    replacements, additions = {}, {}
    for name in adapter.full_tensors():
        match = match_suffix(name, names)
        if match is None:
            additions[name] = name
        else:
            replacements[match] = name
    return FoldPlan(folds, bias_folds, replacements, additions)


def check_finite(adapter: AdapterCheckpoint) -> None:
    """Refuse an adapter holding NaN or Inf before any output is written."""
    for key, value in adapter.tensors().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"adapter tensor {key} holds NaN or Inf", path=adapter.weights_path,
                                  hint="the adapter is corrupt or training diverged; use an earlier checkpoint")


def fold_tensor(method: type[AdapterMethod], weight: torch.Tensor, params: dict[str, torch.Tensor], config,
                *, transposed: bool, out_dtype: torch.dtype, name: str) -> torch.Tensor:
    """Fold one stored weight: float32 math, one cast at the end, non-finite results refused."""
    weight32 = weight.float()
    if transposed:
        weight32 = weight32.t()  # Conv1D stores (in, out); fold works on (out, in)
    params32 = {k: v.float() for k, v in params.items()}
    folded = method.fold(weight32, params32, config)
    if transposed:
        folded = folded.t()
    if tuple(folded.shape) != tuple(weight.shape):
        raise AdapterMismatchError(f"folding {name} changed its shape from {tuple(weight.shape)} to "
                                   f"{tuple(folded.shape)}", hint="the adapter does not fit this base")
    if not torch.isfinite(folded).all():
        raise CheckpointError(f"folding {name} produced NaN or Inf",
                              hint="the base weight or the adapter holds extreme values; check both")
    return folded.to(out_dtype).contiguous()


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """``"auto"`` -> None (keep each tensor's dtype), else the torch dtype."""
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}", hint=f"use auto or one of {', '.join(DTYPES)}") from None


def fold_checkpoint(adapter: str | Path, out: str | Path, *, base: str | Path | None = None, dtype: str = "auto",
                    overwrite: bool = False, progress: bool = True,
                    on_tensor: Callable[[str], None] | None = None) -> FoldResult:
    """Fold an adapter checkpoint into its base model and write a HF model directory.

    Args:
        adapter: the adapter checkpoint directory.
        out: the output directory (must not exist unless ``overwrite``).
        base: the base model directory; defaults to the one recorded in the adapter.
        dtype: ``auto`` (keep the base's) or float32 / float16 / bfloat16.
        overwrite: replace an existing ``out``.
        progress: show a progress bar.

    Returns:
        A FoldResult describing what was written.

    Raises:
        CheckpointError, AdapterMismatchError, ConfigError, OutputExistsError.
    """
    start = time.perf_counter()
    out_dtype = resolve_dtype(dtype)
    checkpoint = read_adapter(adapter)
    if base is None:
        if not checkpoint.base_model:
            raise ConfigError("the adapter records no base model", path=checkpoint.path,
                              hint="pass the base model directory with --base")
        base = checkpoint.base_model
    base_checkpoint = open_base(base)
    plan = plan_fold(checkpoint, base_checkpoint)
    total_bytes = sum(shard.stat().st_size for shard in base_checkpoint.shards)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="fold", disable=not progress) as bar:
            weight_map = _fold_shards(checkpoint, base_checkpoint, plan, tmp, out_dtype, bar, on_tensor)
        if base_checkpoint.index is not None:
            index = dict(base_checkpoint.index)
            total = sum((tmp / name).stat().st_size for name in set(weight_map.values()))
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        copy_model_files(base_checkpoint.path, tmp)
        config_updates = dict(checkpoint.config_overrides)
        if out_dtype is not None:
            config_updates["dtype"] = dtype
        update_config(tmp, config_updates)
        result = FoldResult(Path(out), checkpoint.method.name, len(plan.folds),
                            len(plan.replacements) + len(plan.additions), dtype, time.perf_counter() - start)
        provenance = {
            "hypermerge_version": __version__,
            "adapter": str(Path(adapter).absolute()),
            "base_model": str(Path(base).absolute()),
            "method": checkpoint.method.name,
            "folded_weights": result.folded,
            "replaced_tensors": result.replaced,
            "dtype": dtype,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return result


def _fold_shards(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, plan: FoldPlan, tmp: Path,
                 out_dtype: torch.dtype | None, bar, on_tensor) -> dict[str, str]:
    """Fold shard by shard; returns the output weight map (tensor name -> shard file name)."""
    method, config = checkpoint.method, checkpoint.config
    full_tensors = checkpoint.full_tensors()
    weight_map: dict[str, str] = {}
    for shard_index, shard in enumerate(base.shards):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                keep = out_dtype is None or not tensor.is_floating_point()
                target_dtype = tensor.dtype if keep else out_dtype
                if name in plan.folds:
                    target = plan.folds[name]
                    tensor = fold_tensor(method, tensor, checkpoint.layer_params(target), config,
                                         transposed=target in checkpoint.fan_in_fan_out,
                                         out_dtype=target_dtype, name=target)
                elif name in plan.bias_folds:
                    params = {k: v.float() for k, v in checkpoint.layer_params(plan.bias_folds[name]).items()}
                    tensor = method.fold_bias(tensor.float(), params, config).to(target_dtype)
                elif name in plan.replacements:
                    tensor = full_tensors[plan.replacements[name]].to(target_dtype)
                else:
                    tensor = tensor.to(target_dtype)
                tensors[name] = tensor
                bar.update(tensor.numel() * tensor.element_size())
                if on_tensor is not None:
                    on_tensor(name)
        if shard_index == len(base.shards) - 1:
            for name, source in plan.additions.items():
                tensor = full_tensors[source]
                tensors[name] = tensor.to(out_dtype) if out_dtype is not None else tensor
        save_file(tensors, str(tmp / shard.name), metadata=metadata)
        weight_map.update({name: shard.name for name in tensors})
    return weight_map
