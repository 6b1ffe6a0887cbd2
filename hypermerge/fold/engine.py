"""The streaming fold engine: base checkpoint files + adapter checkpoint -> dense HF model directory.

No model code runs, and no shard is ever held whole in memory:

1. The base's safetensors headers are parsed (no tensor data) and the adapter's tensors are
   mapped onto base tensors by name; shapes are checked against the adapter's fingerprint and by
   running each method's fold on meta tensors, so a mismatch is reported before any I/O.
2. The output layout is decided up front (the base's sharding, or ``max_shard_size``), so each
   output shard's header can be written first.
3. Tensors are then produced one at a time in header order: a targeted weight is read (a plain
   positional read of its byte range), folded by its method's pure ``fold`` in float32, cast
   once to the output dtype, checked for NaN/Inf and written; an untouched tensor is copied
   byte for byte, file to file, in bounded chunks.

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
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.checkpoint import AdapterCheckpoint, check_fingerprint, read_adapter
from hypermerge.adapters.targets import match_suffix
from hypermerge.adapters.validation import check_layers
from hypermerge.errors import AdapterMismatchError, CheckpointError, ConfigError
from hypermerge.fold.base_check import BaseCheck, check_base, checkpoint_sampler
from hypermerge.fold.hfdir import (
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    BaseCheckpoint,
    copy_model_files,
    open_base,
    update_config,
)
from hypermerge.fold.safetensors_io import (
    CASTABLE,
    ITEMSIZE,
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    OutputTensor,
    ShardWriter,
    layout_order,
    parse_size,
    read_tensor,
    tensor_bytes,
)

PROVENANCE_FILE = "hypermerge_fold.json"
# torch threads used while folding. The work per tensor is a few memory-bound passes (add, finite
# check, cast) between reads and writes; extra OpenMP threads gain little there, and on a machine
# whose cores are busy they cost 10-20x (each parallel region waits for its slowest thread).
FOLD_THREADS = 1


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


@dataclasses.dataclass
class FoldPlan:
    """For every base tensor name, how to produce its output."""

    folds: dict[str, str]  # base weight name -> adapter target name
    bias_folds: dict[str, str]  # base bias name -> adapter target name (methods that scale biases)
    replacements: dict[str, str]  # base tensor name -> name in adapter's full tensors
    additions: dict[str, str]  # new tensor name in output -> name in adapter's full tensors
    resized: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # replacements of a new size


def plan_fold(adapter: AdapterCheckpoint, base: BaseCheckpoint) -> FoldPlan:
    """Map the adapter's tensors onto the base's and check that they fit, before any I/O.

    Raises:
        AdapterMismatchError: a target is missing from the base, or a shape differs (by the
            fingerprint, or because the method's fold cannot apply to the base weight).
        CheckpointError: the adapter holds NaN/Inf, or a targeted weight is not a float tensor.
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
    check_layers(adapter, {t: base.shapes[b] for b, t in folds.items()}, where="the base checkpoint")
    check_finite(adapter)
    for weight_name in folds:
        if base.dtypes[weight_name] not in CASTABLE:
            raise CheckpointError(f"{weight_name} is stored as {base.dtypes[weight_name]}, which cannot be folded "
                                  "(quantised or integer weights)", path=base.shard_of[weight_name],
                                  hint="fold onto the unquantised base model in float32, float16 or bfloat16")
    _check_fold_shapes(adapter, base, folds)
    bias_folds = {}
    if adapter.method.fold_bias is not AdapterMethod.fold_bias:
        for weight_name, target in folds.items():
            bias_name = weight_name.removesuffix("weight") + "bias"
            if bias_name in base.shapes:
                bias_folds[bias_name] = target
    replacements, additions, resized = {}, {}, {}
    for name, tensor in adapter.full_tensors().items():
        match = match_suffix(name, names)
        if match is None:
            additions[name] = name
            continue
        if tuple(tensor.shape) != base.shapes[match] and not _is_new_head(adapter, tensor):
            raise AdapterMismatchError(f"the adapter's {name} has shape {tuple(tensor.shape)} but the base's "
                                       f"{match} has {base.shapes[match]}", path=adapter.path,
                                       hint="fold onto the base model the adapter was trained on (--base)")
        replacements[match] = name
        if tuple(tensor.shape) != base.shapes[match]:
            resized[match] = tuple(tensor.shape)
    return FoldPlan(folds, bias_folds, replacements, additions, resized)


def _is_new_head(adapter: AdapterCheckpoint, tensor: torch.Tensor) -> bool:
    """A head trained from scratch for other labels (``id2label`` in the adapter's config
    overrides) replaces the base's head whatever the base's label count was."""
    labels = adapter.config_overrides.get("id2label")
    return bool(labels) and tensor.dim() >= 1 and tensor.shape[0] == len(labels)


def _check_fold_shapes(adapter: AdapterCheckpoint, base: BaseCheckpoint, folds: dict[str, str]) -> None:
    """Dry-run the fold for targets the fingerprint does not describe, so a misfit surfaces now.

    The fingerprint already pins every weight an adapter was trained on; PEFT IA³ vectors give
    only one side of a weight's shape, so those targets are folded once on zeros of the base's
    shape, once per distinct (weight shape, adapter shapes) signature. Meta tensors would avoid
    the arithmetic, but their first use imports torch's Python decompositions (~1.7 s), more
    than the whole fold of a small model.
    """
    method, config = adapter.method, adapter.config
    seen: set[tuple] = set()
    for weight_name, target in folds.items():
        shape = base.shapes[weight_name]
        if len(shape) != 2:
            raise AdapterMismatchError(f"{weight_name} has shape {shape}; adapters fold into 2-D weights only",
                                       path=adapter.path, hint="fold onto the base model the adapter was trained on")
        if target in adapter.base_fingerprint:
            continue
        params = adapter.layer_params(target)
        logical = (shape[1], shape[0]) if target in adapter.fan_in_fan_out else shape  # (out, in)
        signature = (logical, tuple(sorted((k, tuple(v.shape)) for k, v in params.items())))
        if signature in seen:
            continue
        seen.add(signature)
        try:
            out = method.fold(torch.zeros(logical), {k: v.float() for k, v in params.items()}, config)
        except (RuntimeError, IndexError, ValueError) as exc:  # torch's shape errors
            raise AdapterMismatchError(_mismatch(weight_name, shape, params, exc), path=adapter.path,
                                       hint="fold onto the base model the adapter was trained on") from None
        _check_shape(out, logical, weight_name, shape, params, adapter)


def _check_shape(out: torch.Tensor, logical: tuple[int, ...], weight_name: str, shape: tuple[int, ...],
                 params: dict[str, torch.Tensor], adapter: AdapterCheckpoint) -> None:
    if tuple(out.shape) != tuple(logical):
        raise AdapterMismatchError(_mismatch(weight_name, shape, params, f"the fold returns {tuple(out.shape)}"),
                                   path=adapter.path, hint="fold onto the base model the adapter was trained on")


def _mismatch(weight_name: str, shape: tuple[int, ...], params: dict[str, torch.Tensor], why: object) -> str:
    sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()))
    reason = str(why).splitlines()[0] if str(why) else type(why).__name__
    return f"the adapter's tensors for {weight_name} ({sizes}) do not fit its shape {shape} in the base ({reason})"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one read-only pass in the common case.

    Any NaN or Inf makes the sum NaN or Inf, so a finite sum proves the tensor finite without
    the full-size boolean mask of ``isfinite``; only a non-finite sum (a NaN, or finite values
    whose sum overflows) needs the exact check.

    Args:
        tensor: any tensor (non-float tensors are finite by definition).

    Returns:
        True when no value is NaN or infinite.
    """
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(adapter: AdapterCheckpoint) -> None:
    """Refuse an adapter holding NaN or Inf before any output is written.

    Raises:
        CheckpointError: naming the first non-finite tensor and the file.
    """
    for key, value in adapter.tensors().items():
        if not all_finite(value):
            raise CheckpointError(f"adapter tensor {key} holds NaN or Inf", path=adapter.weights_path,
                                  hint="the adapter is corrupt or training diverged; use an earlier checkpoint")


def check_finite_weights(model: torch.nn.Module, base: BaseCheckpoint) -> None:
    """Refuse a loaded model whose checkpoint weights hold NaN or Inf.

    A non-finite weight loads, trains and exports without complaint and poisons every output;
    parameters never hold one on purpose. Parameters the checkpoint does not have (a new head)
    are not checked.

    Raises:
        CheckpointError: naming the weight and the shard it came from.
    """
    for name, param in model.named_parameters():
        if name in base.shard_of and param.is_floating_point() and not all_finite(param.detach()):
            raise CheckpointError(f"the model's weight {name} holds NaN or Inf", path=base.shard_of[name],
                                  hint="the checkpoint is damaged; re-save or re-download it")


def fold_tensor(method: type[AdapterMethod], weight: torch.Tensor, params: dict[str, torch.Tensor],
                config: AdapterConfig, *, transposed: bool, out_dtype: torch.dtype, name: str,
                source: Path | None = None) -> torch.Tensor:
    """Fold one stored weight: float32 math, one cast at the end, non-finite results refused.

    Args:
        weight: the weight as stored ((in, out) when ``transposed``, GPT-2 ``Conv1D``).
        params: the adapter's tensors for this weight.
        transposed: whether the stored layout is (in, out).
        out_dtype: the dtype to write.
        name: the weight's name, for messages.
        source: the file the weight was read from, for messages.

    Returns:
        The folded weight in stored layout, ``out_dtype``, contiguous.

    Raises:
        AdapterMismatchError: the fold failed or changed the shape.
        CheckpointError: the result holds NaN/Inf (or overflows ``out_dtype``).
    """
    weight32 = weight.float()
    if transposed:
        weight32 = weight32.t()  # Conv1D stores (in, out); fold works on (out, in)
    params32 = {k: v.float() for k, v in params.items()}
    try:
        folded = method.fold(weight32, params32, config)
    except RuntimeError as exc:
        raise AdapterMismatchError(_mismatch(name, tuple(weight.shape), params, exc),
                                   hint="fold onto the base model the adapter was trained on") from None
    if transposed:
        folded = folded.t()
    if tuple(folded.shape) != tuple(weight.shape):
        raise AdapterMismatchError(f"folding {name} changed its shape from {tuple(weight.shape)} to "
                                   f"{tuple(folded.shape)}", hint="the adapter does not fit this base")
    if not all_finite(folded):
        if not all_finite(weight32):  # only looked at once something is wrong
            raise CheckpointError(f"the base weight {name} holds NaN or Inf", path=source,
                                  hint="the base checkpoint is damaged; re-save or re-download it")
        raise CheckpointError(f"folding {name} produced NaN or Inf",
                              hint="the base weight or the adapter holds extreme values; check both")
    if out_dtype != torch.float32:
        folded = folded.to(out_dtype)
        if not all_finite(folded):
            raise CheckpointError(f"folding {name} gives values too large for "
                                  f"{str(out_dtype).removeprefix('torch.')}", hint="pass --dtype float32 or bfloat16")
    return folded.contiguous()


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


@dataclasses.dataclass
class _Shard:
    name: str
    tensors: list[OutputTensor]


def _output_tensors(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, plan: FoldPlan,
                    out_dtype: torch.dtype | None) -> tuple[dict[Path, list[OutputTensor]], list[OutputTensor]]:
    """Every output tensor with its dtype and recipe, grouped by the base shard it comes from
    (additions, new tensors from the adapter, separately)."""
    out_name = SAFETENSORS_DTYPES[out_dtype] if out_dtype is not None else None
    by_shard: dict[Path, list[OutputTensor]] = {}
    for shard in base.shards:
        tensors = []
        for name, entry in base.headers[shard].entries.items():
            dtype = out_name if out_name is not None and entry.dtype in CASTABLE else entry.dtype
            if name in plan.folds:
                recipe = ("fold", name, plan.folds[name])
            elif name in plan.bias_folds:
                recipe = ("bias", name, plan.bias_folds[name])
            elif name in plan.replacements:
                recipe = ("full", plan.replacements[name])
            elif dtype == entry.dtype:
                recipe = ("copy", name)
            else:
                recipe = ("cast", name)
            if dtype not in ITEMSIZE:  # a dtype newer than this code: copied as bytes, never computed on
                if recipe[0] != "copy":
                    raise CheckpointError(f"{name} has dtype {dtype}, which this version cannot rewrite",
                                          path=shard, hint="fold onto a base saved in float32, float16 or bfloat16")
                tensors.append(OutputTensor(name, dtype, entry.shape, recipe, nbytes=entry.nbytes))
                continue
            tensors.append(OutputTensor(name, dtype, plan.resized.get(name, entry.shape), recipe))
        by_shard[shard] = tensors
    additions = []
    full = checkpoint.full_tensors() if plan.additions else {}
    for name, source in plan.additions.items():
        tensor = full[source]
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        if out_name is not None and dtype in CASTABLE:
            dtype = out_name
        additions.append(OutputTensor(name, dtype, tuple(tensor.shape), ("full", source)))
    return by_shard, additions


def _layout(by_shard: dict[Path, list[OutputTensor]], additions: list[OutputTensor],
            max_shard_size: int | None) -> list[_Shard]:
    """Assign output tensors to shard files: the base's own sharding, or greedy by size."""
    if max_shard_size is None:
        shards = [_Shard(shard.name, list(tensors)) for shard, tensors in by_shard.items()]
        shards[-1].tensors.extend(additions)
        return [_Shard(s.name, layout_order(s.tensors)) for s in shards]
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    ordered = [t for tensors in by_shard.values() for t in layout_order(tensors)] + additions
    for tensor in ordered:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [_Shard(SINGLE_FILE, layout_order(groups[0]))]
    count = len(groups)
    return [_Shard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", layout_order(g)) for i, g in enumerate(groups)]


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
    out_dtype = resolve_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    if tolerance is not None and not verify:
        raise ConfigError("--tolerance applies to --verify only", hint="add --verify, or drop --tolerance")
    checkpoint = read_adapter(adapter)
    if base is None:
        if not checkpoint.base_model:
            raise ConfigError("the adapter records no base model", path=checkpoint.path,
                              hint="pass the base model directory with --base")
        if not Path(checkpoint.base_model).is_dir():
            raise ConfigError(f"the adapter's recorded base model {checkpoint.base_model!r} is not a local "
                              "directory", path=checkpoint.path, hint="pass the base model directory with --base")
        base = checkpoint.base_model
    base_checkpoint = open_base(base)
    plan = plan_fold(checkpoint, base_checkpoint)
    base_check = check_base(checkpoint, base_checkpoint.path, checkpoint_sampler(base_checkpoint),
                            {t: b for b, t in plan.folds.items()}, allow_other_base=allow_other_base)
    by_shard, additions = _output_tensors(checkpoint, base_checkpoint, plan, out_dtype)
    shards = _layout(by_shard, additions, shard_limit)
    total_bytes = sum(t.nbytes for shard in shards for t in shard.tensors)
    metadata = base_checkpoint.headers[base_checkpoint.shards[0]].metadata or {"format": "pt"}

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(FOLD_THREADS)
        try:
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="fold", disable=not progress) as bar:
                _write_shards(checkpoint, base_checkpoint, plan, shards, tmp, metadata, out_dtype, bar.update,
                              on_tensor)
        finally:
            torch.set_num_threads(threads)
        weight_map = {t.name: shard.name for shard in shards for t in shard.tensors}
        if len(shards) > 1 or (shard_limit is None and base_checkpoint.index is not None):
            index = dict(base_checkpoint.index or {}) if shard_limit is None else {}
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_bytes}
            if "total_parameters" in index["metadata"]:
                index["metadata"]["total_parameters"] = sum(math.prod(t.shape) for s in shards for t in s.tensors)
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        copy_model_files(base_checkpoint.path, tmp)
        config_updates = dict(checkpoint.config_overrides)
        if out_dtype is not None:
            config_updates["dtype"] = dtype
        update_config(tmp, config_updates)
        result = FoldResult(Path(out), checkpoint.method.name, len(plan.folds),
                            len(plan.replacements) + len(plan.additions), dtype, 0.0, len(shards), total_bytes,
                            base_check=base_check)
        if verify:
            from hypermerge.fold.verify import verify_fold

            result.verify = verify_fold(checkpoint.path, base_checkpoint.path, tmp, dtype=out_dtype,
                                        tolerance=tolerance)
        result.seconds = time.perf_counter() - start
        provenance = {
            "hypermerge_version": __version__,
            "adapter": str(Path(adapter).absolute()),
            "adapter_format": checkpoint.metadata.get("source", "hypermerge"),
            "adapter_sha256": checkpoint.content_sha256(),
            "base_check": base_check.to_dict(),
            "base_model": str(Path(base).absolute()),
            "method": checkpoint.method.name,
            "folded_weights": result.folded,
            "replaced_tensors": result.replaced,
            "dtype": dtype,
            "shards": len(shards),
            "verify": result.verify,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return result


class _BaseFiles:
    """Open base shards on demand, keeping only a few open at once."""

    def __init__(self, keep: int = 4):
        self._handles: dict[Path, BinaryIO] = {}
        self._keep = keep

    def get(self, path: Path) -> BinaryIO:
        handle = self._handles.get(path)
        if handle is None:
            if len(self._handles) >= self._keep:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            try:
                handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CheckpointError(f"cannot open the weights ({exc.strerror})", path=path,
                                      hint="check the base model directory") from exc
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _write_shards(checkpoint: AdapterCheckpoint, base: BaseCheckpoint, plan: FoldPlan, shards: list[_Shard],
                  tmp: Path, metadata: dict[str, str], out_dtype: torch.dtype | None,
                  progress: Callable[[int], None], on_tensor: Callable[[str], None] | None) -> None:
    """Write every output shard: header first, then each tensor's bytes in header order.

    One thread does everything, in order. (A writer thread overlapping writes with folding was
    measured on the 2-core benchmark machine: no faster, and one more tensor resident.)
    """
    method, config = checkpoint.method, checkpoint.config
    full = checkpoint.full_tensors() if (plan.replacements or plan.additions) else {}
    files = _BaseFiles()
    # One read buffer, as large as the largest tensor read, reused for every read: fresh
    # buffers would cost page faults each time and fragment the heap.
    largest = max((base.entry(t.name).nbytes for s in shards for t in s.tensors
                   if t.produce[0] in ("fold", "bias", "cast")), default=0)
    buffer = torch.empty(largest, dtype=torch.uint8)
    try:
        for shard in shards:
            writer = ShardWriter(tmp / shard.name, shard.tensors, metadata)
            try:
                for item in shard.tensors:
                    writer.begin(item.name)
                    kind = item.produce[0]
                    if kind == "copy":
                        path, entry = base.shard_of[item.name], base.entry(item.name)
                        writer.copy_from(files.get(path), entry.begin, entry.nbytes, path, progress)
                    else:
                        target_dtype = TORCH_DTYPES[item.dtype]
                        if kind == "full":
                            tensor = full[item.produce[1]].to(target_dtype)
                        else:
                            path = base.shard_of[item.name]
                            stored = read_tensor(files.get(path), base.entry(item.name), path, buffer=buffer)
                            if kind == "fold":
                                target = item.produce[2]
                                tensor = fold_tensor(method, stored, checkpoint.layer_params(target), config,
                                                     transposed=target in checkpoint.fan_in_fan_out,
                                                     out_dtype=target_dtype, name=item.name, source=path)
                            elif kind == "bias":
                                params = {k: v.float() for k, v in
                                          checkpoint.layer_params(item.produce[2]).items()}
                                tensor = method.fold_bias(stored.float(), params, config).to(target_dtype)
                                if not all_finite(tensor):
                                    raise CheckpointError(f"folding {item.name} produced NaN or Inf",
                                                          hint="the base bias or the adapter holds extreme values")
                            else:  # cast
                                tensor = stored.to(target_dtype)
                            del stored
                        # Written before the next read reuses the buffer, so a fold that returns
                        # its input unchanged is still written correctly.
                        writer.write(tensor_bytes(tensor.contiguous()))
                        progress(item.nbytes)
                        del tensor
                    if on_tensor is not None:
                        on_tensor(item.name)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        files.close()
