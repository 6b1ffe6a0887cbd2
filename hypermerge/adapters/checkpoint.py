"""Adapter checkpoints: the contract between ``train`` and ``fold``.

A checkpoint is a directory with two files:

* ``adapter_config.json``: format and version, the method and its config, the base model's
  path, a fingerprint (shape and dtype) of every targeted base weight, the target names, which
  of them are stored transposed (GPT-2 ``Conv1D``), and method metadata such as ``rank_pattern``;
* ``adapter_model.safetensors``: tensors keyed ``<base weight name>::<method>.<param>``
  (``model.layers.0.self_attn.q_proj.weight::hyperadapt.a``), ``<tensor name>::full`` for
  modules trained in full, and ``<method>::<name>`` for state shared across layers.

Fold needs no model code: it maps the names onto the base checkpoint's tensors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import hypermerge.adapters.base_digest as digests
from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.checkpoint_format import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    PICKLE_FILES,
    WEIGHTS_FILE,
    AdapterCheckpoint,
    read_safetensors,
    refuse_pickle,
)
from hypermerge.adapters.model import adapter_state, inject
from hypermerge.adapters.peft_import import read_peft_adapter
from hypermerge.adapters.registry import METHODS, get_method
from hypermerge.adapters.targets import match_suffix
from hypermerge.adapters.validation import FULL_SUFFIX, check_layers
from hypermerge.errors import AdapterMismatchError, CheckpointError, ConfigError, HypermergeError

# the format's names live in checkpoint_format (shared with the PEFT reader); they are still importable from here
__all__ = ["CONFIG_FILE", "CONFIG_OVERRIDE_KEYS", "FORMAT", "FORMAT_VERSION", "PICKLE_FILES", "WEIGHTS_FILE",
           "AdapterCheckpoint", "check_fingerprint", "load_adapter", "read_adapter", "read_safetensors",
           "refuse_pickle", "save_adapter"]

# Keys of the trained model's config that a fold writes into the folded config.json (a new
# classification head changes the architecture and label names).
CONFIG_OVERRIDE_KEYS = ("architectures", "id2label", "label2id", "problem_type")


def _fingerprint(tensor: torch.Tensor) -> tuple[list[int], str]:
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]


def _config_overrides(model: nn.Module, base_model: str | Path | None) -> dict[str, Any]:
    if base_model is None or not hasattr(model, "config"):
        return {}
    base_config_path = Path(base_model) / "config.json"
    try:
        base_config = json.loads(base_config_path.read_text())
    except (OSError, ValueError):
        return {}
    model_config = model.config.to_dict()
    if type(model).__module__.startswith("transformers."):  # as save_pretrained records it: the trained class
        model_config["architectures"] = [type(model).__name__]
    return {k: model_config[k] for k in CONFIG_OVERRIDE_KEYS
            if k in model_config and model_config[k] != base_config.get(k)}


def _model_type(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def save_adapter(model: nn.Module, path: str | Path, base_model: str | Path | None = None, *,
                 overwrite: bool = True) -> Path:
    """Write the adapter of ``model`` as a checkpoint directory (atomically).

    Args:
        model: a model with an adapter (``hm.inject`` or ``hm.load_adapter``).
        path: the directory to write.
        base_model: the base model directory the adapter applies to; recorded so that
            ``hypermerge fold`` can find it, and used to record config changes (a new head).
        overwrite: replace an existing directory (the default, like ``save_pretrained``).

    Returns:
        The checkpoint directory.
    """
    state = adapter_state(model)
    method = state.method
    tensors: dict[str, torch.Tensor] = {}
    fingerprint = {}
    samples = {}
    fan_in_fan_out = []
    for weight_name, layer in state.layers.items():
        fingerprint[weight_name] = _fingerprint(layer.base_layer.weight)
        if layer.base_layer.weight.device.type != "meta":
            samples[weight_name] = digests.encode(digests.sample_of(layer.base_layer.weight))
        if layer.fan_in_fan_out:
            fan_in_fan_out.append(weight_name)
        for key, value in layer.adapter_tensors().items():
            tensors[f"{weight_name}::{method.name}.{key}"] = value
    for module_name in state.saved_modules:
        for param_name, param in model.get_submodule(module_name).named_parameters():
            tensors[f"{module_name}.{param_name}{FULL_SUFFIX}"] = param
    tensors.update(method.model_tensors(model))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"adapter tensor {key} holds NaN or Inf", path=path,
                                  hint="training diverged; lower the learning rate or resume from an earlier checkpoint")

    metadata = method.checkpoint_metadata(model, state.layers)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hypermerge_version": __version__,
        "method": method.name,
        "base_model": str(Path(base_model).absolute()) if base_model is not None else None,
        "base_fingerprint": fingerprint,
        "base_digest": digests.BaseDigest(_model_type(model), samples).to_dict() if samples else None,
        "targets": list(state.layers),
        "fan_in_fan_out": fan_in_fan_out,
        "config": state.config.to_dict(),
        "config_overrides": _config_overrides(model, base_model),
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        **metadata,
    }
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return Path(path)


def read_adapter(path: str | Path) -> AdapterCheckpoint:
    """Read and validate an adapter checkpoint directory (tensors are loaded lazily).

    Raises:
        CheckpointError: missing, unreadable, pickle-only, or of an unknown format/version.
        ConfigError: the method is unknown or its config invalid.
    """
    path = Path(path)
    raw = _read_config(path)
    checkpoint = read_peft_adapter(path, raw) if "peft_type" in raw else _read_hypermerge(path, raw)
    check_layers(checkpoint)  # every tensor the fold will read, before anyone reads it
    return checkpoint


def _read_config(path: Path) -> dict[str, Any]:
    """The adapter directory's ``adapter_config.json``, as a JSON object.

    Raises:
        CheckpointError: no such directory, no config in it, or not a JSON object.
    """
    if not path.exists():
        raise CheckpointError("adapter directory not found", path=path, hint="check the --adapter path")
    if not path.is_dir():
        raise CheckpointError("an adapter must be a directory", path=path,
                              hint=f"pass the directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"no {CONFIG_FILE} in the adapter directory", path=path,
                              hint="pass a directory written by hm.save_adapter or PEFT's save_pretrained")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{CONFIG_FILE} is not valid JSON ({exc})", path=config_path,
                              hint="the file is damaged; re-save the adapter") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{CONFIG_FILE} must hold a JSON object", path=config_path)
    return raw


def _read_hypermerge(path: Path, raw: dict[str, Any]) -> AdapterCheckpoint:
    """A checkpoint in hypermerge's own format, checked field by field (its tensors not yet read)."""
    config_path = path / CONFIG_FILE
    _check_format(raw, config_path)
    refuse_pickle(path)
    method, config = _method_and_config(raw, config_path)
    layout = _parse_layout(raw, config_path)
    known = {"format", "format_version", "hypermerge_version", "method", "base_model", "base_fingerprint",
             "targets", "fan_in_fan_out", "config", "base_digest"}
    return AdapterCheckpoint(
        path=path,
        method=method,
        config=config,
        base_model=layout.base_model,
        base_fingerprint=layout.fingerprint,
        targets=layout.targets,
        fan_in_fan_out=layout.fan_in_fan_out,
        metadata={k: v for k, v in raw.items() if k not in known},
        base_digest=layout.digest,
    )


