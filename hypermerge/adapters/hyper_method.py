"""What HyperAdaLoRA and HyperLoRA share on top of :class:`~hypermerge.adapters.hypernetwork.ComponentHypernetwork`:
the config checks, the layer mixin that reads its factors from the network, and the method half that
builds the network at inject and saves / restores it with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer
from hypermerge.adapters.hypernetwork import ComponentHypernetwork, MatrixSpec, matrix_spec
from hypermerge.adapters.state import adapter_state
from hypermerge.errors import AdapterMismatchError, CheckpointError, ConfigError


def hyper_problems(config: AdapterConfig) -> list[str]:
    problems = []
    for name in ("hyper_dim", "hyper_depth", "hyper_heads"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "hyper_depth" else 1):
            problems.append(f"{name} must be a {'non-negative' if name == 'hyper_depth' else 'positive'} "
                            f"integer, got {value!r}")
    if not problems and config.hyper_dim % config.hyper_heads:
        problems.append(f"hyper_dim ({config.hyper_dim}) must be divisible by hyper_heads ({config.hyper_heads})")
    return problems


class HyperLayerMixin:
    """A layer whose factors come from the model's hypernetwork once attached.

    Before ``attach`` (a layer built on its own, as the property tests do) it keeps its own
    parameters and behaves like the plain method; attached, it owns no parameters.
    """

    FACTOR_NAMES: ClassVar[tuple[str, ...]]  # attributes holding the factors while not attached
    FACTOR_KEYS: ClassVar[tuple[str, ...]]  # their names in checkpoints

    def attach(self, net: ComponentHypernetwork, index: int) -> None:
        for name in self.FACTOR_NAMES:
            delattr(self, name)
        # A plain attribute, not a submodule: the hypernetwork belongs to the model, once.
        self.__dict__["hypernetwork"] = net
        self.index = index
        self._expected: dict[str, torch.Tensor] | None = None

    @property
    def attached(self) -> bool:
        return "hypernetwork" in self.__dict__

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.attached:
            return super().load_adapter_tensors(tensors)
        # The hypernetwork is restored afterwards (load_model_tensors); keep the saved factors
        # to check that it reproduces them.
        unexpected = sorted(set(tensors) - set(self.FACTOR_KEYS))
        missing = sorted(set(self.FACTOR_KEYS) - set(tensors))
        if missing or unexpected:
            raise AdapterMismatchError(
                f"{self.weight_name}: adapter tensors differ (missing {missing}, unexpected {unexpected})",
                hint="the checkpoint was written by another method or version")
        self._expected = {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}


class HypernetworkMethod:
    """Model-level hooks of methods whose layers read a shared ``ComponentHypernetwork``.

    The hypernetwork is a submodule of the model named ``<method>_hypernetwork`` (so
    ``model.parameters()``, ``.to()`` and optimizers see it) and is saved as ``<method>::net.*``.
    """

    name: ClassVar[str]
    rank_field: ClassVar[str]  # the config field with the components per matrix ("init_r", "r")
    scalar_head: ClassVar[bool]  # generate λ
    zero_head: ClassVar[str]  # the head that starts at zero: "scalar" (λ) or "cols" (LoRA's B)

    @classmethod
    def build_hypernetwork(cls, specs: list[MatrixSpec], config: AdapterConfig) -> ComponentHypernetwork:
        return ComponentHypernetwork(specs, getattr(config, cls.rank_field), dim=config.hyper_dim,
                                     depth=config.hyper_depth, heads=config.hyper_heads, scalar=cls.scalar_head,
                                     zero_head=cls.zero_head, matrix_rank=getattr(config, "hyper_matrix_rank", 0),
                                     lambda_init=getattr(config, "hyper_lambda_init", "zero"))

    @classmethod
    def attr(cls) -> str:
        return f"{cls.name}_hypernetwork"

    @classmethod
    def hypernetwork(cls, model: nn.Module) -> ComponentHypernetwork:
        net = getattr(model, cls.attr(), None)
        if net is None:
            raise ConfigError(f"the model has no {cls.name} hypernetwork",
                              hint="inject with hm.inject or load with hm.load_adapter")
        return net

    @classmethod
    def after_inject(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], config: AdapterConfig) -> None:
        layer_list = list(layers.values())
        specs = [matrix_spec(name, layer.out_features, layer.in_features) for name, layer in layers.items()]
        net = cls.build_hypernetwork(specs, config)
        first = layer_list[0].base_layer.weight
        net.to(device=first.device)
        model.add_module(cls.attr(), net)
        for index, layer in enumerate(layer_list):
            layer.attach(net, index)

    @classmethod
    def detach(cls, model: nn.Module) -> None:
        if hasattr(model, cls.attr()):
            delattr(model, cls.attr())

    @classmethod
    def checkpoint_metadata(cls, model: nn.Module, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        # What was trained is the hypernetwork (and any module trained in full), not the
        # materialised factors the checkpoint also holds.
        return {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    @classmethod
    def model_tensors(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        net = cls.hypernetwork(model)
        tensors = {f"{cls.name}::net.{k}": v for k, v in net.state_dict().items()}
        tensors[f"{cls.name}::shrunk"] = torch.tensor([net.shrunk])
        return tensors

    @classmethod
    def load_model_tensors(cls, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        net = cls.hypernetwork(model)
        prefix = f"{cls.name}::net."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state and "lambda_offset" not in state and hasattr(net, "lambda_offset"):
            # written before the λ offset existed: its λ head started at zero, without an offset
            state["lambda_offset"] = torch.zeros_like(net.lambda_offset)
        if not state:
            raise CheckpointError(f"the checkpoint has no {cls.name} hypernetwork ({prefix}* tensors), which "
                                  "loading it into a model needs", hint="hypermerge fold works without it; to "
                                  "resume training, use a checkpoint written by hm.save_adapter")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterMismatchError(f"the saved {cls.name} hypernetwork does not fit this model and config "
                                       f"({str(exc).splitlines()[0]})",
                                       hint="load the adapter into the base model it was trained on") from None
        if bool(tensors.get(f"{cls.name}::shrunk", torch.tensor([False])).item()):
            net.shrink()
        net.invalidate()
        layers = adapter_state(model).layers
        for layer in layers.values():
            expected, layer._expected = layer._expected, None
            if expected is None:
                continue
            with torch.no_grad():
                actual = {k: v.detach().to("cpu", torch.float32) for k, v in layer.adapter_tensors().items()}
            for key, saved in expected.items():
                if actual[key].shape != saved.shape:
                    raise AdapterMismatchError(
                        f"{layer.weight_name}::{key}: the hypernetwork generates shape {tuple(actual[key].shape)} "
                        f"but the checkpoint holds {tuple(saved.shape)}",
                        hint="the rank pattern and the saved hypernetwork disagree; the checkpoint was edited")
                scale = float(saved.abs().max()) if saved.numel() else 0.0
                error = float((actual[key] - saved).abs().max()) if saved.numel() else 0.0
                if error > 1e-4 * max(scale, 1e-3):
                    raise CheckpointError(
                        f"the saved {cls.name} hypernetwork does not reproduce the saved {layer.weight_name}::{key} "
                        f"(max difference {error:.3g})",
                        hint="the checkpoint was written by another hypermerge version or edited; "
                             "hypermerge fold still works (it uses the saved factors)")

    @classmethod
    def hypernetwork_parameters(cls, model: nn.Module) -> int:
        return cls.hypernetwork(model).parameter_count()
