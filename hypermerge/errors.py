"""The one error family. The CLI prints any of these as a single line and exits non-zero;
every other exception is a bug and keeps its traceback."""

from __future__ import annotations

from pathlib import Path


class HypermergeError(Exception):
    """Base of every error a user can act on.

    Args:
        what: what went wrong, in one sentence.
        path: the file or directory concerned, if any.
        hint: what to do about it.
    """

    exit_code = 1

    def __init__(self, what: str, *, path: str | Path | None = None, hint: str | None = None):
        self.what = what
        self.path = Path(path) if path is not None else None
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.what.rstrip(".")
        if self.path is not None:
            text += f" [{self.path}]"
        if self.hint:
            text += f": {self.hint.rstrip('.')}"
        return text + "."


class ConfigError(HypermergeError):
    """A configuration (Python dataclass, YAML recipe, CLI option) is invalid."""

    exit_code = 2


class AdapterMismatchError(HypermergeError):
    """An adapter does not fit the model or base checkpoint it is applied to."""


class CheckpointError(HypermergeError):
    """A file or directory is missing, truncated, of the wrong format, or holds non-finite values."""


class ExportError(HypermergeError):
    """A model could not be exported."""


class ParityError(HypermergeError):
    """An exported or folded model does not reproduce its reference within tolerance."""


class BackendUnavailableError(HypermergeError):
    """An optional backend (TensorRT, CUDA, onnxruntime) is not installed or not usable here."""


class OutputExistsError(HypermergeError):
    """The output location exists and overwriting was not asked for."""
