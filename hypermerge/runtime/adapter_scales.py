"""Per-call adapters on an export made with ``--adapter-inputs``: the packed ``adapter_scales``
input's layout (``adapter_inputs.json``) and the vector an adapter checkpoint fills it with.

The graph computes HyperAdapt's ``y = a ⊙ (W (b ⊙ x)) + c`` for every adapted matrix with ``a`` and
``b`` cut out of one float32 vector; the layout says where each sits. Building that vector for an
adapter is numpy; reading the adapter checkpoint is the adapters' own reader, which needs torch
(the ``[export]`` extra): a server with no per-call adapters never reads one. How the graph gets
that input is the exporter's (:mod:`hypermerge.export.adapter_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from hypermerge.errors import AdapterMismatchError, BackendUnavailableError, CheckpointError, ConfigError
from hypermerge.runtime.adapter_base import check_adapter_base
from hypermerge.runtime.files import LAYOUT_FILE
from hypermerge.runtime.weights_map import WeightsMap

INPUT_NAME = "adapter_scales"
FORMAT = "hypermerge-adapter-inputs"
METADATA_KEY = "hypermerge.adapter_inputs"


@dataclasses.dataclass(frozen=True)
class ScaleEntry:
    """Where one matrix's scales sit in the packed vector: ``a`` (out,) then ``b`` (in,)."""

    weight: str  # the base weight's name in the source checkpoint
    a_offset: int
    out_features: int
    b_offset: int
    in_features: int
    bias: bool  # whether the layer adds a bias after the scaling (IA³'s output scaling then cannot apply)


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
    """The packed input's layout; ``adapter_inputs.json`` holds it."""

    input: str
    size: int
    entries: tuple[ScaleEntry, ...]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": 1, "input": self.input, "size": self.size, "dtype": "float32",
                "method": "hyperadapt", "forward": "y = a * (W @ (b * x)) + bias",
                "matrices": [dataclasses.asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping) -> ScaleLayout:
        entries = tuple(ScaleEntry(**e) for e in data["matrices"])
        return cls(str(data["input"]), int(data["size"]), entries)

    def identity(self) -> np.ndarray:
        return np.ones(self.size, dtype=np.float32)

    def by_weight(self) -> dict[str, ScaleEntry]:
        return {e.weight: e for e in self.entries}


def read_layout(export_dir: Path) -> ScaleLayout | None:
    """The layout of an export made with ``--adapter-inputs``, None for any other export.

    Raises:
        CheckpointError: the layout file is damaged.
    """
    path = Path(export_dir) / LAYOUT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return ScaleLayout.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{LAYOUT_FILE} is damaged ({exc})", path=path,
                              hint="re-export with hypermerge export --adapter-inputs") from exc


# a method's tensors for one matrix are torch tensors (as the adapter checkpoint reads them)
def _hyperadapt(params: Mapping, entry: ScaleEntry) -> tuple:
    return params["a"], params["b"]


def _ia3(params: Mapping, entry: ScaleEntry) -> tuple:
    if "l_in" in params:
        return None, params["l_in"]
    if entry.bias:
        raise ConfigError(f"the IA³ adapter scales the output and the bias of {entry.weight}; the adapter inputs "
                          "scale the output before the bias is added, so they cannot carry it",
                          hint="fold it into a copy of the export with hypermerge patch")
    return params["l_out"], None


# method name -> (a, b) from the method's tensors for one matrix; None leaves that side at one
DIAGONAL_METHODS: dict[str, Callable] = {"hyperadapt": _hyperadapt, "ia3": _ia3}


