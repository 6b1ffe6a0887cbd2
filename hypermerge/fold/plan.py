"""Planning a fold: map an adapter's tensors onto a base's by name and check that they fit.

Nothing is read but headers and the adapter: every mismatch (a target the base lacks, a shape the
fold cannot apply to, NaN/Inf in the adapter, a quantised weight) is reported before any output
exists. The plan then gives each output tensor its typed operation (:mod:`.operations`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from hypermerge.adapters.base import AdapterMethod
from hypermerge.adapters.checkpoint import AdapterCheckpoint, check_fingerprint
from hypermerge.adapters.targets import match_suffix
from hypermerge.adapters.validation import check_layers
from hypermerge.errors import AdapterMismatchError, CheckpointError
from hypermerge.fold.finite import check_finite
from hypermerge.fold.hfdir import BaseCheckpoint
from hypermerge.fold.operations import (
    CastTensor,
    CopyTensor,
    FoldBias,
    FoldOperation,
    FoldWeight,
    SaveFullTensor,
    mismatch_message,
)
from hypermerge.fold.safetensors_io import CASTABLE

_HINT = "fold onto the base model the adapter was trained on"


@dataclasses.dataclass
class FoldPlan:
    """For every base tensor name, how to produce its output."""

    folds: dict[str, str]  # base weight name -> adapter target name
    bias_folds: dict[str, str]  # base bias name -> adapter target name (methods that scale biases)
    replacements: dict[str, str]  # base tensor name -> name in adapter's full tensors
    additions: dict[str, str]  # new tensor name in output -> name in adapter's full tensors
    resized: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # replacements of a new size

    def operation(self, name: str, dtype: torch.dtype | None, *, cast: bool = False) -> FoldOperation:
        """The operation that makes base tensor ``name`` of the output.

        Args:
            name: a tensor of the base.
            dtype: its output dtype (None only for a dtype torch lacks: such a tensor is copied).
            cast: whether the output dtype differs from the stored one.

        Returns:
            FoldWeight, FoldBias or SaveFullTensor for what the adapter changes; else CastTensor
            or CopyTensor.
        """
        if name in self.folds:
            return FoldWeight(name, self.folds[name], dtype)
        if name in self.bias_folds:
            return FoldBias(name, self.bias_folds[name], dtype)
        if name in self.replacements:
            return SaveFullTensor(name, self.replacements[name], dtype)
        return CastTensor(name, dtype) if cast else CopyTensor(name)

    def changes(self, dtype_of: Callable[[str], torch.dtype]) -> list[FoldOperation]:
        """The operations for every base tensor the adapter changes: folded weights, then folded
        biases, then tensors trained in full (additions aside: they are not in the base). A bias
        both folded and trained in full gets both, in that order (``operation`` gives the fold).

        Args:
            dtype_of: the output dtype of a base tensor.
        """
        return ([FoldWeight(name, target, dtype_of(name)) for name, target in self.folds.items()]
                + [FoldBias(name, target, dtype_of(name)) for name, target in self.bias_folds.items()]
                + [SaveFullTensor(name, key, dtype_of(name)) for name, key in self.replacements.items()])


def plan_fold(adapter: AdapterCheckpoint, base: BaseCheckpoint) -> FoldPlan:
    """Map the adapter's tensors onto the base's and check that they fit, before any I/O.

    Args:
        adapter: the adapter checkpoint.
        base: the base's headers (names, shapes, dtypes).

    Returns:
        The plan.

    Raises:
        AdapterMismatchError: a target is missing from the base, or a shape differs (by the
            fingerprint, or because the method's fold cannot apply to the base weight).
        CheckpointError: the adapter holds NaN/Inf, or a targeted weight is not a float tensor.
    """
    folds = _match_targets(adapter, base)
    check_fingerprint(adapter, base.shapes, {t: b for b, t in folds.items()}, where="the base checkpoint")
    check_layers(adapter, {t: base.shapes[b] for b, t in folds.items()}, where="the base checkpoint")
    check_finite(adapter)
    _check_foldable_dtypes(base, folds)
    _check_fold_shapes(adapter, base, folds)
    replacements, additions, resized = _match_full_tensors(adapter, base)
    return FoldPlan(folds, _bias_folds(adapter, base, folds), replacements, additions, resized)


def _match_targets(adapter: AdapterCheckpoint, base: BaseCheckpoint) -> dict[str, str]:
    """base weight name -> the adapter's target name, for every target (all must be found)."""
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
    return folds


def _check_foldable_dtypes(base: BaseCheckpoint, folds: dict[str, str]) -> None:
    for weight_name in folds:
        if base.dtypes[weight_name] not in CASTABLE:
            raise CheckpointError(f"{weight_name} is stored as {base.dtypes[weight_name]}, which cannot be folded "
                                  "(quantised or integer weights)", path=base.shard_of[weight_name],
                                  hint="fold onto the unquantised base model in float32, float16 or bfloat16")


def _bias_folds(adapter: AdapterCheckpoint, base: BaseCheckpoint, folds: dict[str, str]) -> dict[str, str]:
    """base bias name -> target, for methods that override ``fold_bias`` (the default leaves biases)."""
    if adapter.method.fold_bias is AdapterMethod.fold_bias:
        return {}
    bias_folds = {}
    for weight_name, target in folds.items():
        bias_name = weight_name.removesuffix("weight") + "bias"
        if bias_name in base.shapes:
            bias_folds[bias_name] = target
    return bias_folds


def _match_full_tensors(adapter: AdapterCheckpoint, base: BaseCheckpoint
                        ) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[int, ...]]]:
    """The adapter's fully trained tensors: replacements of base tensors (and those of a new
    size), and additions the base does not have."""
    names = list(base.shapes)
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
    return replacements, additions, resized


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
                                       path=adapter.path, hint=_HINT)
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
            raise AdapterMismatchError(mismatch_message(weight_name, shape, params, exc), path=adapter.path,
                                       hint=_HINT) from None
        if tuple(out.shape) != tuple(logical):
            raise AdapterMismatchError(mismatch_message(weight_name, shape, params,
                                                        f"the fold returns {tuple(out.shape)}"),
                                       path=adapter.path, hint=_HINT)
