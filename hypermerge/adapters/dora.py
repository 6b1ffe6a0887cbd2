"""DoRA: weight-decomposed low-rank adaptation.

DoRA (Liu et al., arXiv 2402.09353, section 4) splits a weight into a magnitude and a
direction and adapts the direction with LoRA:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖

``m`` holds one value per output row, initialised to the base weight's row norms, ``B`` starts at
zero: the injected model is the base model. The norm is taken per output row of the (out, in)
weight (PEFT's ``lora/dora.py`` computes ``torch.linalg.norm(W + s·BA, dim=1)`` after
transposing GPT-2 ``Conv1D`` weights to (out, in); so do we, which is what lets PEFT's DoRA
adapters fold here unchanged). During training the norm is detached from the graph, as section 4.3
recommends and PEFT does, so no (out x in) gradient flows through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterMethod, ParamSpec
from hypermerge.adapters.lora import LoRAConfig, LoRALayer


@dataclasses.dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """The LoRA hyperparameters (``r``, ``alpha``, ``dropout``, ``use_rslora``); the magnitude
    vector adds ``out`` trainable values per matrix."""

    method = "dora"


def _combined(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s·B A`` for a weight in (out, in) layout, as a fresh tensor.

    Written out of place like PEFT's: for a transposed (Conv1D) weight the sum then takes the
    weight's memory layout, which fixes the order of the row-norm reduction, and with it the
    last bit of the norm.
    """
    return weight + scaling * (lora_b @ lora_a)  # (out, r) @ (r, in)


class DoRALayer(LoRALayer):
    def __init__(self, base_layer: nn.Module, config: DoRAConfig, weight_name: str, rank: int | None = None):
        super().__init__(base_layer, config, weight_name, rank=rank)
        with torch.no_grad():
            norm = torch.linalg.norm(self.base_weight().float(), dim=1)  # (out,)
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitude}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight()
        with torch.no_grad():  # section 4.3: the norm is treated as a constant
            norm = torch.linalg.norm(_combined(weight.float(), self.lora_A.float(), self.lora_B.float(),
                                               self.scaling), dim=1)
        scale = (self.magnitude.float() / norm).to(x.dtype)  # (out,)
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A.to(x.dtype)),
                                      self.lora_B.to(x.dtype))
        y = scale * (self.matmul(x) + update * self.scaling)
        return self.add_bias(y)


class DoRA(AdapterMethod):
    name = "dora"
    config_cls = DoRAConfig
    layer_cls = DoRALayer
    params = (ParamSpec("lora_A", ("r", "in")), ParamSpec("lora_B", ("out", "r")),
              ParamSpec("magnitude", ("out",)))

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        combined = _combined(weight, params["lora_A"], params["lora_B"], config.scaling)  # (out, in)
        norm = torch.linalg.norm(combined, dim=1)  # (out,)
        return combined.mul_((params["magnitude"] / norm)[:, None])

    @classmethod
    def create_layer(cls, base_layer, config, weight_name, saved=None):
        rank = saved["lora_A"].shape[0] if saved is not None and "lora_A" in saved else None
        return DoRALayer(base_layer, config, weight_name, rank=rank)