def scales_from_adapter(layout: ScaleLayout, adapter: str | Path, weights_map: WeightsMap | None = None) -> np.ndarray:
    """The packed vector for an adapter checkpoint (hypermerge or PEFT), ones where it adapts nothing.

    Args:
        layout: the export's layout (``adapter_inputs.json``).
        adapter: the adapter directory.
        weights_map: the export's map; with it, an adapter whose recorded base model is a local
            directory is checked to be the export's base by content (see ``check_adapter_base``).

    Raises:
        CheckpointError: the adapter is missing or damaged, or holds NaN/Inf.
        ConfigError: the method's update is not a diagonal scaling (LoRA, DoRA...), or it trains
            whole modules: both need ``hypermerge patch``.
        AdapterMismatchError: it targets a matrix the export has no scales for, sizes differ, or
            its base model differs from the export's.
        BackendUnavailableError: torch is not installed (the checkpoint reader needs it).
    """
    read_adapter, match_suffix = _adapter_reader(adapter)
    checkpoint = read_adapter(adapter)
    method = checkpoint.method.name
    if method not in DIAGONAL_METHODS:
        raise ConfigError(f"a {method} adapter changes the weights themselves; the adapter inputs carry diagonal "
                          f"scalings only ({', '.join(DIAGONAL_METHODS)})", path=checkpoint.path,
                          hint="fold it into a copy of the export with hypermerge patch")
    if checkpoint.full_tensors():
        raise ConfigError(f"the adapter trains whole modules ({', '.join(sorted(checkpoint.full_tensors())[:3])}), "
                          "which the adapter inputs cannot carry", path=checkpoint.path,
                          hint="fold it into a copy of the export with hypermerge patch")
    entries = layout.by_weight()
    names = list(entries)
    matched = {}
    for target in checkpoint.targets:
        match = match_suffix(target, names)
        if match is None:
            raise AdapterMismatchError(f"the adapter adapts {target}, which this export has no scales for",
                                       path=checkpoint.path,
                                       hint="use an adapter made for this export's base model, or hypermerge patch")
        matched[target] = match
    if weights_map is not None:
        check_adapter_base(checkpoint, weights_map, list(matched.values()))
    vector = layout.identity()
    for target, match in matched.items():
        entry = entries[match]
        a, b = DIAGONAL_METHODS[method](checkpoint.layer_params(target), entry)
        for side, values, offset, size in (("a", a, entry.a_offset, entry.out_features),
                                           ("b", b, entry.b_offset, entry.in_features)):
            if values is None:
                continue
            if tuple(values.shape) != (size,):
                raise AdapterMismatchError(f"the adapter's {side} for {target} has shape {tuple(values.shape)}, the "
                                           f"export needs ({size},)", path=checkpoint.path,
                                           hint="the adapter was made for a model with other layer sizes")
            array = values.float().numpy()
            if not np.isfinite(array).all():
                raise CheckpointError(f"the adapter's {side} for {target} holds NaN or Inf", path=checkpoint.weights_path,
                                      hint="the adapter is corrupt or training diverged")
            vector[offset:offset + size] = array
    return vector


def _adapter_reader(adapter: str | Path) -> tuple[Callable, Callable]:
    """The adapters' own checkpoint reader and name matcher (``read_adapter``, ``match_suffix``).

    Imported on use: they need torch, which a serve-only install lacks and which serving without
    per-call adapters never needs.

    Raises:
        BackendUnavailableError: torch is not installed.
    """
    try:
        from hypermerge.adapters.checkpoint import read_adapter
        from hypermerge.adapters.targets import match_suffix
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch", "transformers"):
            raise
        raise BackendUnavailableError(f"reading a per-call adapter needs {exc.name}, which is not installed",
                                      path=Path(adapter), hint="pip install 'hypermerge[export]' (serving "
                                      "without per-call adapters needs no torch)") from None
    return read_adapter, match_suffix


class AdapterScalesCache:
    """Packed vectors by adapter directory, so a server resolves an adapter once, not per request.

    Keyed by the resolved path and the modification times of the adapter's two files: an adapter
    re-saved in place is read again. Least recently used entries are dropped beyond ``size``.
    Safe to share between threads.
    """

    def __init__(self, layout: ScaleLayout, size: int = 64, weights_map: WeightsMap | None = None):
        self.layout, self.size, self.weights_map = layout, size, weights_map
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._identity = layout.identity()
        self.loads = 0  # how many adapters were read from disk (the rest were cache hits)

    def get(self, adapter: str | Path | None) -> np.ndarray:
        """The vector for ``adapter`` (the identity for None). Do not modify the returned array."""
        if adapter is None:
            return self._identity
        path = Path(adapter).resolve()
        key = (str(path), *(_mtime(path / name) for name in ("adapter_config.json", "adapter_model.safetensors")))
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
                return vector
        vector = scales_from_adapter(self.layout, path, self.weights_map)
        vector.setflags(write=False)
        with self._lock:
            self.loads += 1
            self._entries[key] = vector
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return vector


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1
