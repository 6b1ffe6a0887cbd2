"""Reading an exported ONNX graph without loading its weights: the float initializers as numpy
arrays (inline ones from the protobuf, external ones from their data file at the recorded offset,
never the whole file), and which modules of the source model read each one.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np

from hypermerge.errors import CheckpointError, ExportError

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


class Initializers:
    """An ONNX model's float initializers as numpy arrays, read lazily: inline ones from the
    protobuf, external ones from their data file at the recorded offset (never the whole file)."""

    def __init__(self, model, directory: Path):
        from onnx import TensorProto, helper

        self.model, self.directory = model, Path(directory)
        self.tensors = {t.name: t for t in model.graph.initializer}
        self._np_dtype = {}
        for name, tensor in self.tensors.items():
            if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                self._np_dtype[name] = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))

    @property
    def float_names(self) -> list[str]:
        return list(self._np_dtype)

    def dtype(self, name: str) -> np.dtype:
        return self._np_dtype[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[name].dims)

    def external(self, name: str) -> dict[str, str] | None:
        """``{"location", "offset", "length"}`` for a tensor stored outside the protobuf, else None."""
        from onnx import TensorProto

        tensor = self.tensors[name]
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        return {entry.key: entry.value for entry in tensor.external_data}

    def array(self, name: str) -> np.ndarray:
        """The initializer's values (a fresh array; writing to it changes nothing on disk).

        Raises:
            CheckpointError: its external data file is missing or truncated.
        """
        from onnx import numpy_helper

        tensor, dtype, shape = self.tensors[name], self._np_dtype[name], self.shape(name)
        info = self.external(name)
        if info is None:
            if tensor.raw_data:
                return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape).copy()
            return numpy_helper.to_array(tensor).copy()
        path = self.directory / info["location"]
        count = int(np.prod(shape, dtype=np.int64))
        try:
            with path.open("rb") as handle:
                handle.seek(int(info.get("offset", 0)))
                values = np.fromfile(handle, dtype=dtype, count=count)
        except OSError as exc:
            raise CheckpointError(f"cannot read the ONNX model's external weights ({exc.strerror})", path=path,
                                  hint="the export is incomplete; re-export it") from exc
        if values.size != count:
            raise CheckpointError(f"the external weights of {name} are truncated", path=path,
                                  hint="the export is incomplete; re-export it")
        return values.reshape(shape)


def load_onnx_graph(path: Path):
    """The ONNX model at ``path`` with external data left on disk (initializers read lazily).

    Raises:
        ExportError: missing or not an ONNX model.
    """
    import onnx

    if not Path(path).is_file():
        raise ExportError("ONNX model not found", path=path, hint="export it first with hypermerge export")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"not a readable ONNX model ({str(exc).splitlines()[0][:200]})", path=path,
                          hint="re-export it with hypermerge export") from exc


@dataclasses.dataclass(frozen=True)
class GraphScopes:
    """Which modules of the source model the graph's nodes come from, as the exporter recorded.

    ``consumers``: initializer -> module paths of the nodes that read it. ``every``: every module
    path in the graph, or None when the exporter recorded none (then nothing can be said about
    tensors no node reads).
    """

    consumers: dict[str, set[str]]
    every: set[str] | None

    @classmethod
    def of(cls, model) -> GraphScopes:
        """Read the scopes from the nodes' metadata of an ONNX model."""
        consumers: dict[str, set[str]] = {}
        every: set[str] = set()
        names = {t.name for t in model.graph.initializer}
        recorded = False
        for node in model.graph.node:
            raw = next((p.value for p in node.metadata_props if p.key == _SCOPES_KEY), None)
            recorded = recorded or bool(raw)
            scopes = _parse_scopes(raw)
            every |= scopes
            for name in node.input:
                if name in names:
                    consumers.setdefault(name, set()).update(scopes)
        return cls(consumers, every if recorded else None)

    def reads(self, initializer: str, module: str) -> bool:
        """Whether a node of ``module`` reads ``initializer``."""
        return _in_scope(module, self.consumers.get(initializer, set()))

    def unused(self, module: str) -> bool:
        """Whether no node comes from ``module`` (False when the exporter recorded no scopes)."""
        return self.every is not None and not _in_scope(module, self.every)


def _parse_scopes(raw: str | None) -> set[str]:
    if not raw:
        return set()
    try:
        return {s for s in ast.literal_eval(raw) if isinstance(s, str) and s}
    except (ValueError, SyntaxError):
        return set()


def _in_scope(module: str, scopes: set[str]) -> bool:
    # the export wrapper adds a prefix ("model." for the task wrapper's attribute)
    return any(s == module or s.endswith("." + module) for s in scopes)
