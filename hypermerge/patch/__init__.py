"""``hypermerge patch``: adapters folded into exported models (ONNX initializers, TensorRT refit)."""

from hypermerge.patch.api import PatchResult, patch_export

__all__ = ["PatchResult", "patch_export"]
