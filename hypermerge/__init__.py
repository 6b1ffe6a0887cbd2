"""hypermerge: adapters (HyperAdapt, LoRA, ...) -> folded dense weights -> verified engines.

    import hypermerge as hm
    model = hm.inject(model, hm.HyperAdaptConfig())
    ...train...
    hm.save_adapter(model, "adapter", base_model="path/to/base")
    hm.fold_checkpoint("adapter", "folded")      # or: hypermerge fold --adapter adapter --out folded

    hm.train("train/minilm-sentiment-hyperadapt.yaml", max_steps=100)   # or: hypermerge train RECIPE
"""

from hypermerge._version import __version__
from hypermerge.adapters import (
    METHODS,
    AdapterCheckpoint,
    AdapterConfig,
    AdapterLayer,
    AdapterMethod,
    HyperAdaptConfig,
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
    "METHODS", "AdapterCheckpoint", "AdapterConfig", "AdapterLayer", "AdapterMethod", "AdapterMismatchError",
    "BackendUnavailableError", "CheckpointError", "ConfigError", "ExportError", "FoldResult", "HyperAdaptConfig",
    "HypermergeError", "LoRAConfig", "OutputExistsError", "ParityError", "__version__", "adapter_layers",
    "allocate_ranks", "fold_checkpoint", "fold_model", "get_method", "inject", "inspect_adapter", "load_adapter",
    "rank_pattern", "read_adapter", "regularization_loss", "save_adapter", "trainable_parameters",
    "Recipe", "TrainResult", "load_recipe", "train",
]

_TRAINING_NAMES = ("Recipe", "TrainResult", "load_recipe", "train")


def __getattr__(name: str):
    # Training pulls in the transformers Trainer and accelerate: imported on first use only,
    # so `import hypermerge` and `hypermerge fold` stay quick.
    if name in _TRAINING_NAMES:
        from hypermerge import training

        return getattr(training, name)
    raise AttributeError(f"module 'hypermerge' has no attribute {name!r}")
