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

import importlib

from hypermerge._optional import missing_dependency
from hypermerge._version import __version__
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

# Everything else is imported on first use (PEP 562): the adapters, fold, export and training need
# torch (and transformers), which a serve-only install does not have, and `import hypermerge` stays
# quick. name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(("METHODS", "AdaLoRAConfig", "AdapterCheckpoint", "AdapterConfig", "AdapterLayer",
                     "AdapterMethod", "DoRAConfig", "HyperAdaLoRAConfig", "HyperAdaptConfig", "HyperLoRAConfig",
                     "IA3Config", "LoRAConfig", "adapter_layers", "allocate_ranks", "fold_model", "get_method",
                     "inject", "load_adapter", "rank_pattern", "read_adapter", "regularization_loss",
                     "save_adapter", "set_total_steps", "trainable_parameters"), "hypermerge.adapters"),
    **dict.fromkeys(("ExportResult", "Report", "export_model", "verify_export"), "hypermerge.export"),
    "OnnxModel": "hypermerge.runtime",
    **dict.fromkeys(("FoldResult", "fold_checkpoint"), "hypermerge.fold"),
    "inspect_adapter": "hypermerge.inspect",
    **dict.fromkeys(("PatchResult", "patch_export"), "hypermerge.patch"),
    **dict.fromkeys(("Recipe", "TrainResult", "load_recipe", "train"), "hypermerge.training"),
}
_SUBMODULES = ("adapters", "cli", "errors", "export", "fold", "inspect", "packaged", "patch", "runtime", "serve",
               "training")

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



def __getattr__(name: str):
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:  # torch in a serve-only install
            error = missing_dependency(exc, f"hypermerge.{name}")
            if error is None:
                raise
            raise error from None
        value = getattr(module, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"hypermerge.{name}")
    raise AttributeError(f"module 'hypermerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
