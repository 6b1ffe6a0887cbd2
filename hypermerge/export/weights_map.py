"""Building ``weights_map.json`` at export: which ONNX initializer holds each weight of the source
model, and how. The map's data model and JSON are :mod:`hypermerge.runtime.weights_map` (re-exported
here); this module reads the ONNX graph and the source checkpoint to fill it.

Recorded at export so that ``hypermerge patch`` can fold an adapter into an exported model without
re-exporting it. After ``torch.onnx.export(dynamo=True)`` an initializer keeps its parameter's name
only where the graph uses the weight as stored (embeddings, GPT-2's ``Conv1D`` in a ``Gemm``); a
``Linear`` becomes a ``MatMul`` on a constant-folded transpose named ``val_54``, tied weights appear
twice (as stored for the ``Gather``, transposed for the LM head), identical constants are merged
into one initializer (zero biases of a freshly initialised model) and onnxruntime's optimizer may
fuse weights into one. Names are therefore no evidence; contents are. Every floating-point tensor
of the source checkpoint is looked up by its bytes (as stored, cast to the initializer's dtype) and
by the bytes of its transpose; what is still unmatched is searched as a block of a larger
initializer (fused Q/K/V) and as a scalar multiple of one (a scale folded into a weight).

Each location is ``{"weight", "initializer", "transform", "slice", "scale"}``: the initializer,
restricted to ``slice`` (``[[start, stop], ...]`` per axis, or null for all of it), equals
``scale · transform(weight)`` with ``transform`` ``identity`` or ``transpose``. A tensor may have
several locations (tied weights) and an initializer may hold several tensors (merged constants):
patch writes every location of a changed tensor, and refuses when the tensors sharing an
initializer would need different values. Tensors whose values are all equal (a zero bias) cannot
be told apart by content: they are located only through the exporter's record of which module
each node comes from, and flagged ``constant``. What cannot be located is listed under
``unmapped`` with the reason, and patch refuses to change it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from hypermerge.errors import CheckpointError, ExportError, HypermergeError
from hypermerge.fold.hfdir import open_base
from hypermerge.runtime.model import MODEL_FILE

# the data model and its JSON are the runtime's (numpy only); re-exported for the exporter and patch
from hypermerge.runtime.weights_map import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    IDENTITY,
    TRANSPOSE,
    WEIGHTS_MAP_FILE,
    Location,
    WeightsMap,
    check_adapter_base,
    digest_of,
    read_weights_map,
    write_weights_map,
)

# the relative agreement a scaled copy must show (float32 rounding of one multiply per element)
_SCALE_RTOL = 2e-6
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


# -- initializers -------------------------------------------------------------------------------

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
        """The initializer's values (a fresh array; writing to it changes nothing on disk)."""
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


def _consumer_scopes(model) -> tuple[dict[str, set[str]], set[str] | None]:
    """initializer -> module paths of the nodes that read it, and every module path in the graph
    (None when the exporter recorded none: then nothing can be said about unused tensors)."""
    consumers: dict[str, set[str]] = {}
    every: set[str] = set()
    names = {t.name for t in model.graph.initializer}
    recorded = False
    for node in model.graph.node:
        raw = next((p.value for p in node.metadata_props if p.key == _SCOPES_KEY), None)
        scopes: set[str] = set()
        if raw:
            recorded = True
            try:
                scopes = {s for s in ast.literal_eval(raw) if isinstance(s, str) and s}
            except (ValueError, SyntaxError):
                scopes = set()
        every |= scopes
        for name in node.input:
            if name in names:
                consumers.setdefault(name, set()).update(scopes)
    return consumers, (every if recorded else None)


def _in_scope(module: str, scopes: set[str]) -> bool:
    # the export wrapper adds a prefix ("model." for the task wrapper's attribute)
    return any(s == module or s.endswith("." + module) for s in scopes)


# -- building the map -------------------------------------------------------------------------

def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _source_tensors(source_dir: Path) -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray | None]]:
    """(name, safetensors dtype, shape, float32 values or None for integer tensors) for every tensor
    of the source checkpoint, one at a time."""
    base = open_base(source_dir)
    for shard in base.shards:
        with safe_open(str(shard), framework="pt") as handle:
            for name in base.headers[shard].entries:
                tensor = handle.get_tensor(name)
                values = tensor.to(torch.float32).numpy() if tensor.is_floating_point() else None
                yield name, base.dtypes[name], base.shapes[name], values


