"""report.json (the parity certificate and latency report) and its human form, report.md."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from hypermerge.export.weights_map_report import weights_map_markdown
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


def _g(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def _case(case: dict) -> str:
    text = f"{case['batch']}×{case['seq']}"
    if case.get("past"):
        text += f" past {case['past']}"
    if case.get("pad"):
        text += f" pad {case['pad']}"
    return text


def parity_table(parity: dict) -> list[str]:
    """Per-output rows; a causal LM's present_* outputs are folded into one row (their worst)."""
    lines = ["| output | max abs | mean abs | p99 abs | max rel | atol needed | atol allowed | ok |",
             "|---|---|---|---|---|---|---|---|"]
    outputs = parity["outputs"]
    present = {name: s for name, s in outputs.items() if name.startswith("present_")}
    rows = [(name, s) for name, s in outputs.items() if not name.startswith("present_")]
    if present:
        worst = max(present, key=lambda name: present[name]["max_abs"])
        s = dict(present[worst])
        s["passed"] = all(v["passed"] for v in present.values())
        s["mean_abs"] = sum(v["mean_abs"] * v["elements"] for v in present.values()) / max(
            sum(v["elements"] for v in present.values()), 1)
        rows.append((f"present_* ({len(present)}, worst {worst})", s))
    for name, s in rows:
        lines.append(f"| {name} | {_g(s['max_abs'])} | {_g(s['mean_abs'])} | {_g(s['p99_abs'])} | {_g(s['max_rel'])} "
                     f"| {_g(s['needed_atol'])} | {_g(s.get('atol_used'))} | {'yes' if s['passed'] else '**NO**'} |")
    return lines


def latency_table(latency: dict) -> list[str]:
    backends = [key for key in latency if isinstance(latency[key], dict) and "p50_ms" in latency[key]]
    lines = ["| backend | p50 ms | p90 ms | p99 ms | p50 vs torch |", "|---|---|---|---|---|"]
    for name in backends:
        s = latency[name]
        ratio = "1.00×" if name == "torch" else f"{latency.get('ratio', {}).get(name, float('nan')):.2f}×"
        label = "torch eager" if name == "torch" else name
        lines.append(f"| {label} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {ratio} |")
    return lines


def to_markdown(report: dict) -> str:
    """The report as a short markdown page (what the CLI prints after export / verify)."""
    lines = header_lines(report)
    parity = report.get("parity")
    for title, section in (("onnxruntime", parity), ("TensorRT", (report.get("tensorrt") or {}).get("parity"))):
        if section:
            lines += parity_lines(title, section)
    if parity is None:
        lines += ["", "## Parity: not checked (--no-verify); run `hypermerge verify` on this directory."]
    lines += latency_lines(report.get("latency"))
    lines += optimize_lines(report.get("optimize"))
    quant = report.get("quantized")
    if quant and quant.get("kind") == "weight-only":
        lines += weight_only_lines(quant)
    elif quant:
        lines += int8_lines(quant)
    lines += tensorrt_lines(report.get("tensorrt"))
    lines += _patch_lines(report)
    lines += certificate_lines(report.get("certificate"))
    return "\n".join(lines) + "\n"


def header_lines(report: dict) -> list[str]:
    """The title and what was exported: source, model file, profile, inputs and outputs."""
    lines = [f"# hypermerge export report: {report.get('task')}", ""]
    lines.append(f"- source: `{report.get('source', {}).get('path')}`")
    lines.append(f"- model: `{report.get('model_file')}` (opset {report.get('opset')}, {report.get('exporter')})")
    if report.get("profile"):
        profile = report["profile"]
        lines.append(f"- profile: `{profile.get('name') or 'given as options'}` ({profile.get('description') or '—'})")
    for key in ("inputs", "outputs"):
        names = [entry["name"] for entry in report.get(key, [])]
        shown = names if len(names) <= 7 else [*names[:5], f"… {len(names)} in all"]
        lines.append(f"- {key}: {', '.join(shown)}")
    if report.get("verified_at"):
        lines.append(f"- verified: {report['verified_at']} with hypermerge {report.get('hypermerge')}")
    return lines


