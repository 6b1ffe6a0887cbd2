"""Putting adapters into a model and taking them out again (in memory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer
from hypermerge.adapters.registry import get_method
from hypermerge.adapters.state import STATE_ATTR, AdapterState, adapter_state
from hypermerge.adapters.targets import select_targets
from hypermerge.errors import ConfigError


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Base weight name -> adapter layer, for every wrapped layer of ``model``."""
    return adapter_state(model).layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _select_saved_modules(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    if not names:
        return []
    chosen = [n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in names)]
    if not chosen:
        raise ConfigError(f"modules_to_save {list(names)} matched no module of {type(model).__name__}")
    return chosen


def inject(model: nn.Module, config: AdapterConfig, *, module_names: Sequence[str] | None = None,
           saved: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> nn.Module:
    """Wrap the target layers of ``model`` with ``config``'s adapter, in place.

    Every parameter that is not part of the adapter (or of ``modules_to_save``) is frozen.
    Right after injection the model computes exactly what it computed before.

    Args:
        model: a transformers model (any ``nn.Module`` with linear layers works).
        config: an adapter config such as ``HyperAdaptConfig()``.
        module_names: exact module names to wrap, instead of ``config.target_modules``
            (used when loading a checkpoint).
        saved: per base-weight-name checkpoint tensors, so layers can be sized from them.

    Returns:
        The same model object.

    Raises:
        ConfigError: the model already has an adapter, or no target matched.
    """
    if adapter_state(model, required=False) is not None:
        raise ConfigError(f"{type(model).__name__} already has a hypermerge adapter",
                          hint="fold it first (hm.fold_model) or start from a fresh model")
    method = get_method(config.method)
    if module_names is None:
        targets = select_targets(model, config.target_modules)
    else:
        targets = [(name, model.get_submodule(name)) for name in module_names]
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    for name, module in targets:
        weight_name = f"{name}.weight"
        layer = method.create_layer(module, config, weight_name,
                                    saved=None if saved is None else saved.get(weight_name))
        _set_submodule(model, name, layer)
        layers[weight_name] = layer
    saved_modules = _select_saved_modules(model, config.modules_to_save)
    for name in saved_modules:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    setattr(model, STATE_ATTR, AdapterState(method, config, layers, saved_modules, requires_grad_before))
    method.after_inject(model, layers, config)
    return model


def fold_model(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers, in place.

    The result is a plain transformers model (``save_pretrained`` works) whose outputs equal
    the adapter model's. Parameters get back the ``requires_grad`` they had before inject.
    """
    state = adapter_state(model)
    with torch.no_grad():
        for layer in state.layers.values():
            base = layer.base_layer
            weight = layer.folded_weight(state.method)
            bias = layer.folded_bias(state.method)
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
    module_names = {id(m): n for n, m in model.named_modules()}
    for layer in state.layers.values():
        _set_submodule(model, module_names[id(layer)], layer.base_layer)
    state.method.detach(model)
    delattr(model, STATE_ATTR)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, True))
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable values (what the optimizer updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The method's training regulariser (AdaLoRA's orthogonality term), 0 for methods without one."""
    state = adapter_state(model)
    loss = state.method.regularization_loss(model, state.layers)
    if loss is None:
        device = next(model.parameters()).device
        return torch.zeros((), device=device)
    return loss


def allocate_ranks(model: nn.Module, step: int) -> None:
    """Run rank allocation for rank-allocating methods (a no-op for the others).

    Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``: the allocator reads
    the gradients. ``hypermerge train`` calls it itself.
    """
    state = adapter_state(model)
    state.method.allocate_ranks(model, state.layers, step)


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Base weight name -> kept rank, for rank-allocating methods ({} for the others)."""
    state = adapter_state(model)
    return dict(state.method.checkpoint_metadata(model, state.layers).get("rank_pattern", {}))
