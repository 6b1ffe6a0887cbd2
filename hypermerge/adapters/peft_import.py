"""Reading PEFT adapter directories (``peft_type`` in adapter_config.json) as hypermerge checkpoints.

``hypermerge fold``, ``hm.load_adapter`` and ``hypermerge inspect`` all go through
``read_adapter``, which hands PEFT directories to ``read_peft_adapter`` below. It maps PEFT's
keys (``base_model.model.<module>.lora_A.weight``) onto base weight names and its parameters
onto a hypermerge method, so the rest of hypermerge never sees PEFT:

=========================  ==========  ==================================================
PEFT                       method      tensors per weight
=========================  ==========  ==================================================
LoRA                       ``lora``    ``lora_A`` (r, in), ``lora_B`` (out, r)
LoRA with ``use_dora``     ``dora``    the same plus ``magnitude`` (out,)
AdaLoRA                    ``lora``    ``lora_A = (A ⊙ E)[kept]``, ``lora_B = B[:, kept] · c``
IA³                        ``ia3``     ``l_in`` (in,) for feedforward modules, else ``l_out``
=========================  ==========  ==================================================

A per-layer scale that differs from the config's (``rank_pattern``/``alpha_pattern``, rsLoRA with
patterns, AdaLoRA's ``alpha / (init_r + 1e-5)``) is folded into ``lora_B``, so each layer keeps
its own rank and the method's single ``scaling`` still applies. Where the scale is the config's,
the tensors are used unchanged and the fold is bit for bit PEFT's ``merge_and_unload``.
AdaLoRA ranks that were pruned (by ``rank_pattern``, or left with a zero singular value) are
dropped; a weight left with no rank is not touched at all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hypermerge.adapters.checkpoint_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterCheckpoint,
    read_safetensors,
    refuse_pickle,
)
from hypermerge.adapters.dora import DoRA, DoRAConfig
from hypermerge.adapters.ia3 import IA3, IA3Config
from hypermerge.adapters.lora import LoRA, LoRAConfig
from hypermerge.adapters.validation import FULL_SUFFIX
from hypermerge.errors import CheckpointError, ConfigError

PEFT_PREFIX = "base_model.model."
SUPPORTED = ("LORA", "ADALORA", "IA3")
_ADAPTER_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E|lora_magnitude_vector|ia3_l|lora_embedding_A|lora_embedding_B)"
    r"(?:\.weight)?$"
)
# LoRA options whose merge is not W + s·BA (or that changed the base weights during training):
# folding them as plain LoRA would be silently wrong, so they are refused by name.
_REFUSED_OPTIONS = {
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
}
# init_lora_weights values that rewrite the base weights at initialisation: the adapter then only
# fits that modified base, not the one on disk.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


@dataclasses.dataclass
class PeftAdapterCheckpoint(AdapterCheckpoint):
    """An AdapterCheckpoint read from a PEFT directory (tensors already converted)."""

    peft_parameters: int = 0

    def trainable_parameters(self) -> int:
        """PEFT's own count (AdaLoRA's E, pruned ranks and all), as PEFT would print it."""
        return self.peft_parameters


def read_peft_adapter(path: Path, raw: dict[str, Any]) -> AdapterCheckpoint:
    """Read a PEFT LoRA, DoRA, AdaLoRA or IA³ adapter directory as an AdapterCheckpoint.

    Args:
        path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        raw: the parsed ``adapter_config.json``.

    Returns:
        A checkpoint whose tensors are keyed by base weight name, ready for fold and load_adapter.

    Raises:
        CheckpointError: an unsupported PEFT type or option, a pickle-only or damaged file, or
            tensors that disagree with the config.
        ConfigError: the config's values are invalid for the hypermerge method.
    """
    config_path = path / CONFIG_FILE
    peft_type = str(raw.get("peft_type"))
    if peft_type not in SUPPORTED:
        raise CheckpointError(f"PEFT {peft_type} adapters cannot be folded by hypermerge (LoRA, DoRA, AdaLoRA "
                              "and IA3 can)", path=config_path, hint="merge it with PEFT's merge_and_unload()")
    _check_types(raw, config_path)
    _refuse_options(raw, config_path)
    refuse_pickle(path)
    weights_path = path / WEIGHTS_FILE
    saved = read_safetensors(weights_path, what="adapter weights")
    modules, full = _split_keys(saved, weights_path)
    if not modules:
        raise CheckpointError(f"no {peft_type} tensors in the adapter weights", path=weights_path,
                              hint="the file does not belong to this adapter_config.json")
    common = {"target_modules": _target_modules(raw.get("target_modules")),
              "modules_to_save": _names(raw.get("modules_to_save"))}
    try:
        if peft_type == "IA3":
            method, config, tensors, fingerprint, extra = _ia3(raw, modules, common, weights_path)
        elif peft_type == "ADALORA":
            method, config, tensors, fingerprint, extra = _adalora(raw, modules, common, weights_path)
        else:
            method, config, tensors, fingerprint, extra = _lora(raw, modules, common, weights_path)
    except ConfigError as exc:
        raise ConfigError(exc.what, path=config_path, hint=exc.hint) from None
    targets = sorted({key.split("::", 1)[0] for key in tensors})
    for name, tensor in full.items():
        tensors[f"{name}{FULL_SUFFIX}"] = tensor
    return PeftAdapterCheckpoint(
        path=path,
        method=method,
        config=config,
        base_model=raw.get("base_model_name_or_path") or None,
        base_fingerprint=fingerprint,
        targets=targets,
        fan_in_fan_out=set(targets) if raw.get("fan_in_fan_out") else set(),
        metadata={"source": "peft", "peft_type": peft_type, "peft_version": raw.get("peft_version"), **extra},
        loaded=tensors,
        peft_parameters=sum(t.numel() for t in saved.values()),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# The fields of a PEFT config this reader uses, and what each must hold (None is always allowed).
_FIELD_TYPES: dict[str, tuple[str, Any]] = {
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "init_r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    "lora_alpha": ("a number", _is_number),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "target_modules": ("a list of names or a regex", lambda v: isinstance(v, str) or _is_names(v)),
    "feedforward_modules": ("a list of names or a regex", lambda v: isinstance(v, str) or _is_names(v)),
    "modules_to_save": ("a list of names", _is_names),
    "rank_pattern": ("an object", lambda v: isinstance(v, dict)),
    "alpha_pattern": ("an object", lambda v: isinstance(v, dict)),
}


def _check_types(raw: Mapping[str, Any], config_path: Path) -> None:
    """Refuse values of the wrong type before any arithmetic meets them (an edited config)."""
    for key, (what, fits) in _FIELD_TYPES.items():
        value = raw.get(key)
        if value is not None and not fits(value):
            raise ConfigError(f"the PEFT config's {key} must be {what}, got {value!r}", path=config_path,
                              hint="fix adapter_config.json, or re-save the adapter with PEFT")


def _refuse_options(raw: Mapping[str, Any], config_path: Path) -> None:
    for key, what in _REFUSED_OPTIONS.items():
        if raw.get(key):
            raise CheckpointError(f"the PEFT adapter uses {what} ({key}), which hypermerge cannot fold",
                                  path=config_path, hint="merge it with PEFT's merge_and_unload()")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"the PEFT adapter was initialised with {init}, which changes the base weights, so "
                              "it does not fit the original base", path=config_path,
                              hint="convert it to a plain LoRA when saving (PEFT's "
                                   "path_initial_model_for_weight_conversion), or merge it with PEFT")


def _split_keys(saved: Mapping[str, torch.Tensor], weights_path: Path
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Adapter tensors grouped by module name, and tensors trained in full by their model name."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    explicit: set[str] = set()  # full tensors seen under PEFT's modules_to_save wrapper
    for key, tensor in saved.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _ADAPTER_KEY.match(name)
        if match is not None:
            part = match["part"]
            if part.startswith("lora_embedding"):
                raise CheckpointError(f"the PEFT adapter puts LoRA on an embedding ({match['module']}); hypermerge "
                                      "folds linear layers only", path=weights_path,
                                      hint="merge it with PEFT's merge_and_unload()")
            modules.setdefault(match["module"], {})[part] = tensor
            continue
        if re.search(r"\.(lora_|ia3_)", name):
            raise CheckpointError(f"unexpected PEFT tensor {key}", path=weights_path,
                                  hint="this adapter uses a PEFT feature hypermerge cannot fold; merge it with PEFT")
        if ".original_module." in f".{name}":
            continue  # the frozen original of a modules_to_save module: the base already has it
        wrapped = ".modules_to_save." in f".{name}"
        name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
        if name in full and not wrapped and name in explicit:
            continue
        full[name] = tensor
        if wrapped:
            explicit.add(name)
    return modules, full


def _target_modules(value: Any) -> tuple[str, ...] | str | None:
    if value is None or value == "all-linear":
        return None
    return value if isinstance(value, str) else tuple(value)


def _names(value: Any) -> tuple[str, ...] | None:
    return tuple(value) if value else None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _need(parts: Mapping[str, torch.Tensor], names: tuple[str, ...], module: str, weights_path: Path) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise CheckpointError(f"{module} lacks {', '.join(missing)} in the adapter weights", path=weights_path,
                              hint="the file is incomplete or of another PEFT type; re-save the adapter")
    for name in names:
        if parts[name].dim() != 2 and name != "lora_magnitude_vector":
            raise CheckpointError(f"{module}.{name} has shape {tuple(parts[name].shape)}; hypermerge folds linear "
                                  "layers only (not convolutions)", path=weights_path,
                                  hint="merge it with PEFT's merge_and_unload()")


def _stored_shape(out_features: int, in_features: int, raw: Mapping[str, Any]) -> tuple[int, ...]:
    # Conv1D (fan_in_fan_out) stores (in, out); the fingerprint records the stored shape.
    return (in_features, out_features) if raw.get("fan_in_fan_out") else (out_features, in_features)


def _lora(raw: Mapping[str, Any], modules: dict[str, dict[str, torch.Tensor]], common: dict[str, Any],
          weights_path: Path):
    dora = bool(raw.get("use_dora"))
    rank, alpha, rslora = raw.get("r", 8), raw.get("lora_alpha", 8), bool(raw.get("use_rslora"))
    config_cls = DoRAConfig if dora else LoRAConfig
    config = config_cls(r=rank, alpha=alpha, dropout=float(raw.get("lora_dropout") or 0.0), use_rslora=rslora,
                        **common)
    method = DoRA if dora else LoRA
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    tensors, fingerprint = {}, {}
    for module, parts in sorted(modules.items()):
        names = ("lora_A", "lora_B", "lora_magnitude_vector") if dora else ("lora_A", "lora_B")
        _need(parts, names, module, weights_path)
        lora_a, lora_b = parts["lora_A"], parts["lora_B"]
        layer_rank = _pattern_value(rank_pattern, module, rank)
        if lora_a.shape[0] != layer_rank or lora_b.shape[1] != layer_rank:
            raise CheckpointError(f"{module} has rank {lora_a.shape[0]} in the weights but {layer_rank} in "
                                  f"{CONFIG_FILE}", path=weights_path, hint="the weights and the config do not belong "
                                  "together; re-save the adapter")
        layer_alpha = _pattern_value(alpha_pattern, module, alpha)
        # PEFT's per-layer scaling, computed the way PEFT computes it (Python floats).
        scaling = layer_alpha / math.sqrt(layer_rank) if rslora else layer_alpha / layer_rank
        if scaling != config.scaling:
            lora_b = lora_b.float() * (scaling / config.scaling)
        weight = f"{module}.weight"
        tensors[f"{weight}::{method.name}.lora_A"] = lora_a
        tensors[f"{weight}::{method.name}.lora_B"] = lora_b
        out_features, in_features = lora_b.shape[0], lora_a.shape[1]
        if dora:
            magnitude = parts["lora_magnitude_vector"].reshape(-1)
            if magnitude.numel() != out_features:
                raise CheckpointError(f"{module}'s DoRA magnitude has {magnitude.numel()} values for "
                                      f"{out_features} outputs", path=weights_path, hint="re-save the adapter")
            tensors[f"{weight}::{method.name}.magnitude"] = magnitude
        fingerprint[weight] = (_stored_shape(out_features, in_features, raw), "unknown")
    return method, config, tensors, fingerprint, {}


def _adalora(raw: Mapping[str, Any], modules: dict[str, dict[str, torch.Tensor]], common: dict[str, Any],
             weights_path: Path):
    init_r = int(raw.get("init_r") or raw.get("r") or 0)
    alpha = raw.get("lora_alpha", 1)
    # The AdaLoRA scale lives in lora_B, so the LoRA config's own scaling is exactly 1.
    config = LoRAConfig(r=max(init_r, 1), alpha=max(init_r, 1), dropout=float(raw.get("lora_dropout") or 0.0),
                        **common)
    patterns = {}
    for key, mask in (raw.get("rank_pattern") or {}).items():
        patterns[key.removeprefix(PEFT_PREFIX).removesuffix(".lora_E")] = [bool(m) for m in mask]
    # PEFT keeps ranknum at init_r (a float32 tensor) even after pruning: delta = B (A ⊙ E) · α / (init_r + 1e-5).
    denominator = torch.tensor(float(init_r), dtype=torch.float32) + 1e-5
    tensors, fingerprint, kept = {}, {}, {}
    for module, parts in sorted(modules.items()):
        _need(parts, ("lora_A", "lora_B", "lora_E"), module, weights_path)
        lora_a, lora_b, lora_e = parts["lora_A"], parts["lora_B"], parts["lora_E"].reshape(-1, 1)
        mask = patterns.get(module)
        if mask is not None and lora_a.shape[0] == len(mask) and sum(mask) != len(mask):
            index = torch.tensor([i for i, keep in enumerate(mask) if keep], dtype=torch.long)
            lora_a, lora_b, lora_e = lora_a[index], lora_b[:, index], lora_e[index]
        elif mask is not None and lora_a.shape[0] != sum(mask):
            raise CheckpointError(f"{module} has {lora_a.shape[0]} ranks in the weights but its rank_pattern keeps "
                                  f"{sum(mask)} of {len(mask)}", path=weights_path,
                                  hint="the weights and the config do not belong together; re-save the adapter")
        live = (lora_e.reshape(-1) != 0).nonzero().reshape(-1)  # a zero singular value is a pruned rank
        rank = int(live.numel())
        weight = f"{module}.weight"
        kept[weight] = rank
        out_features, in_features = lora_b.shape[0], lora_a.shape[1]
        fingerprint[weight] = (_stored_shape(out_features, in_features, raw), "unknown")
        if rank == 0:
            continue  # nothing left: the weight stays exactly the base's
        scaling = alpha if alpha > 0 else float(rank)
        factor = torch.tensor(scaling, dtype=torch.float32) / denominator
        tensors[f"{weight}::lora.lora_A"] = (lora_a * lora_e)[live]  # PEFT's A ⊙ E, then the kept rows
        tensors[f"{weight}::lora.lora_B"] = lora_b[:, live].float() * factor
    fingerprint = {k: v for k, v in fingerprint.items() if kept[k] > 0}
    return LoRA, config, tensors, fingerprint, {"rank_pattern": kept, "init_r": init_r}


def _is_feedforward(feedforward: Any, module: str) -> bool:
    """PEFT's rule: a regex matched in full, or a list of suffixes (plain ``endswith``)."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(suffix) for suffix in feedforward)


def _ia3(raw: Mapping[str, Any], modules: dict[str, dict[str, torch.Tensor]], common: dict[str, Any],
         weights_path: Path):
    feedforward = raw.get("feedforward_modules")
    config = IA3Config(feedforward_modules=_target_modules(feedforward), **common)
    tensors = {}
    for module, parts in sorted(modules.items()):
        _need(parts, ("ia3_l",), module, weights_path)
        vector = parts["ia3_l"]
        is_ff = _is_feedforward(feedforward, module)
        # PEFT stores (1, in) for feedforward modules and (out, 1) for the others.
        if vector.dim() != 2 or vector.shape[0 if is_ff else 1] != 1:
            raise CheckpointError(f"{module}.ia3_l has shape {tuple(vector.shape)}, which does not fit a "
                                  f"{'feedforward' if is_ff else 'non-feedforward'} module", path=weights_path,
                                  hint="the weights and feedforward_modules disagree; re-save the adapter")
        key = "l_in" if is_ff else "l_out"
        tensors[f"{module}.weight::ia3.{key}"] = vector.reshape(-1)
    # One side of each weight's shape is unknown from IA³ vectors; the fold engine checks the
    # fit itself (it runs the fold on meta tensors before writing).
    return IA3, config, tensors, {}, {}