def parity_lines(title: str, section: dict) -> list[str]:
    """One backend's parity: verdict, tolerance, the per-output table and the greedy decode."""
    verdict = "PASSED" if section["passed"] else "FAILED"
    tol = section["tolerance"]
    lines = ["", f"## Parity, {title} ({section['backend']}): {verdict}", "",
             f"Tolerance |a − e| ≤ {tol['atol']:g}·max(1, max|e|) + {tol['rtol']:g}·|e| at valid positions; shapes "
             + ", ".join(_case(c) for c in section["shapes"]) + ".", ""]
    lines += parity_table(section)
    greedy = section.get("greedy_decode")
    if greedy:
        lines += ["", f"Greedy decode, {greedy['batch']} left-padded prompts (lengths "
                  f"{greedy['prompt_lengths']}), {greedy['new_tokens']} tokens with the KV cache: "
                  + ("identical to PyTorch generate." if greedy["match"] else
                     f"**differs** from PyTorch generate at {greedy.get('first_mismatch')}.")]
    return lines


def latency_lines(latency: dict | None) -> list[str]:
    """The latency tables (a causal LM's decode step too); none where nothing was measured."""
    if not latency:
        return []
    lines = ["", f"## Latency: batch {latency['batch']} × seq {latency['seq']}, {latency['threads']} threads, "
             f"{latency['iterations']} interleaved runs", ""]
    lines += latency_table(latency)
    if "decode_step" in latency:
        lines += ["", f"One decode step (1 new token on a cache of {latency['seq']}):", ""]
        lines += latency_table(latency["decode_step"])
    return lines


def optimize_lines(optimize: dict | None) -> list[str]:
    """``--optimize``: the fusions, both latencies and the re-checked parity."""
    if not optimize:
        return []
    fused = ", ".join(f"{op} ×{n}" for op, n in optimize["fused_ops"].items()) or "none"
    return ["", f"## --optimize ({optimize['model_type']} fusions): {fused}",
            f"p50 {optimize['plain_p50_ms']:.2f} ms before, {optimize['optimized_p50_ms']:.2f} ms after; "
            "parity re-checked: " + {True: "passed.", False: "FAILED.", None: "not checked (--no-verify)."}[
                optimize.get("parity_passed")]]


def int8_lines(quant: dict) -> list[str]:
    """An encoder's int8 section: accuracy against its bound, speed against fp32, kept or not."""
    metric, bound = quant["bound"]["metric"], quant["bound"]["min"]
    return ["", f"## int8 ({quant['method']}): {'kept as ' + quant['file'] if quant['kept'] else 'not kept'}",
            f"{metric} {quant['accuracy'][metric]:.4f} (bound ≥ {bound}) on {quant['accuracy']['samples']} "
            f"{quant['accuracy']['inputs']}; p50 {quant['p50_ms']:.2f} ms vs fp32 "
            f"{quant['fp32_p50_ms']:.2f} ms ({quant['ratio_to_fp32']:.2f}×). {quant['reason']}"]


def tensorrt_lines(trt: dict | None) -> list[str]:
    """The engine's build: TensorRT version, precision, files and flags."""
    if not trt:
        return []
    return ["", f"## TensorRT {trt.get('version')} ({trt.get('precision')}): `{trt.get('engine')}`, "
            f"timing cache `{trt.get('timing_cache')}`, flags {', '.join(trt.get('flags', []))}"]


def weight_only_lines(section: dict) -> list[str]:
    """The weight-only quantization section of a causal LM (``--quantize int4`` / ``int8``)."""
    top1, greedy, speed = section["accuracy"], section["greedy"], section["decode_tokens_per_s"]
    title = f"kept as {section['file']}" if section["kept"] else "not kept"
    lines = ["", f"## {section['scheme']} ({section['method']}): {title}",
             f"Next-token top-1 agreement with PyTorch fp32: {top1['top1_agreement']:.4f} (bound ≥ "
             f"{section['bound']['min']}) over {top1.get('positions', '?')} positions of {top1['samples']} "
             f"{top1['inputs']}. Greedy decode, tokens until the first divergence from PyTorch "
             f"(of {greedy['new_tokens']}): {', '.join(map(str, greedy['lengths']))}.", "",
             f"| decode ({speed['new_tokens']} new tokens, greedy) | fp32 ONNX tokens/s | {section['scheme']} "
             "tokens/s | ratio |", "|---|---|---|---|"]
    for key, row in speed.items():
        if key.startswith("batch_"):
            lines.append(f"| batch {key.removeprefix('batch_')} | {row['fp32']:.1f} | {row['quantized']:.1f} | "
                         f"{row['quantized'] / row['fp32']:.2f}× |")
    lines += ["", section["reason"]]
    return lines


