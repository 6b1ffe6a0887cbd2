"""IA³: one learned scaling vector per adapted weight.

IA³ (Liu et al., arXiv 2205.05638, section 3.3) rescales activations with learned vectors
initialised to ones. It is HyperAdapt's one-sided relative: HyperAdapt learns both a row and a
column scaling (``diag(a)·W·diag(b)``), IA³ learns one of the two:

* a **feedforward** module (the second FFN projection in the paper) scales its *input*:
  ``y = W (l ⊙ x) + c``, fold ``W' = W · diag(l)``, bias unchanged;
* any other module (keys and values in the paper) scales its *output*:
  ``y = l ⊙ (W x + c)``, fold ``W' = diag(l) · W`` **and** ``c' = l ⊙ c``, the one method whose
  fold changes the bias (``fold_bias``).

The two cases are told apart by the saved tensor's name (``l_in`` or ``l_out``), so a fold needs
neither the model nor the config's module lists. PEFT's IA³ adapters map onto this exactly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, ParamSpec


@dataclasses.dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """Args:
    feedforward_modules: which targets scale their input instead of their output: None for
        none, module-name suffixes (``["down_proj"]``), or a regex on the full module name.
    """

    method = "ia3"

    feedforward_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, list):
            object.__setattr__(self, "feedforward_modules", tuple(self.feedforward_modules))
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = super().problems()
        value = self.feedforward_modules
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                problems.append(f"feedforward_modules {value!r} is not a valid regex ({exc})")
        elif value is not None and not all(isinstance(v, str) and v for v in value):
            problems.append("feedforward_modules must be None, a regex string or a list of module names")
        return problems

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``module_name`` scales its input (matched like ``target_modules``: a regex
        on the full name, or names matched exactly or as a suffix at a dot boundary).

        Args:
            module_name: the full module name (``model.layers.0.mlp.down_proj``).

        Returns:
            True for a feedforward module.
        """
        value = self.feedforward_modules
        if value is None:
            return False
        if isinstance(value, str):
            return re.fullmatch(value, module_name) is not None
        return any(module_name == v or module_name.endswith("." + v) for v in value)


class IA3Layer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: IA3Config, weight_name: str, feedforward: bool | None = None):
        super().__init__(base_layer, config, weight_name)
        if feedforward is None:
            feedforward = config.is_feedforward(weight_name.removesuffix(".weight"))
        self.feedforward = feedforward
        weight = base_layer.weight
        # float32 for half-precision bases, as HyperAdapt does: ones in fp16 are too coarse to learn.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        size = self.in_features if feedforward else self.out_features
        self.scale = nn.Parameter(torch.ones(size, device=weight.device, dtype=dtype))  # (in,) or (out,)

    @property
    def key(self) -> str:
        return "l_in" if self.feedforward else "l_out"

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {self.key: self.scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        if self.feedforward:
            return self.add_bias(self.matmul(x * scale))
        return self.add_bias(self.matmul(x)) * scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scales={'input' if self.feedforward else 'output'}"


class IA3(AdapterMethod):
    name = "ia3"
    config_cls = IA3Config
    layer_cls = IA3Layer
    params = (ParamSpec("l_in", ("in",), group="scale"), ParamSpec("l_out", ("out",), group="scale"))

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        if "l_in" in params:
            return weight * params["l_in"][None, :]  # (out, in) * (1, in)
        return params["l_out"][:, None] * weight  # (out, 1) * (out, in)

    @staticmethod
    def fold_bias(bias: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        if "l_out" in params:
            return bias * params["l_out"]
        return bias

    @classmethod
    def create_layer(cls, base_layer, config, weight_name, saved=None):
        feedforward = None if saved is None else "l_in" in saved
        return IA3Layer(base_layer, config, weight_name, feedforward=feedforward)
