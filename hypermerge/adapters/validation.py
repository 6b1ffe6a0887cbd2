"""Checking an adapter checkpoint whole, before anything reads it for real.

Everything a fold, a patch or ``hm.load_adapter`` will read is checked here first, against the
method's own declaration of what each adapted weight saves (``AdapterMethod.params``): every
target has every parameter, with the declared shape (the weight's ``out`` / ``in`` sizes and one
rank per weight, in the method's ``rank_range``) and a floating dtype; and every tensor of the
file is used by something (a typo'd key is an error, not a tensor silently ignored). After this
the writers cannot fail on the adapter's content.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from hypermerge.adapters.base import AdapterMethod, ParamSpec
from hypermerge.errors import AdapterMismatchError, CheckpointError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FULL_SUFFIX = "::full"


@dataclasses.dataclass(frozen=True)
class TensorRoles:
    """The keys of an adapter file, by what uses them."""

    layer: dict[str, dict[str, str]]  # target -> param key -> file key
    full: list[str]  # tensors of modules trained in full
    model: list[str]  # state shared across layers (``<method>::...``)


def classify_keys(keys: list[str], method: type[AdapterMethod], targets: list[str], path: Path) -> TensorRoles:
    """Sort the adapter file's keys by role; a key nothing uses is an error.

    Raises:
        CheckpointError: naming the first unused key and why it is unused.
    """
    declared = {spec.key for spec in method.params}
    target_set = set(targets)
    layer: dict[str, dict[str, str]] = {t: {} for t in targets}
    full, model = [], []
    unused: list[tuple[str, str]] = []
    for key in keys:
        if key.endswith(FULL_SUFFIX):
            full.append(key)
            continue
        if key.startswith(f"{method.name}::"):
            model.append(key)
            continue
        target, sep, param = key.rpartition("::")
        prefix = f"{method.name}."
        if not sep or not param.startswith(prefix):
            unused.append((key, f"it is not a {method.name} tensor"))
        elif target not in target_set:
            unused.append((key, f"{target} is not among the adapter's targets"))
        elif param[len(prefix):] not in declared:
            unused.append((key, f"{method.name} has no parameter {param[len(prefix):]!r} "
                                f"(it saves {', '.join(sorted(declared))})"))
        else:
            layer[target][param[len(prefix):]] = key
    if unused:
        key, why = unused[0]
        raise CheckpointError(f"{len(unused)} adapter tensor(s) would be used by nothing (first: {key}: {why})",
                              path=path, hint="the adapter file was edited or belongs to another adapter; re-save it")
    return TensorRoles(layer, full, model)


def layer_problem(method: type[AdapterMethod], config, target: str, params: Mapping[str, torch.Tensor],
                  logical: tuple[int, int] | None) -> str | None:
    """What is wrong with one target's tensors, or None.

    Args:
        method: the adapter method (its ``params`` declaration is the reference).
        config: the method's config (for ``rank_range``).
        target: the weight's name, for the message.
        params: the target's saved tensors, by short key.
        logical: the weight's (out, in) shape, when known.
    """
    expected = _expected_keys(method.params, params)
    missing = [s.key for s in expected if s.key not in params]
    if missing:
        return f"{target} lacks {method.name} parameter(s) {', '.join(missing)}"
    extra = sorted(set(params) - {s.key for s in expected})
    if extra:
        return f"{target} has {method.name} parameters {', '.join(extra)} alongside {expected[0].key} (only one is saved)"
    sizes: dict[str, int] = {}
    if logical is not None:
        sizes["out"], sizes["in"] = logical
    for spec in expected:
        tensor = params[spec.key]
        if tensor.dtype not in FLOAT_DTYPES:
            return f"{target}::{spec.key} is {str(tensor.dtype).removeprefix('torch.')}, not a floating-point tensor"
        if tensor.dim() != len(spec.dims):
            return (f"{target}::{spec.key} has shape {tuple(tensor.shape)}; {method.name} saves it with "
                    f"{len(spec.dims)} dimension(s) ({', '.join(spec.dims)})")
        for dim, size in zip(spec.dims, tensor.shape, strict=True):
            if sizes.setdefault(dim, int(size)) != size:
                return (f"{target}::{spec.key} has shape {tuple(tensor.shape)}, but its {dim!r} dimension should be "
                        f"{sizes[dim]} ({_dims_text(sizes)})")
    if "r" in sizes:
        low, high = method.rank_range(config)
        if sizes["r"] < low or (high is not None and sizes["r"] > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            return f"{target} has rank {sizes['r']}, outside the {method.name} config's range {bound}"
    return None


def _expected_keys(specs: tuple[ParamSpec, ...], params: Mapping[str, torch.Tensor]) -> list[ParamSpec]:
    """The specs this target must have: every ungrouped one, and per group the one saved (the first if none)."""
    chosen: list[ParamSpec] = []
    groups: dict[str, list[ParamSpec]] = {}
    for spec in specs:
        if spec.group is None:
            chosen.append(spec)
        else:
            groups.setdefault(spec.group, []).append(spec)
    for members in groups.values():
        present = [s for s in members if s.key in params]
        chosen.append(present[0] if present else members[0])
    return chosen


def _dims_text(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def check_layers(checkpoint, shapes: Mapping[str, tuple[int, ...]] | None = None, *, where: str = "") -> None:
    """Check every target's tensors against the method's declaration; raise on the first problem.

    Args:
        checkpoint: an ``AdapterCheckpoint``.
        shapes: stored shape of each target's weight (by target name); the checkpoint's own
            fingerprint where not given.
        where: what ``shapes`` describe, for the message (``"the base checkpoint"``).

    Raises:
        AdapterMismatchError: a target's tensors do not fit its weight's shape.
        CheckpointError: a target lacks a parameter, has a wrong dtype or number of dimensions.
    """
    roles = classify_keys(list(checkpoint.tensors()), checkpoint.method, checkpoint.targets, checkpoint.weights_path)
    tensors = checkpoint.tensors()
    for target, keys in roles.layer.items():
        stored = (shapes or {}).get(target)
        if stored is None and target in checkpoint.base_fingerprint:
            stored = checkpoint.base_fingerprint[target][0]
        logical = None
        if stored is not None and len(stored) == 2:
            logical = (stored[1], stored[0]) if target in checkpoint.fan_in_fan_out else (stored[0], stored[1])
        problem = layer_problem(checkpoint.method, checkpoint.config, target,
                                {k: tensors[v] for k, v in keys.items()}, logical)
        if problem is None:
            continue
        if "dimension should be" in problem and shapes is not None:
            raise AdapterMismatchError(f"the adapter's tensors for {target} do not fit its shape {tuple(stored)} in "
                                       f"{where or 'the model'} ({problem})", path=checkpoint.path,
                                       hint="apply the adapter to the base model it was trained on")
        raise CheckpointError(problem, path=checkpoint.weights_path,
                              hint="the adapter file was edited or is incomplete; re-save it")
