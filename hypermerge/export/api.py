"""``export_model`` and ``verify_export``: what ``hypermerge export`` and ``hypermerge verify`` run.

Each is a short list of named stages: the export's live in :mod:`hypermerge.export.pipeline`
(planned by :mod:`hypermerge.export.plan`), the verification's in :mod:`hypermerge.export.reverify`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tqdm.auto import tqdm

from hypermerge._fs import atomic_output_dir, require_dir
from hypermerge.errors import ExportError
from hypermerge.export import certificate as cert
from hypermerge.export import reverify
from hypermerge.export.certificate import certify_export, weights_sha256  # noqa: F401 (their old home)
from hypermerge.export.onnx_export import DEFAULT_OPSET
from hypermerge.export.onnx_files import move_onnx, remove_onnx  # noqa: F401 (their old home)
from hypermerge.export.parity import Tolerance
from hypermerge.export.pipeline import run_export
from hypermerge.export.plan import DEFAULT_LATENCY_SHAPE, ExportOptions, plan_export  # noqa: F401
from hypermerge.export.quantized import int8_with_fallback as _quantize  # noqa: F401 (a test's name for it)
from hypermerge.export.report import read_report, to_markdown, write_report
from hypermerge.export.reverify import VerifyOptions
from hypermerge.runtime.files import ENGINE_FILE, INT8_FILE, MODEL_FILE, OPTIMIZED_FILE, REPORT_JSON  # noqa: F401


@dataclasses.dataclass
class Report:
    """A parsed report.json: ``report["parity"]["max_abs_err"]``, ``report.passed``, ``report.markdown()``."""

    data: dict
    path: Path

    def __getitem__(self, key: str):
        return self.data[key]

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    @property
    def passed(self) -> bool:
        """Parity (and TensorRT parity, where an engine was built) passed."""
        parity = self.data.get("parity") or {}
        trt = (self.data.get("tensorrt") or {}).get("parity") or {"passed": True}
        return bool(parity.get("passed")) and bool(trt.get("passed"))

    def markdown(self) -> str:
        return to_markdown(self.data)


@dataclasses.dataclass
class ExportResult:
    """What an export wrote."""

    out: Path
    task: str
    report: Report
    files: list[str]
    seconds: float


class Stages:
    """A progress bar over named stages (``--quiet`` turns it off)."""

    def __init__(self, names: list[str], enabled: bool):
        self.bar = tqdm(total=len(names), disable=not enabled, unit="stage", leave=False)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(name)

    def close(self) -> None:
        self.bar.close()


def export_model(model_dir: str | Path, out: str | Path, task: str = "auto", *, opset: int = DEFAULT_OPSET,
                 optimize: bool = False, quantize: str | None = None, trt: bool = False, precision: str = "fp32",
                 shapes: str | None = None, verify: bool = True, overwrite: bool = False,
                 batch: int | None = None, seq: int | None = None, threads: int | None = None, iters: int = 30,
                 external_data: bool | None = None, tolerance: Tolerance | None = None, new_tokens: int = 16,
                 provider: str = "auto", progress: bool = True, adapter_inputs: bool = False,
                 block_size: int = 32, accuracy_level: int = 4, profile: dict | None = None) -> ExportResult:
    """Export a HF model directory to a verified ONNX directory (and optionally a TensorRT engine).

    Args:
        model_dir: a HF model directory with safetensors weights (e.g. ``hypermerge fold``'s output).
        out: the output directory (written atomically: on any error nothing is left).
        task, ...: the options, one per field of :class:`~hypermerge.export.plan.ExportOptions`
            (documented there).

    Returns:
        The output path, task, report and the files written.

    Raises:
        ExportError: not a model directory, unsupported architecture, exporter failure.
        ConfigError: an invalid option (unknown task, --fp16 without --trt, malformed --shapes...).
        BackendUnavailableError: --trt without TensorRT and a CUDA GPU (checked before anything is written).
        ParityError: the export (or its optimized form) does not reproduce PyTorch.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    start = time.perf_counter()
    options = ExportOptions(task=task, opset=opset, optimize=optimize, quantize=quantize, trt=trt,
                            precision=precision, shapes=shapes, verify=verify, overwrite=overwrite, batch=batch,
                            seq=seq, threads=threads, iters=iters, external_data=external_data, tolerance=tolerance,
                            new_tokens=new_tokens, provider=provider, progress=progress,
                            adapter_inputs=adapter_inputs, block_size=block_size, accuracy_level=accuracy_level,
                            profile=profile)
    plan = plan_export(model_dir, options)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        # the bar starts once the output is known to be writable: errors before it stay one line
        stage = Stages(plan.stage_names(), progress)
        try:
            report = run_export(plan, tmp, stage)
            report["seconds"] = round(time.perf_counter() - start, 1)
            write_report(tmp, report)
            files = sorted(p.name for p in tmp.iterdir())
        finally:
            stage.close()
    out = Path(out).absolute()
    return ExportResult(out, plan.task, Report(report, out / REPORT_JSON), files, time.perf_counter() - start)


def open_export(export_dir: str | Path) -> tuple[Path, dict]:
    """An exported directory (absolute) and its report (empty where it has none).

    Raises:
        ExportError: no such directory, or no model.onnx in it.
    """
    export_dir = require_dir(export_dir, "exported model directory").absolute()
    if not (export_dir / MODEL_FILE).is_file():
        raise ExportError(f"no {MODEL_FILE} in this directory", path=export_dir,
                          hint="pass a directory written by hypermerge export")
    return export_dir, read_report(export_dir) or {}


def verify_export(export_dir: str | Path, *, source: str | Path | None = None, provider: str = "auto",
                  batch: int | None = None, seq: int | None = None, threads: int | None = None, iters: int = 30,
                  tolerance: Tolerance | None = None, new_tokens: int = 16, progress: bool = True) -> Report:
    """Re-run parity and latency on an exported directory and rewrite its report.

    The PyTorch reference is loaded from the source model recorded at export (or ``source``). A
    failing check still rewrites the report (``parity.passed`` false) and then raises.

    Args:
        source: the HF model directory to compare with (default: the one in report.json).
        batch, seq: latency shape (default: the report's, else 8×64 / 1×64).

    Returns:
        The new report.

    Raises:
        ExportError: no model.onnx, or the source model is unknown or missing.
        ParityError: parity fails (the message names the output and the error; it says when the
            source's weights changed since export).
    """
    start = time.perf_counter()
    options = VerifyOptions(source=source, provider=provider, batch=batch, seq=seq, threads=threads, iters=iters,
                            tolerance=tolerance, new_tokens=new_tokens, progress=progress)
    export_dir, report = open_export(export_dir)
    certificate = cert.verify_links(export_dir, report)  # names the first broken link, before any work
    source_path = reverify.source_of(export_dir, report, source)
    quant = reverify.quantized_file(export_dir)
    stage = Stages(reverify.stage_names(export_dir), progress)
    try:
        stage("loading")
        run = reverify.open_run(export_dir, report, source_path, options)
        reverify.refresh_header(run)
        stage("parity")
        report["parity"] = reverify.onnx_parity(run)
        accuracy = None
        if quant:
            stage(quant[1])
            accuracy = reverify.quantized_accuracy(run, *quant)
        if (export_dir / ENGINE_FILE).exists():
            stage("TensorRT")
            reverify.engine(run)
        stage("latency")
        report["latency"] = reverify.latency(run)
        if accuracy is not None:
            reverify.update_quantized(run, *quant, accuracy)
        if certificate is not None:
            reverify.end_to_end(run, certificate)
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_report(export_dir, report)
    finally:
        stage.close()
    reverify.raise_failures(run)
    return Report(report, export_dir / REPORT_JSON)
