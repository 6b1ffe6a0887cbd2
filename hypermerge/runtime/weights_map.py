"""``weights_map.json`` as data: which ONNX initializer holds each weight of the source model, and
how. The map is built at export (:mod:`hypermerge.export.weights_map`, which reads the ONNX graph
and the source checkpoint) and read by ``hypermerge patch`` and by the runtime (to check that a
per-call adapter was trained on the export's base, :mod:`hypermerge.runtime.adapter_base`): this
module is the data model and its JSON, numpy only.

Each location is ``{"weight", "initializer", "transform", "slice", "scale"}``: the initializer,
restricted to ``slice`` (``[[start, stop], ...]`` per axis, or null for all of it), equals
``scale · transform(weight)`` with ``transform`` ``identity`` or ``transpose``. A tensor may have
several locations (tied weights) and an initializer may hold several tensors (merged constants).
Tensors whose values are all equal are located only by the module of the nodes that read them, and
flagged ``constant``. What could not be located is listed under ``unmapped`` with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hypermerge.errors import CheckpointError

WEIGHTS_MAP_FILE = "weights_map.json"
FORMAT = "hypermerge-weights-map"
FORMAT_VERSION = 1
IDENTITY, TRANSPOSE = "identity", "transpose"


@dataclasses.dataclass(frozen=True)
class Location:
    """Where (part of) an initializer holds ``scale · transform(weight)``."""

    weight: str
    initializer: str
    transform: str = IDENTITY
    slice: tuple[tuple[int, int], ...] | None = None
    scale: float | None = None
    constant: bool = False  # located by consumer scope, not by content alone

    def as_dict(self) -> dict:
        out = {"weight": self.weight, "initializer": self.initializer, "transform": self.transform,
               "slice": [list(s) for s in self.slice] if self.slice else None, "scale": self.scale}
        if self.constant:
            out["constant"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Location:
        slc = data.get("slice")
        return cls(data["weight"], data["initializer"], data.get("transform", IDENTITY),
                   tuple(tuple(int(v) for v in s) for s in slc) if slc else None, data.get("scale"),
                   bool(data.get("constant", False)))

    def window(self, array: np.ndarray) -> np.ndarray:
        """The part of the initializer's array this location covers (a view)."""
        if not self.slice:
            return array
        return array[tuple(slice(start, stop) for start, stop in self.slice)]

    def encode(self, stored: np.ndarray) -> np.ndarray:
        """The initializer's values for a weight given in its stored layout."""
        value = stored.T if self.transform == TRANSPOSE else stored
        if self.scale is not None:
            value = value * np.float32(self.scale)
        return value

    def decode(self, held: np.ndarray) -> np.ndarray:
        """The weight in its stored layout from the initializer's values (exact unless scaled)."""
        value = held / np.float32(self.scale) if self.scale is not None else held
        return value.T if self.transform == TRANSPOSE else value


@dataclasses.dataclass
class WeightsMap:
    """The parsed ``weights_map.json``."""

    model_file: str
    source: dict
    fingerprint: dict[str, tuple[tuple[int, ...], str]]  # tensor -> (shape, safetensors dtype)
    sha256: dict[str, str]  # tensor -> sha256 of its values as float32 (to recognise the base)
    locations: dict[str, list[Location]]  # tensor -> where it is
    unmapped: dict[str, str]  # tensor -> why it could not be located
    # tensors whose values are all equal -> that value: patch can fold them (IA³ scales a zero
    # bias to zero) even where they cannot be located, and then has nothing to write
    constants: dict[str, float] = dataclasses.field(default_factory=dict)
    patches: list[dict] = dataclasses.field(default_factory=list)  # adapters already folded in

    def holders(self) -> dict[str, list[str]]:
        """initializer -> the tensors it holds (more than one where the exporter merged constants)."""
        out: dict[str, list[str]] = {}
        for name, locations in self.locations.items():
            for location in locations:
                out.setdefault(location.initializer, [])
                if name not in out[location.initializer]:
                    out[location.initializer].append(name)
        return out

    def to_dict(self) -> dict:
        entries = [loc.as_dict() for locs in self.locations.values() for loc in locs]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_file": self.model_file,
                "source": self.source, "patches": self.patches,
                "fingerprint": {k: [list(s), d] for k, (s, d) in self.fingerprint.items()},
                "sha256": self.sha256, "constants": self.constants, "entries": entries,
                "unmapped": [{"weight": k, "reason": v} for k, v in self.unmapped.items()]}

    def summary(self) -> dict:
        """The report's ``weights_map`` section: counts, transforms, and every unmapped tensor."""
        transforms: dict[str, int] = {}
        for locations in self.locations.values():
            for loc in locations:
                key = loc.transform + (" (slice)" if loc.slice else "") + (" (scaled)" if loc.scale else "")
                transforms[key] = transforms.get(key, 0) + 1
        shared = {k: v for k, v in self.holders().items() if len(v) > 1}
        return {"file": WEIGHTS_MAP_FILE, "tensors": len(self.fingerprint), "mapped": len(self.locations),
                "locations": sum(len(v) for v in self.locations.values()), "transforms": transforms,
                "shared_initializers": len(shared),
                "constant_tensors": sorted(k for k, v in self.locations.items() if any(x.constant for x in v)),
                "unmapped": [{"weight": k, "reason": v} for k, v in self.unmapped.items()]}


def write_weights_map(directory: Path, weights_map: WeightsMap) -> Path:
    """Write ``weights_map.json`` into ``directory`` (replaced atomically)."""
    path = Path(directory) / WEIGHTS_MAP_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(weights_map.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_weights_map(directory: Path) -> WeightsMap | None:
    """The map of an exported directory, or None when it has none (exported before maps existed).

    Raises:
        CheckpointError: the file exists but is damaged or of a newer format.
    """
    path = Path(directory) / WEIGHTS_MAP_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{WEIGHTS_MAP_FILE} has format version {raw['format_version']}, newer than "
                                  f"this hypermerge reads ({FORMAT_VERSION})", path=path, hint="upgrade hypermerge")
        locations: dict[str, list[Location]] = {}
        for entry in raw["entries"]:
            location = Location.from_dict(entry)
            locations.setdefault(location.weight, []).append(location)
        return WeightsMap(
            model_file=raw["model_file"], source=dict(raw.get("source") or {}),
            fingerprint={k: (tuple(v[0]), str(v[1])) for k, v in raw["fingerprint"].items()},
            sha256=dict(raw.get("sha256") or {}), locations=locations,
            unmapped={e["weight"]: e["reason"] for e in raw.get("unmapped", [])},
            constants={k: float(v) for k, v in (raw.get("constants") or {}).items()},
            patches=list(raw.get("patches") or []))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{WEIGHTS_MAP_FILE} is damaged ({exc})", path=path,
                              hint="re-export the model with hypermerge export") from exc


def digest_of(values: np.ndarray) -> str:
    """The content digest the map records: sha256 of the values as float32."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).data).hexdigest()
