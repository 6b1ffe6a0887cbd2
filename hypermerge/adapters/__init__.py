"""Adapter methods, the protocol they share, and their checkpoints."""

from hypermerge.adapters.adalora import AdaLoRA, AdaLoRAConfig, set_total_steps
from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod
from hypermerge.adapters.checkpoint import AdapterCheckpoint, load_adapter, read_adapter, save_adapter
from hypermerge.adapters.dora import DoRA, DoRAConfig
from hypermerge.adapters.hyperadalora import HyperAdaLoRA, HyperAdaLoRAConfig
from hypermerge.adapters.hyperadapt import HyperAdapt, HyperAdaptConfig
from hypermerge.adapters.hyperlora import HyperLoRA, HyperLoRAConfig
from hypermerge.adapters.ia3 import IA3, IA3Config
from hypermerge.adapters.lora import LoRA, LoRAConfig
from hypermerge.adapters.model import (
    adapter_layers,
    allocate_ranks,
    fold_model,
    inject,
    rank_pattern,
    regularization_loss,
    trainable_parameters,
)
from hypermerge.adapters.registry import METHODS, get_method

__all__ = [
    "AdaLoRA",
    "AdaLoRAConfig",
    "AdapterCheckpoint",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "DoRA",
    "DoRAConfig",
    "HyperAdaLoRA",
    "HyperAdaLoRAConfig",
    "HyperAdapt",
    "HyperAdaptConfig",
    "HyperLoRA",
    "HyperLoRAConfig",
    "IA3",
    "IA3Config",
    "set_total_steps",
    "LoRA", "LoRAConfig", "METHODS", "adapter_layers", "allocate_ranks", "fold_model", "get_method", "inject",
    "load_adapter", "rank_pattern", "read_adapter", "regularization_loss", "save_adapter", "trainable_parameters",
]
