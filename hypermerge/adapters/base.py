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
import math
import re
import sys
import types
import typing
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
        # Types first: the range checks of ``problems`` compare values, which a string or a list
        # read from an edited adapter_config.json would turn into a TypeError.
        problems = self.type_problems() or self.problems()
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

    def type_problems(self) -> list[str]:
        """Every field whose value is not of its declared type (or is a non-finite float)."""
        hints = typing.get_type_hints(type(self))
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _matches(value, hints[field.name]):
                problems.append(f"{field.name} must be {_type_name(hints[field.name])}, got {value!r}")
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


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value read from JSON/YAML fits its field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value)
    return True  # a type this check does not know: the method's own problems() judges it


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(hint, str(hint))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One tensor a method saves per adapted weight: its key and its shape in named dimensions.

    Dimensions are ``"out"`` and ``"in"`` (of the weight, in (out, in) layout) and ``"r"`` (a
    rank the checkpoint decides, the same for every tensor of one weight). Specs sharing a
    ``group`` are alternatives: exactly one of them is saved (IA³ saves ``l_in`` or ``l_out``).
    Checkpoints are validated against these declarations before fold or patch writes anything,
    and a contract test checks every layer's ``adapter_tensors()`` against them.
    """

    key: str
    dims: tuple[str, ...]
    group: str | None = None


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
    params: ClassVar[tuple[ParamSpec, ...]] = ()  # what each adapted weight saves (see ParamSpec)

    @classmethod
    def rank_range(cls, config: AdapterConfig) -> tuple[int, int | None]:
        """The smallest and largest ``"r"`` a checkpoint of this method may hold (None: no bound)."""
        return 1, None

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
    def learning_rate_multipliers(cls, model: nn.Module) -> dict[str, float]:
        """Parameter name prefix -> multiple of the recipe's learning rate (none by default)."""
        return {}

    @classmethod
    def allocate_ranks(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], step: int) -> None:
        """Called after each optimizer step by rank-allocating methods; a no-op otherwise."""