def _patch_lines(report: dict) -> list[str]:
    """The sections ``hypermerge patch`` and ``--adapter-inputs`` add (weights map, inputs, patch)."""
    lines: list[str] = []
    scales = report.get("adapter_inputs")
    if scales:
        parity = scales.get("parity_random_scales")
        check = ("not checked (--no-verify)" if parity is None else
                 f"parity with random scales: {'passed' if parity['passed'] else 'FAILED'} "
                 f"(max abs err {parity['max_abs_err']:.2e})")
        lines += ["", f"## Adapter inputs: `{scales['input']}` ({scales['size']} float32 values, {scales['matrices']} "
                  f"matrices, layout in `{scales['file']}`); default ones = the base model; {check}."]
    patch = report.get("patch")
    if patch:
        lines += ["", f"## Patched with `{patch['adapter']}` ({patch['method']}, {patch['format']})", "",
                  f"{patch['tensors_changed']} tensors changed in {patch['initializers_rewritten']} initializers, "
                  f"graph unchanged; base checked {patch['base_check']}."]
        if patch.get("dropped"):
            lines.append("Not carried over: " + "; ".join(patch["dropped"]) + ".")
        if report.get("latency"):
            lines.append("Latency above: measured on the export before the patch (same graph, same shapes).")
    if report.get("weights_map"):
        lines += weights_map_markdown(report["weights_map"])
    return lines


def certificate_lines(certificate: dict | None) -> list[str]:
    """The certificate as report.md lines."""
    if not certificate:
        return []
    adapter, base = certificate["adapter"], certificate["base"]
    folded, engine = certificate.get("folded"), certificate.get("engine") or {}
    e2e = certificate.get("end_to_end") or {}
    verdict = {True: "PASSED", False: "FAILED", None: "NOT CHECKED (--no-verify)"}[certificate.get("passed")]
    lines = ["", f"## Certificate, {certificate['chain']}: {verdict}", "",
             f"1. adapter `{adapter['path']}` ({adapter.get('method')}, {adapter.get('format')}), "
             f"sha256 `{str(adapter.get('sha256'))[:16]}`",
             f"2. base `{base['path']}`, weights sha256 `{str(base.get('weights_sha256'))[:16]}`; "
             f"{(base.get('content_check') or {}).get('detail', 'not checked')}"]
    if folded:
        check = folded.get("fold_check")
        check_text = check if isinstance(check, str) else (
            f"fold --verify {'passed' if check.get('passed', True) else 'FAILED'} (max rel {check.get('max_rel', 0):.2g})")
        lines.append(f"3. folded weights `{folded['path']}` ({folded.get('dtype')}), sha256 "
                     f"`{str(folded.get('weights_sha256'))[:16]}`; {check_text}")
    else:
        lines.append("3. folded weights: none (patched straight into the engine)")
    parity = engine.get("parity_vs_folded")
    lines.append(f"4. engine sha256 `{str(engine.get('sha256'))[:16]}`; parity vs the folded model: "
                 + {True: "passed", False: "FAILED", None: "not checked"}[parity])
    if e2e.get("passed") is None:
        lines.append(f"5. end to end (base + adapter unfolded in PyTorch vs the engine): not checked, {e2e.get('why')}")
    else:
        greedy = e2e.get("greedy_decode_match")
        lines.append(f"5. end to end (base + adapter unfolded in PyTorch vs the engine): "
                     f"{'passed' if e2e['passed'] else 'FAILED'}, max abs err {e2e['max_abs_err']:.2e}, "
                     f"max rel err {e2e['max_rel_err']:.2e}"
                     + ("" if greedy is None else f", greedy decode {'identical' if greedy else 'DIFFERS'}"))
    return lines