def _check_format(raw: dict[str, Any], config_path: Path) -> None:
    """Refuse a config of another format, or of a format version this hypermerge does not read."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{CONFIG_FILE} is not a hypermerge adapter config (format {raw.get('format')!r})",
                              path=config_path, hint="pass a directory written by hm.save_adapter")
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{CONFIG_FILE} has an invalid format_version {version!r}", path=config_path,
                              hint="re-save the adapter with hm.save_adapter")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"adapter format version {version} is newer than this hypermerge "
                              f"reads ({FORMAT_VERSION})", path=config_path, hint="upgrade hypermerge")


def _method_and_config(raw: dict[str, Any], config_path: Path) -> tuple[type[AdapterMethod], AdapterConfig]:
    """The registered method the config names, and its config built from the saved values.

    Raises:
        ConfigError: an unknown method, or an invalid config (naming the config file).
    """
    method_name, config_values = raw.get("method", "<missing>"), raw.get("config") or {}
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise ConfigError(f"unknown adapter method {method_name!r}", path=config_path,
                          hint=f"known methods: {', '.join(sorted(METHODS))}")
    if not isinstance(config_values, dict):
        raise ConfigError(f"the adapter's config must be a JSON object, got {config_values!r}", path=config_path)
    try:
        method = get_method(method_name)
        return method, method.config_cls.from_dict(config_values)
    except ConfigError as exc:
        raise ConfigError(exc.what, path=config_path, hint=exc.hint) from None


@dataclasses.dataclass
class _Layout:
    """The checked structural fields of a hypermerge adapter_config.json."""

    targets: list[str]
    fingerprint: dict[str, tuple[tuple[int, ...], str]]
    fan_in_fan_out: set[str]
    base_model: str | None
    digest: digests.BaseDigest | None


def _parse_layout(raw: dict[str, Any], config_path: Path) -> _Layout:
    """targets, base_fingerprint, fan_in_fan_out, base_model and base_digest, each checked for type.

    Raises:
        CheckpointError: naming the first malformed field.
    """
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{CONFIG_FILE}: {what}", path=config_path, hint="re-save the adapter with hm.save_adapter")

    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise bad(f"targets must be a non-empty list of weight names, got {_short(targets)}")
    if len(set(targets)) != len(targets):
        raise bad("targets lists a weight twice")
    fingerprint: dict[str, tuple[tuple[int, ...], str]] = {}
    recorded = raw.get("base_fingerprint")
    if not isinstance(recorded, dict):
        raise bad(f"base_fingerprint must map weight names to [shape, dtype], got {_short(recorded)}")
    for name, value in recorded.items():
        if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], list) or len(value[0]) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value[0])
                or not isinstance(value[1], str)):
            raise bad(f"base_fingerprint of {name} must be [[rows, columns], dtype], got {_short(value)}")
        fingerprint[name] = (tuple(value[0]), value[1])
    if set(fingerprint) != set(targets):
        odd = sorted(set(fingerprint) ^ set(targets))[0]
        raise bad(f"base_fingerprint and targets disagree (first: {odd})")
    fan = raw.get("fan_in_fan_out") or []
    if not isinstance(fan, list) or not all(isinstance(t, str) and t in fingerprint for t in fan):
        raise bad(f"fan_in_fan_out must list targets, got {_short(fan)}")
    base_model = raw.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise bad(f"base_model must be a path, got {_short(base_model)}")
    digest = None
    if raw.get("base_digest") is not None:
        try:
            digest = digests.BaseDigest.from_dict(raw["base_digest"])
        except ValueError as exc:
            raise bad(str(exc)) from None
        unknown = sorted(set(digest.weights) - set(targets))
        if unknown:
            raise bad(f"base_digest names {unknown[0]}, which is not a target")
    return _Layout(list(targets), fingerprint, set(fan), base_model, digest)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(names: list[str], available: list[str], *, what: str, path: Path) -> dict[str, str]:
    resolved, missing = {}, []
    for name in names:
        match = match_suffix(name, available)
        if match is None:
            missing.append(name)
        else:
            resolved[name] = match
    if missing:
        raise AdapterMismatchError(
            f"{len(missing)} {what} of the adapter are not in the model (first: {missing[0]})",
            path=path, hint="the adapter was made for another base model",
        )
    return resolved


def check_fingerprint(checkpoint: AdapterCheckpoint, shapes: Mapping[str, tuple[int, ...]],
                      resolved: Mapping[str, str], *, where: str) -> None:
    """Raise AdapterMismatchError if a targeted weight's shape differs from the fingerprint."""
    for name, (shape, _dtype) in checkpoint.base_fingerprint.items():
        actual = shapes.get(resolved.get(name, name))
        if actual is not None and tuple(actual) != tuple(shape):
            raise AdapterMismatchError(
                f"{name} has shape {tuple(actual)} in {where} but the adapter was made for {tuple(shape)}",
                path=checkpoint.path, hint="fold onto the base model the adapter was trained on",
            )


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved at ``path`` into ``model`` and load its tensors (in place).

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
        AdapterMismatchError: the adapter was made for another base (names or shapes differ).
    """
    checkpoint = read_adapter(path)
    if not isinstance(checkpoint, AdapterCheckpoint):  # pragma: no cover - guarded by read_adapter
        raise HypermergeError("unexpected checkpoint type")
    params = dict(model.named_parameters())
    weight_names = [n for n in params if n.endswith(".weight")]
    resolved = _resolve(checkpoint.targets, weight_names, what="targeted weights", path=checkpoint.path)
    check_fingerprint(checkpoint, {n: tuple(p.shape) for n, p in params.items()}, resolved, where="the model")
    check_layers(checkpoint, {t: tuple(params[resolved[t]].shape) for t in checkpoint.targets}, where="the model")
    saved = {resolved[t]: checkpoint.layer_params(t) for t in checkpoint.targets}
    module_names = [resolved[t].removesuffix(".weight") for t in checkpoint.targets]
    inject(model, checkpoint.config, module_names=module_names, saved=saved)
    state = adapter_state(model)
    for weight_name, layer in state.layers.items():
        layer.load_adapter_tensors(saved[weight_name])
    full = checkpoint.full_tensors()
    if full:
        current = dict(model.named_parameters())
        resolved_full = _resolve(list(full), list(current), what="fully trained tensors", path=checkpoint.path)
        with torch.no_grad():
            for name, tensor in full.items():
                target = current[resolved_full[name]]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise AdapterMismatchError(f"{name} has shape {tuple(tensor.shape)}, the model needs "
                                               f"{tuple(target.shape)}", path=checkpoint.path)
                target.copy_(tensor)
    state.method.load_model_tensors(model, checkpoint.model_tensors())
    return model
