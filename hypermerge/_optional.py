"""Optional dependencies: which extra brings each, and the one-line error when one is missing.

The core install runs exported models (numpy, onnxruntime via ``[serve]``, tokenizers); training,
folding and exporting need torch and transformers, which come with ``[train]`` or ``[export]``.
"""

from __future__ import annotations

from hypermerge.errors import BackendUnavailableError

# top-level package -> the extra that installs it
EXTRAS = {
    "torch": "export", "transformers": "export", "accelerate": "train", "matplotlib": "train", "onnx": "export",
    "onnxscript": "export", "onnx_ir": "export", "onnxruntime": "serve", "fastapi": "serve", "uvicorn": "serve",
    "starlette": "serve", "pydantic": "serve", "prometheus_client": "serve", "tensorrt": "trt", "peft": "dev",
}


def missing_dependency(exc: ModuleNotFoundError, what: str, extra: str | None = None) -> BackendUnavailableError | None:
    """The error to show for ``exc`` when it is an optional dependency that is not installed, else None.

    Args:
        exc: the failed import.
        what: what needed it ("hypermerge fold"), for the message.
        extra: the extra to name (default: the one that brings the missing package).
    """
    package = (exc.name or "").partition(".")[0]
    if package not in EXTRAS:
        return None
    return BackendUnavailableError(f"{what} needs {package}, which is not installed",
                                   hint=f"pip install 'hypermerge[{extra or EXTRAS[package]}]'")
