"""Building ``weights_map.json`` at export: which ONNX initializer holds each weight of the source
model, and how. The map's data model and JSON are :mod:`hypermerge.runtime.weights_map`, the
base check :mod:`hypermerge.runtime.adapter_base`, the graph reader
:mod:`hypermerge.export.onnx_initializers` and the report lines
:mod:`hypermerge.export.weights_map_report` (all re-exported here); this module matches the source
checkpoint's tensors against the graph's initializers by content to fill the map.

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

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from hypermerge.errors import HypermergeError

# the graph reader, the data model, its JSON, the base check and the report lines live in their own
# modules; re-exported (the noqa lines) for the exporter, patch and callers of the old paths
from hypermerge.export.onnx_initializers import GraphScopes, Initializers, load_onnx_graph  # noqa: F401
from hypermerge.export.report import WeightsMapSection
from hypermerge.export.weights_map_report import weights_map_markdown  # noqa: F401
from hypermerge.fold.hfdir import open_base
from hypermerge.runtime.adapter_base import check_adapter_base  # noqa: F401
from hypermerge.runtime.model import MODEL_FILE
from hypermerge.runtime.weights_map import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    IDENTITY,
    TRANSPOSE,
    WEIGHTS_MAP_FILE,
    Location,
    WeightsMap,
    digest_of,
    read_weights_map,
    write_weights_map,
)

# the relative agreement a scaled copy must show (float32 rounding of one multiply per element)
_SCALE_RTOL = 2e-6
_UNUSED = "not used by the exported graph (no node comes from its module)"


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
    scopes = GraphScopes.of(model)
    index = _ContentIndex.of(inits)
    weights_map = WeightsMap(model_file=onnx_path.name,
                             source={"path": str(source_dir.absolute()), "weights_sha256": source_sha256},
                             fingerprint={}, sha256={}, locations={}, unmapped={}, constants={})
    leftovers: list[tuple[str, np.ndarray]] = []
    for name, stored_dtype, shape, values in _source_tensors(source_dir):
        weights_map.fingerprint[name] = (tuple(shape), stored_dtype)
        if values is None:
            weights_map.unmapped[name] = "not a floating-point tensor (an index buffer), never patched"
            continue
        weights_map.sha256[name] = _digest(values)
        found = index.exact(name, values, weights_map.sha256[name])
        if values.size > 0 and bool(np.all(values.ravel() == values.ravel()[0])):
            _place_constant(weights_map, name, float(values.ravel()[0]), found, scopes)
        elif found:
            weights_map.locations[name] = found
        else:
            leftovers.append((name, values))
    for name, values in leftovers:  # the slower searches, once every exact copy is known
        _place_transformed(weights_map, name, values, inits, scopes)
    return weights_map


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


@dataclasses.dataclass(frozen=True)
class _ContentIndex:
    """The graph's float initializers by content: (dtype, shape, sha256) -> names."""

    by_content: dict[tuple, list[str]]
    dtypes: list[str]  # the initializers' numpy dtypes, each tensor is looked up cast to each

    @classmethod
    def of(cls, inits: Initializers) -> _ContentIndex:
        by_content: dict[tuple, list[str]] = {}
        for name in inits.float_names:
            array = inits.array(name)
            by_content.setdefault((array.dtype.str, array.shape, _digest(array)), []).append(name)
        dtypes = {inits.dtype(n).str for n in inits.float_names} or {np.dtype(np.float32).str}
        return cls(by_content, sorted(dtypes))

    def exact(self, name: str, values: np.ndarray, digest: str) -> list[Location]:
        """Every initializer holding ``values`` (float32, digest ``digest``) or its transpose, as
        stored or cast to the initializers' dtype."""
        found: list[Location] = []
        for dtype in self.dtypes:
            cast = values.astype(np.dtype(dtype), copy=False)
            forms = [(IDENTITY, cast)] + ([(TRANSPOSE, np.ascontiguousarray(cast.T))] if cast.ndim == 2 else [])
            for transform, form in forms:
                key = (form.dtype.str, form.shape, digest if form is values else _digest(form))
                found += [Location(name, init, transform) for init in self.by_content.get(key, [])]
        return found


def _place_constant(weights_map: WeightsMap, name: str, value: float, found: list[Location],
                    scopes: GraphScopes) -> None:
    """A tensor whose values are all equal: equal values say nothing about which initializer is
    which, so keep only those read by a node of this tensor's own module, and flag them."""
    weights_map.constants[name] = value
    module = name.rpartition(".")[0]
    scoped = [dataclasses.replace(loc, constant=True) for loc in found if scopes.reads(loc.initializer, module)]
    if scoped:
        weights_map.locations[name] = scoped
    elif scopes.unused(module):
        weights_map.unmapped[name] = _UNUSED
    else:
        weights_map.unmapped[name] = (f"its values are all equal ({value:g}) and no initializer read by a "
                                      f"node of {module or 'its module'} holds them (exporters drop zero biases "
                                      "and merge equal constants): cannot tell where it is")


def _place_transformed(weights_map: WeightsMap, name: str, values: np.ndarray, inits: Initializers,
                       scopes: GraphScopes) -> None:
    """A tensor found nowhere as it is: a block or a multiple of an initializer, else unmapped."""
    found = _search_transformed(name, values, inits)
    if found:
        weights_map.locations[name] = found
    elif scopes.unused(name.rpartition(".")[0]):
        weights_map.unmapped[name] = _UNUSED
    else:
        weights_map.unmapped[name] = ("no initializer holds it, its transpose, a block of either (fused weights) "
                                      "or a multiple of either: the exporter or optimizer transformed it")


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


def record_weights_map(export_dir: Path, source_dir: Path, source_sha256: str | None) -> WeightsMapSection:
    """Build the map of ``export_dir/model.onnx``, write it beside the model, return the report section.

    A map that cannot be built does not fail the export (the model is as good as without it);
    the section then says why, and ``hypermerge patch`` builds it again or refuses.
    """
    try:
        weights_map = build_weights_map(Path(export_dir) / MODEL_FILE, source_dir, source_sha256=source_sha256)
    except HypermergeError as error:
        return WeightsMapSection.failed(error.one_line())
    write_weights_map(export_dir, weights_map)
    return WeightsMapSection.from_dict(weights_map.summary())
