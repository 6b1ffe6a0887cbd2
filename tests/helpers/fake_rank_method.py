"""A tiny rank-allocating method, registered by the tests (monkeypatching METHODS), so the
trainer's rank-allocation glue is covered before AdaLoRA / HyperAdaLoRA land.

``y = W x + P (E ⊙ mask ⊙ (Q x))``: an SVD-like update whose ranks are pruned on a linear
budget schedule from ``r`` to ``target_r`` per matrix, reached at step ``total_steps``, by an EMA of
``|E · ∇E|`` kept in a buffer (so resume must restore it). It records every call the trainer
makes, so tests can check when and how often it is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, ParamSpec


@dataclasses.dataclass(frozen=True)
class FakeRankConfig(AdapterConfig):
    method = "fakerank"

    r: int = 4
    target_r: int = 2
    total_steps: int | None = None
    orth_weight: float = 0.1

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0 < self.target_r <= self.r:
            problems.append(f"target_r must be in 1..r, got {self.target_r}")
        if self.total_steps is None or self.total_steps <= 1:
            problems.append(f"total_steps must be an integer > 1, got {self.total_steps!r}")
        return problems


class FakeRankLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: FakeRankConfig, weight_name: str):
        super().__init__(base_layer, config, weight_name)
        r = config.r
        self.P = nn.Parameter(torch.randn(self.out_features, r) * 0.3)  # (out, r)
        self.E = nn.Parameter(torch.zeros(r))  # (r,): zero, so the layer starts as the identity
        self.Q = nn.Parameter(torch.randn(r, self.in_features) * 0.3)  # (r, in)
        self.register_buffer("mask", torch.ones(r))
        self.register_buffer("score", torch.zeros(r))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"P": self.P, "E": self.E * self.mask, "Q": self.Q}

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.P.copy_(tensors["P"])
            self.E.copy_(tensors["E"])
            self.Q.copy_(tensors["Q"])
            self.mask.copy_((tensors["E"] != 0).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(x, self.Q) * (self.E * self.mask), self.P)
        return self.base_layer(x) + update


class FakeRank(AdapterMethod):
    name = "fakerank"
    config_cls = FakeRankConfig
    layer_cls = FakeRankLayer
    params = (ParamSpec("P", ("out", "r")), ParamSpec("E", ("r",)), ParamSpec("Q", ("r", "in")))

    # What the trainer did, for the tests: (step, every E has a gradient) per allocation, and
    # the regulariser values returned.
    allocations: ClassVar[list[tuple[int, bool]]] = []
    regularizers: ClassVar[list[float]] = []

    @staticmethod
    def fold(weight, params, config):
        return weight + params["P"] @ (params["E"][:, None] * params["Q"])

    @classmethod
    def regularization_loss(cls, model, layers):
        weight = next(iter(layers.values())).config.orth_weight
        total = 0.0
        for layer in layers.values():
            eye = torch.eye(layer.P.shape[1])
            total = total + ((layer.P.T @ layer.P - eye) ** 2).sum() + ((layer.Q @ layer.Q.T - eye) ** 2).sum()
        loss = weight * total / len(layers)
        cls.regularizers.append(float(loss.detach()))
        return loss

    @classmethod
    def allocate_ranks(cls, model, layers, step):
        config = next(iter(layers.values())).config
        cls.allocations.append((step, all(layer.E.grad is not None for layer in layers.values())))
        with torch.no_grad():
            for layer in layers.values():
                if layer.E.grad is not None:
                    layer.score.mul_(0.8).add_(0.2 * (layer.E * layer.E.grad).abs() + 1e-6 * layer.E.grad.abs())
            start, end = config.r * len(layers), config.target_r * len(layers)
            budget = round(start - (start - end) * min(step / config.total_steps, 1.0))
            scores = torch.cat([layer.score for layer in layers.values()])
            keep = torch.zeros_like(scores)
            keep[torch.argsort(scores, descending=True, stable=True)[:budget]] = 1.0
            for i, layer in enumerate(layers.values()):
                layer.mask.copy_(keep[i * config.r:(i + 1) * config.r])

    @classmethod
    def checkpoint_metadata(cls, model, layers):
        return {"rank_pattern": {name: int(layer.mask.sum()) for name, layer in layers.items()}}
