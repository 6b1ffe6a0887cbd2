"""hypermerge: adapters (HyperAdapt, LoRA, ...) -> folded dense weights -> verified engines.

    import hypermerge as hm
    model = hm.inject(model, hm.HyperAdaptConfig())
    ...train...
    hm.save_adapter(model, "adapter", base_model="path/to/base")
    hm.fold_checkpoint("adapter", "folded")      # or: hypermerge fold --adapter adapter --out folded
"""

from hypermerge._version import __version__
from hypermerge.adapters import (
    METHODS,
    AdaLoRAConfig,
    AdapterCheckpoint,
    AdapterConfig,
    AdapterLayer,
    AdapterMethod,
    HyperAdaLoRAConfig,
    HyperAdaptConfig,
    HyperLoRAConfig,
    LoRAConfig,
    adapter_layers,
    allocate_ranks,
    fold_model,
    get_method,
    inject,
    load_adapter,
    rank_pattern,
    read_adapter,
    regularization_loss,
    save_adapter,
    set_total_steps,
    trainable_parameters,
)
from hypermerge.errors import (
    AdapterMismatchError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    ExportError,
    HypermergeError,
    OutputExistsError,
    ParityError,
)
from hypermerge.fold import FoldResult, fold_checkpoint
from hypermerge.inspect import inspect_adapter

__all__ = [
    "AdaLoRAConfig", "HyperAdaLoRAConfig", "HyperLoRAConfig", "set_total_steps",
    "METHODS", "AdapterCheckpoint", "AdapterConfig", "AdapterLayer", "AdapterMethod", "AdapterMismatchError",
    "BackendUnavailableError", "CheckpointError", "ConfigError", "ExportError", "FoldResult", "HyperAdaptConfig",
    "HypermergeError", "LoRAConfig", "OutputExistsError", "ParityError", "__version__", "adapter_layers",
    "allocate_ranks", "fold_checkpoint", "fold_model", "get_method", "inject", "inspect_adapter", "load_adapter",
    "rank_pattern", "read_adapter", "regularization_loss", "save_adapter", "trainable_parameters",
]