def _find_block(big: np.ndarray, small: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Where ``small`` sits inside ``big`` as a contiguous block along one axis (a fused Q/K/V)."""
    if big.ndim != 2 or small.ndim != 2 or small.size == 0:
        return None
    for axis in (0, 1):
        other = 1 - axis
        if big.shape[other] != small.shape[other] or big.shape[axis] <= small.shape[axis]:
            continue
        n = small.shape[axis]
        line = big[0] if axis == 1 else big[:, 0]  # runs along ``axis``
        first = small[0, 0]
        for start in np.flatnonzero(line[: big.shape[axis] - n + 1] == first):
            start = int(start)
            block = big[:, start:start + n] if axis == 1 else big[start:start + n, :]
            if np.array_equal(block, small):
                return ((0, big.shape[0]), (start, start + n)) if axis == 1 else ((start, start + n), (0, big.shape[1]))
    return None


def _scale_of(held: np.ndarray, value: np.ndarray) -> float | None:
    """s if ``held == s · value`` to float32 rounding (s ≠ 1), else None. Checked on a few elements
    first, so comparing one weight with many same-shaped initializers stays cheap."""
    flat_v, flat_h = value.ravel(), held.ravel()
    pivot = int(np.argmax(np.abs(flat_v)))
    if flat_v[pivot] == 0:
        return None
    scale = float(flat_h[pivot]) / float(flat_v[pivot])
    if scale == 1.0 or scale == 0.0 or not np.isfinite(scale):
        return None
    probe = np.linspace(0, flat_v.size - 1, num=min(16, flat_v.size)).astype(np.int64)
    bound = _SCALE_RTOL * np.abs(flat_h[probe]) + 1e-30
    if not np.all(np.abs(flat_h[probe] - np.float32(scale) * flat_v[probe]) <= bound):
        return None
    if not np.allclose(flat_h, np.float32(scale) * flat_v, rtol=_SCALE_RTOL, atol=0):
        return None
    return scale


def build_weights_map(onnx_path: Path, source_dir: Path, *, source_sha256: str | None = None) -> WeightsMap:
    """Locate every floating-point tensor of ``source_dir`` among the initializers of ``onnx_path``.

    Args:
        onnx_path: the exported ``model.onnx`` (external data next to it).
        source_dir: the HF model directory it was exported from.
        source_sha256: the source's ``weights_sha256`` as recorded in the report.

    Returns:
        The map; tensors found nowhere are in ``unmapped`` with the reason.

    Raises:
        ExportError: the ONNX model cannot be read.
        CheckpointError: the source's weights cannot be read.
    """
    onnx_path, source_dir = Path(onnx_path), Path(source_dir)
    model = load_onnx_graph(onnx_path)
    inits = Initializers(model, onnx_path.parent)
    consumers, every_scope = _consumer_scopes(model)
    by_content: dict[tuple, list[str]] = {}
    for name in inits.float_names:
        array = inits.array(name)
        by_content.setdefault((array.dtype.str, array.shape, _digest(array)), []).append(name)
    dtypes = {inits.dtype(n).str for n in inits.float_names} or {np.dtype(np.float32).str}

    fingerprint, sha256, locations, unmapped, constants = {}, {}, {}, {}, {}
    leftovers: list[tuple[str, np.ndarray]] = []
    for name, stored_dtype, shape, values in _source_tensors(source_dir):
        fingerprint[name] = (tuple(shape), stored_dtype)
        if values is None:
            unmapped[name] = "not a floating-point tensor (an index buffer), never patched"
            continue
        sha256[name] = _digest(values)
        found: list[Location] = []
        for dtype in sorted(dtypes):
            cast = values.astype(np.dtype(dtype), copy=False)
            forms = [(IDENTITY, cast)] + ([(TRANSPOSE, np.ascontiguousarray(cast.T))] if cast.ndim == 2 else [])
            for transform, form in forms:
                key = (form.dtype.str, form.shape, sha256[name] if form is values else _digest(form))
                found += [Location(name, init, transform) for init in by_content.get(key, [])]
        constant = values.size > 0 and bool(np.all(values.ravel() == values.ravel()[0]))
        if constant:
            # equal values say nothing about which initializer is which: keep only those read by a
            # node of this tensor's own module, and flag them
            constants[name] = float(values.ravel()[0])
            module = name.rpartition(".")[0]
            scoped = [dataclasses.replace(loc, constant=True) for loc in found
                      if _in_scope(module, consumers.get(loc.initializer, set()))]
            if scoped:
                locations[name] = scoped
            elif every_scope is not None and not _in_scope(module, every_scope):
                unmapped[name] = "not used by the exported graph (no node comes from its module)"
            else:
                unmapped[name] = (f"its values are all equal ({constants[name]:g}) and no initializer read by a "
                                  f"node of {module or 'its module'} holds them (exporters drop zero biases and "
                                  "merge equal constants): cannot tell where it is")
        elif found:
            locations[name] = found
        else:
            leftovers.append((name, values))

    for name, values in leftovers:
        found = _search_transformed(name, values, inits)
        if found:
            locations[name] = found
            continue
        module = name.rpartition(".")[0]
        if every_scope is not None and not _in_scope(module, every_scope):
            unmapped[name] = "not used by the exported graph (no node comes from its module)"
        else:
            unmapped[name] = ("no initializer holds it, its transpose, a block of either (fused weights) or a "
                              "multiple of either: the exporter or optimizer transformed it")
    return WeightsMap(model_file=onnx_path.name,
                      source={"path": str(source_dir.absolute()), "weights_sha256": source_sha256},
                      fingerprint=fingerprint, sha256=sha256, locations=locations, unmapped=unmapped,
                      constants=constants)


def _search_transformed(name: str, values: np.ndarray, inits: Initializers) -> list[Location]:
    """The slower searches, for tensors not found as they are: a block of a larger initializer
    (onnxruntime's fused attention weights) or a scalar multiple of one."""
    forms = [(IDENTITY, values)] + ([(TRANSPOSE, np.ascontiguousarray(values.T))] if values.ndim == 2 else [])
    found = []
    for init in inits.float_names:
        shape = inits.shape(init)
        for transform, form in forms:
            if len(shape) != form.ndim:
                continue
            if shape == form.shape:
                scale = _scale_of(inits.array(init).astype(np.float32), form)
                if scale is not None:
                    found.append(Location(name, init, transform, scale=scale))
                    break
            elif form.ndim == 2 and (shape[0] == form.shape[0]) != (shape[1] == form.shape[1]) \
                    and all(s >= f for s, f in zip(shape, form.shape, strict=True)):
                block = _find_block(inits.array(init).astype(np.float32), form.astype(np.float32))
                if block is not None:
                    found.append(Location(name, init, transform, slice=block))
                    break
    return found


def record_weights_map(export_dir: Path, source_dir: Path, source_sha256: str | None) -> dict:
    """Build the map of ``export_dir/model.onnx``, write it beside the model, return the report section.

    A map that cannot be built does not fail the export (the model is as good as without it);
    the section then says why, and ``hypermerge patch`` builds it again or refuses.
    """
    try:
        weights_map = build_weights_map(Path(export_dir) / MODEL_FILE, source_dir, source_sha256=source_sha256)
    except HypermergeError as error:
        return {"file": None, "error": error.one_line()}
    write_weights_map(export_dir, weights_map)
    return weights_map.summary()


def weights_map_markdown(summary: dict) -> list[str]:
    """report.md lines for the ``weights_map`` section."""
    if not summary.get("file"):
        return ["", f"## Weights map: not recorded ({summary.get('error')})"]
    transforms = ", ".join(f"{k} ×{v}" for k, v in sorted(summary["transforms"].items())) or "none"
    lines = ["", f"## Weights map (`{summary['file']}`): {summary['mapped']} of {summary['tensors']} source "
             f"tensors located", "", f"Transforms: {transforms}. Initializers shared by several tensors: "
             f"{summary['shared_initializers']}."]
    unmapped = summary.get("unmapped") or []
    if unmapped:
        lines += ["", "Not located (`hypermerge patch` refuses to change these):", ""]
        lines += [f"- `{entry['weight']}`: {entry['reason']}" for entry in unmapped[:40]]
        if len(unmapped) > 40:
            lines.append(f"- … and {len(unmapped) - 40} more (see {summary['file']})")
    return lines
