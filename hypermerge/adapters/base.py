"""The adapter protocol: a config, a layer that wraps one base linear, and a pure fold.

A method is three things, in one file:

* a frozen ``AdapterConfig`` subclass, validated on construction (every problem at once);
* an ``AdapterLayer`` subclass that wraps a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` by
  composition and starts as the identity;
* an ``AdapterMethod`` subclass naming the two and giving ``fold(weight, params, config)``:
  a pure function on tensors, weight in (out, in) layout and float32, so the streaming fold
  engine can apply it to a tensor read from a safetensors file with no model code.

Methods with state shared across layers (a hypernetwork, a rank allocator) override the
model-level hooks of ``AdapterMethod``; the defaults do nothing.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from hypermerge.errors import AdapterMismatchError, ConfigError


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored transposed, (in, out)).

    Looked up in ``sys.modules`` rather than imported: a Conv1D instance implies transformers
    is loaded, and not importing it here keeps ``hypermerge fold`` (which needs no model code)
    from paying transformers' ~0.6 s import.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """True for modules an adapter can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def __getattr__(name: str) -> Any:
    # ``LINEAR_TYPES`` is kept for code that imported it; built on first use so that importing
    # this module does not import transformers.
    if name == "LINEAR_TYPES":
        from transformers.pytorch_utils import Conv1D

        return (nn.Linear, Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Fields every method shares.

    Args:
        target_modules: None for every linear layer of the transformer blocks; a sequence of
            module-name suffixes (``["q_proj", "v_proj"]``); or a string, a regex matched
            against the full module name.
        modules_to_save: module-name suffixes of modules trained in full and saved whole
            (a new classification head, say).
    """

    method: ClassVar[str] = ""

    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("target_modules", "modules_to_save"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        problems = self.problems()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the values, as short sentences. Subclasses extend the list."""
        problems = []
        target = self.target_modules
        if isinstance(target, str):
            try:
                re.compile(target)
            except re.error as exc:
                problems.append(f"target_modules {target!r} is not a valid regex ({exc})")
        elif target is not None:
            if not target or not all(isinstance(t, str) and t for t in target):
                problems.append("target_modules must be None, a regex string or a non-empty list of names")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            problems.append("modules_to_save must be a list of module names")
        return problems

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        """Build from a plain dict (JSON, YAML). Unknown keys are an error naming the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown {cls.method} option(s) {', '.join(unknown)}",
                hint=f"valid options are {', '.join(valid)}",
            )
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid {cls.method} options: {exc}") from exc


class AdapterLayer(nn.Module):
    """Wraps one frozen linear layer; subclasses add the adapter's parameters.

    ``weight_name`` is the base weight's state-dict name (``...q_proj.weight``): checkpoints key
    the adapter's tensors by it, so the fold engine can map them onto base files by name.
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, weight_name: str):
        super().__init__()
        if not is_linear_like(base_layer):
            raise ConfigError(f"{weight_name}: cannot adapt a {type(base_layer).__name__}; "
                              "only nn.Linear and Conv1D are supported")
        self.base_layer = base_layer
        self.config = config
        self.weight_name = weight_name
        # GPT-2's Conv1D stores its weight transposed: (in, out).
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape

    # -- what subclasses provide ---------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the fold needs, keyed by short name (``"a"``, ``"lora_A"``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base weight as stored (some model code reads ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The base weight in (out, in) layout, whatever the module stores."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def matmul(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T`` without the bias, for a weight in (out, in) layout (base weight by default)."""
        return torch.nn.functional.linear(x, self.base_weight() if weight is None else weight)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return y if bias is None else y + bias

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors into this layer's parameters; shapes must match exactly."""
        own = self.adapter_tensors()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterMismatchError(
                f"{self.weight_name}: adapter tensors differ (missing {missing}, unexpected {unexpected})",
                hint="the checkpoint was written by another method or version",
            )
        with torch.no_grad():
            for key, target in own.items():
                source = tensors[key]
                if tuple(source.shape) != tuple(target.shape):
                    raise AdapterMismatchError(
                        f"{self.weight_name}::{key} has shape {tuple(source.shape)}, "
                        f"the model needs {tuple(target.shape)}",
                        hint="the adapter was made for a model with other layer sizes",
                    )
                target.copy_(source.to(target.dtype))

    def folded_weight(self, method: type[AdapterMethod]) -> torch.Tensor:
        """The base weight with this layer's update folded in, stored layout and dtype."""
        params = {k: v.detach().float() for k, v in self.adapter_tensors().items()}
        folded = method.fold(self.base_weight().detach().float(), params, self.config)
        if self.fan_in_fan_out:
            folded = folded.t()
        return folded.to(self.base_layer.weight.dtype).contiguous()

    def folded_bias(self, method: type[AdapterMethod]) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None:
            return None
        params = {k: v.detach().float() for k, v in self.adapter_tensors().items()}
        return method.fold_bias(bias.detach().float(), params, self.config).to(bias.dtype)

    def extra_repr(self) -> str:
        return f"weight_name={self.weight_name!r}, in={self.in_features}, out={self.out_features}"


class AdapterMethod:
    """One adapter method: its name, config and layer classes, and its pure fold.

    Subclasses are never instantiated; the registry maps names to the classes.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]
    layer_cls: ClassVar[type[AdapterLayer]]

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        """Return the folded weight. ``weight`` is (out, in) float32; ``params`` are float32."""
        raise NotImplementedError

    @staticmethod
    def fold_bias(bias: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        """Return the folded bias (most methods leave it untouched)."""
        return bias

    # -- model-level hooks, for methods with state shared across layers --------------------
    @classmethod
    def create_layer(cls, base_layer: nn.Module, config: AdapterConfig, weight_name: str,
                     saved: Mapping[str, torch.Tensor] | None = None) -> AdapterLayer:
        """Wrap one base layer. ``saved`` holds its checkpoint tensors when loading, so methods
        whose shapes vary per layer (pruned ranks) can size the layer from them."""
        return cls.layer_cls(base_layer, config, weight_name)

    @classmethod
    def after_inject(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], config: AdapterConfig) -> None:
        """Called once every layer is wrapped (attach shared modules here)."""

    @classmethod
    def detach(cls, model: nn.Module) -> None:
        """Undo ``after_inject`` once the layers are folded (remove shared modules)."""

    @classmethod
    def model_tensors(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra tensors to save that belong to no single layer, keyed ``"<method>::..."``."""
        return {}

    @classmethod
    def load_model_tensors(cls, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``model_tensors`` saved."""

    @classmethod
    def checkpoint_metadata(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """Extra top-level keys for adapter_config.json (``rank_pattern``, say)."""
        return {}

    @classmethod
    def regularization_loss(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """A term to add to the training loss, or None."""
        return None

    @classmethod
    def allocate_ranks(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], step: int) -> None:
        """Called after each optimizer step by rank-allocating methods; a no-op otherwise."""
