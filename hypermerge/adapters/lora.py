"""LoRA: a low-rank additive update.

LoRA (Hu et al., arXiv 2106.09685, section 4.1): ``W' = W + s · B A`` with ``A`` (r x in),
``B`` (out x r), ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, arXiv 2312.03732).
``A`` starts Kaiming-uniform and ``B`` at zero, so the injected model is the base model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, ParamSpec


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Args:
    r: rank of the update.
    alpha: scaling numerator; the update is multiplied by ``alpha / r``.
    dropout: dropout on the adapter branch's input during training.
    use_rslora: scale by ``alpha / sqrt(r)`` instead.
    """

    method = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: LoRAConfig, weight_name: str, rank: int | None = None):
        super().__init__(base_layer, config, weight_name)
        weight = base_layer.weight
        rank = config.r if rank is None else rank
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A.to(x.dtype)),
                                      self.lora_B.to(x.dtype))
        return y + update * self.scaling


class LoRA(AdapterMethod):
    name = "lora"
    config_cls = LoRAConfig
    layer_cls = LoRALayer
    params = (ParamSpec("lora_A", ("r", "in")), ParamSpec("lora_B", ("out", "r")))

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        # (out, r) @ (r, in), then scaled and added in place: the same two roundings as
        # W + s·(B A) (so bit for bit PEFT's merge), without two more (out, in) temporaries.
        update = params["lora_B"] @ params["lora_A"]
        return update.mul_(config.scaling).add_(weight)

    @classmethod
    def create_layer(cls, base_layer, config, weight_name, saved=None):
        rank = saved["lora_A"].shape[0] if saved is not None and "lora_A" in saved else None
        return cls.layer_cls(base_layer, config, weight_name, rank=rank)
