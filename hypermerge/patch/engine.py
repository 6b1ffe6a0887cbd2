"""``hypermerge patch``'s weight-level work: fold an adapter into an exported model's initializers
without exporting again (:func:`fold_into_export`); :mod:`hypermerge.patch.api` writes, checks and
reports the result (``patch_export``).

    EXPORT_DIR (model.onnx + weights_map.json) + ADAPTER_DIR  ──▶  NEW_DIR (same graph, new weights)

1. The adapter (hypermerge or PEFT) is planned against the export's weights map exactly as
   ``hypermerge fold`` plans it against a base checkpoint (``plan_fold``: names, shapes, NaN/Inf,
   dry-run of the fold); the map's fingerprint stands in for the base's safetensors headers. Where
   the adapter's recorded base model is a local directory, the weights it changes are compared
   with the digests recorded at export, so an adapter for another checkpoint of the same
   architecture is refused too.
2. Every weight the adapter changes is read from its initializer (undoing the recorded transpose),
   folded by the typed operation ``hypermerge fold`` streams every weight through
   (``hypermerge.fold.operations``: same float32 math, same single cast to the base's dtype), and
   written back to every initializer that holds it. A weight the map could not locate is refused by name, as is a change to one
   tensor of an initializer the exporter shares between several.
3. NEW_DIR gets the same graph: with external data, ``model.onnx`` is copied byte for byte and the
   data file is copied with the changed byte ranges overwritten; with weights inside the
   protobuf, only the changed initializers' bytes differ.
4. Parity: the patched model runs against the base model with the adapter folded in memory
   (``hm.load_adapter`` + ``hm.fold_model``) on the export's own parity cases (greedy decode
   included for causal LMs). On failure nothing is written: the output is built in a temporary
   sibling, as ``fold`` and ``export`` do.
5. ``--trt``: the export's TensorRT engine (built with REFIT) gets the new weights with
   ``trt.Refitter`` instead of a rebuild, and its parity is checked again (``refit.py``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hypermerge.adapters.base_digest import sample_of
from hypermerge.adapters.checkpoint import AdapterCheckpoint
from hypermerge.adapters.targets import match_suffix
from hypermerge.errors import AdapterMismatchError, ExportError
from hypermerge.export.verification import folded_reference  # noqa: F401 (its old home)
from hypermerge.export.verification import source_dtype as _source_dtype  # compute_changes' name for it
from hypermerge.export.weights_map import (
    WEIGHTS_MAP_FILE,
    Initializers,
    Location,
    WeightsMap,
    build_weights_map,
    check_adapter_base,
    load_onnx_graph,
    read_weights_map,
)
from hypermerge.fold.base_check import NOT_CHECKED, BaseCheck, check_base
from hypermerge.fold.hfdir import BaseCheckpoint
from hypermerge.fold.operations import SaveFullTensor
from hypermerge.fold.plan import FoldPlan, plan_fold
from hypermerge.fold.threads import FOLD_THREADS, torch_threads
from hypermerge.runtime.files import MODEL_FILE


@dataclasses.dataclass
class _Change:
    name: str  # the source tensor
    new: np.ndarray  # float32, the source's stored layout
    locations: list[Location]


def _map_as_base(weights_map: WeightsMap, export_dir: Path) -> BaseCheckpoint:
    """The map's fingerprint in the shape ``plan_fold`` reads a base checkpoint's headers in."""
    shapes = {name: tuple(shape) for name, (shape, _dtype) in weights_map.fingerprint.items()}
    dtypes = {name: dtype for name, (_shape, dtype) in weights_map.fingerprint.items()}
    model = export_dir / weights_map.model_file
    return BaseCheckpoint(export_dir, [], None, shapes, dtypes, {name: model for name in shapes})


def load_map(export_dir: Path, report: dict, source: Path | None) -> tuple[WeightsMap, bool]:
    """The export's weights map; for exports made before maps were recorded, one built now from
    the source model (returns whether it was built).

    Raises:
        ExportError: no map and no source model to build one from.
    """
    weights_map = read_weights_map(export_dir)
    if weights_map is not None:
        return weights_map, False
    recorded = (report.get("source") or {}).get("path")
    source = Path(source or recorded) if (source or recorded) else None
    if source is None or not (source / "config.json").is_file():
        raise ExportError(f"no {WEIGHTS_MAP_FILE} in this export, and no source model to build it from",
                          path=export_dir, hint="re-export the model with this hypermerge, or pass --source MODEL_DIR")
    built = build_weights_map(export_dir / MODEL_FILE, source,
                              source_sha256=(report.get("source") or {}).get("weights_sha256"))
    return built, True


class _Reader:
    """Base tensors in their stored layout (float32), read from the export's initializers."""

    def __init__(self, weights_map: WeightsMap, inits: Initializers):
        self.map, self.inits = weights_map, inits
        self.arrays: dict[str, np.ndarray] = {}

    def initializer(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = self.inits.array(name)
        return self.arrays[name]

    def tensor(self, name: str) -> np.ndarray | None:
        locations = self.map.locations.get(name)
        if locations:
            # an unscaled copy reads back exactly; a scaled one only to float32 rounding
            location = min(locations, key=lambda loc: (loc.scale is not None, loc.slice is not None))
            held = location.window(self.initializer(location.initializer))
            return np.ascontiguousarray(location.decode(held.astype(np.float32)))
        if name in self.map.constants:
            shape, _ = self.map.fingerprint[name]
            return np.full(shape, self.map.constants[name], dtype=np.float32)
        return None


def _unmapped(weights_map: WeightsMap, name: str, what: str) -> ExportError:
    reason = weights_map.unmapped.get(name, "it is not in the weights map")
    return ExportError(f"cannot patch {name}: the export's weights map does not locate it ({reason}); {what}",
                       hint="re-export without --optimize, or fold the adapter and export the folded model")


def compute_changes(checkpoint: AdapterCheckpoint, weights_map: WeightsMap, reader: _Reader, export_dir: Path,
                    progress: bool = True) -> tuple[list[_Change], list[str]]:
    """Plan the adapter against the map and fold every tensor it touches.

    Each tensor is made by the same operation ``hypermerge fold`` runs (``FoldOperation.produce``),
    from the export's own copy of the base tensor, in the source's dtype.

    Returns:
        The tensors whose values change, and those the fold leaves exactly as they were.

    Raises:
        AdapterMismatchError: the adapter does not fit (names, shapes), or adds tensors the graph lacks.
        CheckpointError: NaN/Inf in the adapter or in a folded tensor.
        ExportError: a tensor it changes is not located by the map.
    """
    plan = _plan_against_map(checkpoint, weights_map, export_dir)
    operations = plan.changes(lambda name: _source_dtype(weights_map, name))
    changes, unchanged = [], []
    with torch_threads(FOLD_THREADS):  # the same reasoning as fold: memory-bound work, busy cores
        for operation in tqdm(operations, desc="patch", unit="tensor", disable=not progress, leave=False):
            old = reader.tensor(operation.name)
            if old is None and not isinstance(operation, SaveFullTensor):
                raise _unmapped(weights_map, operation.name, "the adapter changes it")
            new = operation.produce(lambda _name, stored=old: torch.from_numpy(stored), checkpoint).float()
            new = np.ascontiguousarray(new.numpy(), dtype=np.float32)
            if old is not None and np.array_equal(new, old):
                unchanged.append(operation.name)
                continue
            locations = weights_map.locations.get(operation.name)
            if not locations:
                raise _unmapped(weights_map, operation.name, "the adapter changes it")
            changes.append(_Change(operation.name, new, locations))
    return changes, unchanged


def _plan_against_map(checkpoint: AdapterCheckpoint, weights_map: WeightsMap, export_dir: Path) -> FoldPlan:
    """``plan_fold`` with the map standing in for the base; a patch cannot add tensors.

    Raises:
        AdapterMismatchError: the adapter does not fit, or adds tensors the graph lacks.
    """
    try:
        plan = plan_fold(checkpoint, _map_as_base(weights_map, export_dir))
    except AdapterMismatchError as exc:
        # fold's wording names the base and its --base option; here the adapter is the odd one out
        raise AdapterMismatchError(exc.what.replace("the base checkpoint", "the exported model"), path=checkpoint.path,
                                   hint="patch with an adapter trained on the export's base model") from None
    if plan.additions:
        first = sorted(plan.additions)[0]
        raise AdapterMismatchError(f"the adapter adds {len(plan.additions)} tensor(s) the exported model does not have "
                                   f"(first: {first}); a patch keeps the graph as it is", path=checkpoint.path,
                                   hint="fold the adapter and export the folded model")
    return plan


def apply_changes(changes: list[_Change], weights_map: WeightsMap, reader: _Reader) -> dict[str, np.ndarray]:
    """The new value of every initializer the changes touch.

    Raises:
        ExportError: two tensors share an initializer (the exporter merged equal constants, or
            placed them in overlapping blocks) and would need different values there.
    """
    originals = {}
    updated: dict[str, np.ndarray] = {}
    for change in changes:
        for location in change.locations:
            name = location.initializer
            if name not in updated:
                originals[name] = reader.initializer(name)
                updated[name] = originals[name].copy()
            location.window(updated[name])[...] = location.encode(change.new)
    changed = {change.name for change in changes}
    holders = weights_map.holders()
    by_name = {change.name: change for change in changes}
    for name, array in updated.items():
        for tensor in holders.get(name, []):
            for location in weights_map.locations[tensor]:
                if location.initializer != name:
                    continue
                window, before = location.window(array), location.window(originals[name])
                if tensor in changed:
                    expected = location.encode(by_name[tensor].new).astype(array.dtype)
                    if np.array_equal(window, expected):
                        continue
                    others = [t for t in holders[name] if t != tensor and t in changed]
                    raise ExportError(f"{tensor} and {others[0] if others else 'another tensor'} share the ONNX "
                                      f"initializer {name} but the adapter gives them different values",
                                      hint="fold the adapter and export the folded model")
                if not np.array_equal(window, before):
                    writer = next(t for t in holders[name] if t in changed)
                    raise ExportError(f"{writer} shares the ONNX initializer {name} with {tensor} (the exporter "
                                      f"merged equal tensors), and the adapter changes only {writer}",
                                      hint="fold the adapter and export the folded model")
    return updated


def write_onnx(src_dir: Path, dst_dir: Path, model, inits: Initializers, updated: dict[str, np.ndarray],
               model_file: str = MODEL_FILE) -> None:
    """Write the model with ``updated`` initializers into ``dst_dir``; the graph is untouched.

    External data files are copied (``copyfile``: file to file in the kernel) and the changed
    byte ranges overwritten in place: sizes do not change, so every offset in the protobuf stays
    valid and ``model.onnx`` is copied as it is. Inline initializers get new ``raw_data`` and the
    protobuf is serialised again.
    """
    external: dict[str, list[tuple[int, bytes]]] = {}
    inline = False
    for name, array in updated.items():
        info = inits.external(name)
        data = np.ascontiguousarray(array, dtype=inits.dtype(name)).tobytes()
        if info is None:
            tensor = inits.tensors[name]
            for field in ("float_data", "double_data", "int32_data"):
                tensor.ClearField(field)
            tensor.raw_data = data
            inline = True
        else:
            if int(info.get("length", len(data))) != len(data):
                raise ExportError(f"the external data of {name} has an unexpected length", path=src_dir / info["location"],
                                  hint="re-export the model")
            external.setdefault(info["location"], []).append((int(info.get("offset", 0)), data))
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for location in sorted(locations):
        target = dst_dir / location
        shutil.copyfile(src_dir / location, target)
        if location in external:
            fd = os.open(target, os.O_WRONLY)
            try:
                for offset, data in external[location]:
                    os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
    if inline:
        (dst_dir / model_file).write_bytes(model.SerializeToString())
    else:
        shutil.copyfile(src_dir / model_file, dst_dir / model_file)


def source_adapters(report: dict) -> list[str]:
    """The adapters already folded into an export (a patched one), in order."""
    return list((report.get("source") or {}).get("adapters") or [])


def check_export_base(checkpoint: AdapterCheckpoint, weights_map: WeightsMap, reader: _Reader, export_dir: Path,
                      allow_other_base: bool) -> BaseCheck:
    """Compare the export's weights (read from its initializers) with the adapter's record of its base.

    Raises:
        AdapterMismatchError: they differ and ``allow_other_base`` is false.
    """
    available = list(weights_map.fingerprint)
    names = {t: m for t in checkpoint.targets if (m := match_suffix(t, available)) is not None}

    def read_sample(name: str):
        values = reader.tensor(name)
        return None if values is None else sample_of(values)

    try:
        return check_base(checkpoint, export_dir, read_sample, names, allow_other_base=allow_other_base, what="patch")
    except AdapterMismatchError as exc:
        if not weights_map.patches:
            raise
        already = weights_map.patches[-1]["adapter"]
        raise AdapterMismatchError(f"{exc.what}; the export already has the adapter {already} folded in",
                                   path=exc.path, hint="use an export of the adapter's own base model, not a "
                                                       "patched one") from None


@dataclasses.dataclass
class PatchedWeights:
    """An adapter folded into an export's initializers, in memory: what ``patch_export`` writes."""

    weights_map: WeightsMap
    map_built: bool  # the export predates weights maps: this one was built from the source now
    onnx_model: object  # the export's ModelProto (written back with the new initializers, graph unchanged)
    inits: Initializers
    changes: list[_Change]  # the tensors whose values change, and where they live
    unchanged: list[str]  # targeted tensors the fold left exactly as they were
    content_check: BaseCheck
    base_check: str
    updated: dict[str, np.ndarray]  # initializer -> its new value

    @property
    def initializers(self) -> list[str]:
        """The initializers the patch rewrites."""
        return sorted({loc.initializer for change in self.changes for loc in change.locations})

    def release(self) -> None:
        """Let the graph and the arrays go once written (an LLM's weights are large)."""
        self.onnx_model = self.inits = None
        self.updated = {}


def fold_into_export(checkpoint: AdapterCheckpoint, export_dir: Path, report: dict, *,
                     source: str | Path | None, allow_other_base: bool, progress: bool) -> PatchedWeights:
    """Fold the adapter into the export's weights (read from its initializers), checking it fits
    the export's base, before anything is written.

    Raises:
        ExportError: no weights map and no source to build one; a changed tensor is not located by the
            map, or shares an initializer with one it does not change.
        AdapterMismatchError: the adapter does not fit the export (names, shapes, base contents).
        CheckpointError: NaN/Inf in the adapter or a folded tensor.
    """
    weights_map, built = load_map(export_dir, report, Path(source) if source else None)
    onnx_model = load_onnx_graph(export_dir / MODEL_FILE)
    inits = Initializers(onnx_model, export_dir)
    reader = _Reader(weights_map, inits)
    changes, unchanged = compute_changes(checkpoint, weights_map, reader, export_dir, progress)
    content_check = check_export_base(checkpoint, weights_map, reader, export_dir, allow_other_base)
    if content_check.status == NOT_CHECKED:  # no record of the base's content: compare the recorded base's files
        base_check = check_adapter_base(checkpoint, weights_map, [c.name for c in changes])
    else:
        base_check = content_check.detail
    updated = apply_changes(changes, weights_map, reader)
    return PatchedWeights(weights_map, built, onnx_model, inits, changes, unchanged, content_check, base_check, updated)
