"""report.json (the parity certificate and latency report): its sections as typed objects, and
writing / reading it with its human form, report.md (rendered by ``report_markdown``)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, ClassVar

# report.md's rendering has its own module; its names stay importable from here (their old home)
from hypermerge.export.report_markdown import (  # noqa: F401
    certificate_lines,
    fp16_lines,
    header_lines,
    int8_lines,
    latency_lines,
    latency_table,
    optimize_lines,
    parity_lines,
    parity_table,
    tensorrt_lines,
    to_markdown,
    weight_only_lines,
)
from hypermerge.runtime.files import MODEL_FILE, REPORT_JSON, REPORT_MD

FORMAT = "hypermerge-export-report"


class Section:
    """A report.json section as a typed object (in the manner of Polygraphy's ``struct.py``): its
    fields, in order, are the JSON's keys; ``OPTIONAL`` fields are left out while None."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The section as report.json holds it (same keys, same order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The section read back from report.json (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclasses.dataclass
class ExportHeader(Section):
    """The report's opening fields: what was exported, from where, by which hypermerge."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("profile",)

    format: str = dataclasses.field(default=FORMAT, kw_only=True)
    format_version: int = dataclasses.field(default=1, kw_only=True)
    hypermerge: str
    created_at: str
    source: dict  # path, weights_sha256
    task: str
    opset: int
    dtype: str = dataclasses.field(default="float32", kw_only=True)
    exporter: str
    model_file: str = dataclasses.field(default=MODEL_FILE, kw_only=True)
    external_data: bool
    inputs: list[dict]
    outputs: list[dict]
    parity: dict | None = None
    latency: dict | None = None
    profile: dict | None = None


@dataclasses.dataclass
class ParitySection(Section):
    """One backend against PyTorch: per-output error statistics and, for causal LMs, greedy decode."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("greedy_decode",)

    passed: bool
    backend: str
    tolerance: dict  # atol, rtol
    shapes: list[dict]
    max_abs_err: float
    max_rel_err: float
    outputs: dict[str, dict]
    greedy_decode_match: bool | None = None
    greedy_decode: dict | None = None


@dataclasses.dataclass
class Int8Section(Section):
    """An encoder's ``quantized`` section: the int8 model's accuracy and speed, kept or not and why."""

    method: str
    file: str
    kept: bool
    accuracy: dict
    bound: dict  # metric, min
    p50_ms: float
    fp32_p50_ms: float
    ratio_to_fp32: float
    ratio_to_torch: float
    reason: str


@dataclasses.dataclass
class WeightOnlySection(Section):
    """A causal LM's ``quantized`` section (``--quantize int4`` / ``int8``, MatMulNBits): next-token
    agreement and greedy decode against PyTorch, decode speed against fp32 ONNX, kept or not and why."""

    kind: str = dataclasses.field(default="weight-only", kw_only=True)  # what to_markdown tells int8's apart by
    scheme: str
    method: str
    file: str
    kept: bool
    details: dict
    accuracy: dict  # top1_agreement, samples, inputs, positions
    bound: dict  # metric, min
    greedy: dict
    decode_tokens_per_s: dict  # new_tokens, batch_<n>: {fp32, quantized}
    speedup_batch_1: float
    reason: str


@dataclasses.dataclass
class Fp16Section(Section):
    """``--quantize fp16``'s ``quantized`` section (any task): the float16 graph's accuracy metric
    against PyTorch fp32 and its bound, its per-output error at fp16's tolerance, for causal LMs the
    greedy agreement length, and its time against fp32 on the export's provider (``timed``: the
    forward, or for causal LMs one decode step); kept or not and why."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("greedy",)

    kind: str = dataclasses.field(default="fp16", kw_only=True)  # what to_markdown tells it apart by
    method: str
    file: str
    kept: bool
    details: dict  # converter, op_block_list, initializers_fp16 / _fp32
    backend: str  # onnxruntime:<provider> it was measured on
    accuracy: dict  # opt.int8_accuracy's dict
    bound: dict  # metric, min
    parity: dict  # compare_outputs against PyTorch fp32 at fp16's tolerance (tolerance included)
    timed: str  # forward or decode_step
    p50_ms: float
    fp32_p50_ms: float
    ratio_to_fp32: float
    ratio_to_torch: float
    reason: str
    greedy: dict | None = None  # causal LMs: quantize.greedy_agreement()


@dataclasses.dataclass
class PatchSection(Section):
    """``hypermerge patch``'s section: the adapter, what it changed, the base checks, what was dropped."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("seconds",)

    adapter: str
    method: str
    format: str
    tensors_changed: int
    initializers_rewritten: int
    unchanged_by_the_fold: list[str]
    base_check: str
    base_content_check: dict
    adapter_sha256: str
    graph: str
    weights_map_built_now: bool
    dropped: list[str]
    seconds: float | None = None


@dataclasses.dataclass
class Timing(Section):
    """One backend's time for one call, in milliseconds over ``runs`` interleaved runs."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int


@dataclasses.dataclass
class ShapeTimings:
    """PyTorch and every backend at one shape: a timing per backend (``torch`` first) and each
    backend's p50 as a ratio to PyTorch's. In the JSON the backends sit beside ``ratio``, one key each."""

    timings: dict[str, Timing]
    ratio: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """The backends by name, then ``ratio`` (report.json's order)."""
        return {**{name: timing.to_dict() for name, timing in self.timings.items()}, "ratio": dict(self.ratio)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeTimings:
        """Read back: every entry with a ``p50_ms`` is a backend."""
        timings = {name: Timing.from_dict(value) for name, value in data.items()
                   if isinstance(value, dict) and "p50_ms" in value}
        return cls(timings, dict(data.get("ratio") or {}))

    def drop(self, name: str) -> None:
        """Forget a backend (its timing and its ratio)."""
        self.timings.pop(name, None)
        self.ratio.pop(name, None)


@dataclasses.dataclass
class LatencySection:
    """The ``latency`` section: the measurement's shape and threads, the forward's timings and, for a
    causal LM, one decode step on a cache of ``seq`` tokens."""

    batch: int
    seq: int
    threads: int
    iterations: int
    forward: ShapeTimings
    decode_step: ShapeTimings | None = None

    def to_dict(self) -> dict[str, Any]:
        """batch, seq, threads, iterations, the forward's backends and ratio, then ``decode_step`` if any."""
        data: dict[str, Any] = {"batch": self.batch, "seq": self.seq, "threads": self.threads,
                                "iterations": self.iterations, **self.forward.to_dict()}
        if self.decode_step is not None:
            data["decode_step"] = self.decode_step.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencySection:
        """The section read back from report.json."""
        step = data.get("decode_step")
        return cls(data["batch"], data["seq"], data["threads"], data["iterations"], ShapeTimings.from_dict(data),
                   ShapeTimings.from_dict(step) if step else None)

    def timing(self, backend: str) -> Timing:
        """The forward's timing on ``backend``."""
        return self.forward.timings[backend]

    def drop_backend(self, name: str) -> None:
        """Remove a backend that was not kept (from the forward and the decode step)."""
        self.forward.drop(name)
        if self.decode_step is not None:
            self.decode_step.drop(name)


@dataclasses.dataclass
class TensorRTSection(Section):
    """The ``tensorrt`` section: how ``model.engine`` was built and, once checked, its parity."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("parity", "reverified")

    version: str
    precision: str
    flags: list[str]
    profile: dict  # min / opt / max shapes
    input_shapes: dict[str, list[list[int]]]
    engine: str
    timing_cache: str
    parity: dict | None = None
    reverified: str | None = None


@dataclasses.dataclass
class WeightsMapSection(Section):
    """The ``weights_map`` section: how much of the source the map located (``WeightsMap.summary``'s
    counts), or, where the map could not be built, ``file`` None and the ``error``."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("tensors", "mapped", "locations", "transforms", "shared_initializers",
                                           "constant_tensors", "unmapped", "error")

    file: str | None
    tensors: int | None = None
    mapped: int | None = None
    locations: int | None = None
    transforms: dict[str, int] | None = None
    shared_initializers: int | None = None
    constant_tensors: list[str] | None = None
    unmapped: list[dict] | None = None  # weight, reason: what ``hypermerge patch`` refuses to change
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> WeightsMapSection:
        """The section of a map that could not be built (the export goes on without it)."""
        return cls(None, error=error)


def utc_now() -> str:
    """The time a report records (created_at, verified_at, patched_at): UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def io_spec(session) -> tuple[list[dict], list[dict]]:
    """A session's inputs and outputs as the report lists them (name, dtype, shape)."""
    def spec(values):
        return [{"name": v.name, "dtype": v.type.removeprefix("tensor(").rstrip(")"), "shape": list(v.shape)}
                for v in values]

    return spec(session.get_inputs()), spec(session.get_outputs())


def write_report(out_dir: Path, report: dict) -> None:
    """Write both files, each replaced atomically (verify rewrites them in place)."""
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2) + "\n"), (REPORT_MD, to_markdown(report))):
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def read_report(out_dir: Path) -> dict | None:
    path = out_dir / REPORT_JSON
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    return report if isinstance(report, dict) else None
