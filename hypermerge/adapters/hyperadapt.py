"""HyperAdapt: a row and a column scaling of each frozen weight.

HyperAdapt (arXiv 2509.18629, section 3) adapts a frozen ``W`` (out x in) as
``W' = diag(a) · W · diag(b)`` with ``a`` in R^out and ``b`` in R^in, both initialised to ones:
``out + in`` trainable values per matrix, yet the update ``W' - W`` is generally of high rank.
The bias is not scaled.

The forward scales activations instead of materialising ``W'``: ``y = a ⊙ (W (b ⊙ x)) + c``.
Gradients for ``a`` and ``b`` are then reductions over tokens, and no (out x in) weight
gradient is ever formed, which is what keeps a step cheaper than LoRA's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, ParamSpec


@dataclasses.dataclass(frozen=True)
class HyperAdaptConfig(AdapterConfig):
    """HyperAdapt has no hyperparameters beyond the targets."""

    method = "hyperadapt"


class HyperAdaptLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: HyperAdaptConfig, weight_name: str):
        super().__init__(base_layer, config, weight_name)
        weight = base_layer.weight
        # Kept in the base dtype only when that is float32; lower precision would make the
        # ones-initialised scales too coarse to learn small changes.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.a = nn.Parameter(torch.ones(self.out_features, device=weight.device, dtype=dtype))  # (out,)
        self.b = nn.Parameter(torch.ones(self.in_features, device=weight.device, dtype=dtype))  # (in,)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.matmul(x * self.b.to(x.dtype))  # W (b ⊙ x), without the bias
        a = self.a.to(h.dtype)
        bias = self.base_layer.bias
        if bias is None:
            return h * a
        # a ⊙ h + c in one pass over the activations instead of a product and then a sum: the
        # elementwise passes are HyperAdapt's whole overhead over the frozen matmul (~4% of a
        # MiniLM training step on the CPU). The bias follows the activations' dtype, as
        # nn.Linear's does under autocast.
        return torch.addcmul(bias.to(h.dtype), h, a)


class HyperAdapt(AdapterMethod):
    name = "hyperadapt"
    config_cls = HyperAdaptConfig
    layer_cls = HyperAdaptLayer
    params = (ParamSpec("a", ("out",)), ParamSpec("b", ("in",)))

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        # (out, 1) * (out, in) * (1, in)
        return params["a"][:, None] * weight * params["b"][None, :]
