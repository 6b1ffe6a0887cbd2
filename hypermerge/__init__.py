"""hypermerge: adapters (HyperAdapt, LoRA, DoRA, IA³, ...) -> folded dense weights -> verified engines.

    import hypermerge as hm
    model = hm.inject(model, hm.HyperAdaptConfig())
    ...train...
    hm.save_adapter(model, "adapter", base_model="path/to/base")
    hm.fold_checkpoint("adapter", "folded")      # or: hypermerge fold --adapter adapter --out folded
    hm.export_model("folded", "exported")        # or: hypermerge export folded --out exported
    hm.OnnxModel.load("exported").embed(["..."])
    hm.patch_export("exported", "adapter", "patched")   # or: hypermerge patch exported --adapter adapter --out patched
    hm.train("train/minilm-sentiment-hyperadapt.yaml", max_steps=100)   # or: hypermerge train RECIPE
"""

from hypermerge._version import __version__
from hypermerge.adapters import (
    METHODS,
    AdaLoRAConfig,
    AdapterCheckpoint,
    AdapterConfig,
    AdapterLayer,
    AdapterMethod,
    DoRAConfig,
    HyperAdaLoRAConfig,
    HyperAdaptConfig,
    HyperLoRAConfig,
    IA3Config,
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
from hypermerge.export import ExportResult, OnnxModel, Report, export_model, verify_export
from hypermerge.fold import FoldResult, fold_checkpoint
from hypermerge.inspect import inspect_adapter
from hypermerge.patch import PatchResult, patch_export

__all__ = [
    "AdaLoRAConfig",
    "adapter_layers",
    "AdapterCheckpoint",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterMismatchError",
    "allocate_ranks",
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "DoRAConfig",
    "export_model",
    "ExportError",
    "ExportResult",
    "fold_checkpoint",
    "fold_model",
    "FoldResult",
    "get_method",
    "HyperAdaLoRAConfig",
    "HyperAdaptConfig",
    "HyperLoRAConfig",
    "HypermergeError",
    "IA3Config",
    "inject",
    "inspect_adapter",
    "load_adapter",
    "load_recipe",
    "LoRAConfig",
    "METHODS",
    "OnnxModel",
    "OutputExistsError",
    "ParityError",
    "patch_export",
    "PatchResult",
    "rank_pattern",
    "read_adapter",
    "Recipe",
    "regularization_loss",
    "Report",
    "save_adapter",
    "set_total_steps",
    "train",
    "trainable_parameters",
    "TrainResult",
    "verify_export",
    "__version__",
]

_TRAINING_NAMES = ("Recipe", "TrainResult", "load_recipe", "train")


def __getattr__(name: str):
    # Training pulls in the transformers Trainer and accelerate: imported on first use only,
    # so `import hypermerge` and `hypermerge fold` stay quick.
    if name in _TRAINING_NAMES:
        from hypermerge import training

        return getattr(training, name)
    raise AttributeError(f"module 'hypermerge' has no attribute {name!r}")
