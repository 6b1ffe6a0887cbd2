"""The stages of ``hypermerge verify`` over one :class:`VerifyRun`:

    find the source -> load it and the export -> parity -> the kept quantized model -> the
    TensorRT engine -> latency -> the quantized section -> the certificate end to end

A failing check is collected, not raised, so the rewritten report shows every result; the caller
raises once the report is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hypermerge._version import __version__
from hypermerge.errors import ExportError, ParityError
from hypermerge.export import certificate as cert
from hypermerge.export import fp16 as half
from hypermerge.export import optimize as opt
from hypermerge.export import quantize as wq
from hypermerge.export.certificate import weights_sha256
from hypermerge.export.latency import measure
from hypermerge.export.onnx_files import opset_of
from hypermerge.export.parity import TOLERANCES, Tolerance, failure_summary
from hypermerge.export.plan import default_shape
from hypermerge.export.report import FORMAT, io_spec, utc_now
from hypermerge.export.tasks import CAUSAL_LM, IOContract
from hypermerge.export.verification import Reference, onnx_label, onnx_runner, verify_engine
from hypermerge.export.weights_map import read_weights_map
from hypermerge.runtime.files import ENGINE_FILE, MODEL_FILE, QUANTIZED_FILES
from hypermerge.runtime.model import Runner
from hypermerge.runtime.ort import open_session, session_contract


@dataclasses.dataclass
class VerifyOptions:
    """``hm.verify_export``'s keyword arguments (see there)."""

    source: str | Path | None = None
    provider: str = "auto"
    batch: int | None = None
    seq: int | None = None
    threads: int | None = None
    iters: int = 30
    tolerance: Tolerance | None = None
    new_tokens: int = 16
    progress: bool = True


@dataclasses.dataclass
class VerifyRun:
    """One verification in progress: the export, its reference, the backends measured and what failed."""

    export_dir: Path
    source: Path
    report: dict
    options: VerifyOptions  # tolerance and threads resolved
    session: object
    contract: IOContract
    reference: Reference
    backends: dict[str, Runner] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def adapters(self) -> list[str]:
        """The adapters a patched export carries (folded into the reference too)."""
        return (self.report.get("source") or {}).get("adapters") or []


def source_of(export_dir: Path, report: dict, source: str | Path | None) -> Path:
    """The PyTorch reference's directory: ``source``, else the one the report records.

    Raises:
        ExportError: none recorded and none given, or it is not there.
    """
    recorded = (report.get("source") or {}).get("path")
    if source is None and not recorded:
        raise ExportError("the source model (the PyTorch reference) is not recorded: no report.json",
                          path=export_dir, hint="pass --source MODEL_DIR")
    path = Path(source or recorded)
    if not (path / "config.json").is_file():
        raise ExportError("the source model (the PyTorch reference) is not there", path=path,
                          hint="pass --source MODEL_DIR")
    return path


def quantized_file(export_dir: Path) -> tuple[str, str] | None:
    """The quantized file an export kept and its label: model.int8.onnx (int8), a causal LM's
    weight-only model.int4.onnx (int4), or model.fp16.onnx (fp16); None where it kept none."""
    return next(((name, label) for label, name in QUANTIZED_FILES.items() if (export_dir / name).exists()), None)


def stage_names(export_dir: Path) -> list[str]:
    """The progress bar's stages for this directory."""
    quant = quantized_file(export_dir)
    engine = ["TensorRT"] if (export_dir / ENGINE_FILE).exists() else []
    return ["loading", "parity"] + ([quant[1]] if quant else []) + engine + ["latency"]


def open_run(export_dir: Path, report: dict, source: Path, options: VerifyOptions) -> VerifyRun:
    """Open the export's model and load the reference (the source, with a patched export's adapters folded in)."""
    threads = options.threads or (report.get("latency") or {}).get("threads") or torch.get_num_threads()
    options = dataclasses.replace(options, tolerance=options.tolerance or TOLERANCES["fp32"], threads=threads)
    session = open_session(export_dir / MODEL_FILE, options.provider, threads, exact=True)
    contract = session_contract(session)
    adapters = (report.get("source") or {}).get("adapters") or []
    reference = Reference.load(source, contract.task, export_dir, adapters,
                               read_weights_map(export_dir) if adapters else None)
    return VerifyRun(export_dir, source, report, options, session, contract, reference)


def refresh_header(run: VerifyRun) -> None:
    """The report's opening fields as of now; ``source`` says whether its weights changed since export."""
    report, source = run.report, run.source
    inputs, outputs = io_spec(run.session)
    sha = weights_sha256(source)
    recorded = (report.get("source") or {}).get("weights_sha256")
    report.update({"format": FORMAT, "format_version": 1, "hypermerge": __version__, "verified_at": utc_now(),
                   "task": run.contract.task, "inputs": inputs, "outputs": outputs, "model_file": MODEL_FILE})
    report.setdefault("opset", opset_of(run.export_dir / MODEL_FILE))
    report.setdefault("exporter", "unknown (not exported by hypermerge)")
    report["source"] = {"path": str(source.absolute()), "weights_sha256": sha,
                        **({"weights_changed_since_export": recorded != sha} if recorded else {}),
                        **({"adapters": run.adapters} if run.adapters else {})}


def onnx_parity(run: VerifyRun) -> dict:
    """model.onnx against the reference (a failure is collected)."""
    runner = onnx_runner(run.session, run.contract)
    parity = run.reference.parity(runner, run.contract, backend=onnx_label(run.session),
                                  tolerance=run.options.tolerance, new_tokens=run.options.new_tokens)
    run.backends["onnxruntime"] = runner
    if not parity["passed"]:
        run.failures.append(f"ONNX: {failure_summary(parity)}")
    return parity


def quantized_accuracy(run: VerifyRun, file: str, label: str) -> dict:
    """The kept quantized model's accuracy against the reference (it joins the latency run)."""
    session = open_session(run.export_dir / file, run.options.provider, run.options.threads)
    runner = onnx_runner(session, run.contract)
    ref = run.reference
    accuracy = opt.int8_accuracy(runner, ref.wrapper, run.contract, ref.vocab, ref.tokenizer)
    run.backends[f"onnxruntime_{label}"] = runner
    return accuracy


def engine(run: VerifyRun) -> None:
    """The TensorRT engine's parity inside its profile, where TensorRT is here (a failure is collected)."""
    runner, failure = verify_engine(run.export_dir, run.report.setdefault("tensorrt", {}), run.contract,
                                    run.reference, run.options.new_tokens)
    if runner is not None:
        run.backends["tensorrt"] = runner
    run.failures += [failure] if failure else []


def latency(run: VerifyRun) -> dict:
    """PyTorch against every backend, at the shape given, else the report's, else the task's default."""
    recorded, o = run.report.get("latency") or {}, run.options
    batch, seq = default_shape(run.contract.task, o.batch or recorded.get("batch"), o.seq or recorded.get("seq"))
    return measure(run.backends, run.reference.wrapper, run.contract, run.reference.vocab, batch=batch, seq=seq,
                   threads=o.threads, iters=o.iters).to_dict()


def update_quantized(run: VerifyRun, file: str, label: str, accuracy: dict) -> None:
    """Rewrite the quantized section's accuracy and speed (a result below its bound is collected)."""
    report = run.report
    metric, bound = opt.INT8_BOUNDS[run.contract.task]  # fp16 keeps int8's bound
    if run.contract.task == CAUSAL_LM and label in wq.WEIGHT_ONLY_BOUNDS:  # weight-only: its own bound
        metric, bound = "top1_agreement", wq.WEIGHT_ONLY_BOUNDS[label]
    quant = report.setdefault("quantized", {"method": "onnxruntime dynamic quantization", "file": file,
                                            "kept": True, "bound": {"metric": metric, "min": bound}})
    if label == "fp16":  # timed as at export: a causal LM's decode step
        _, p50, fp32, torch_p50 = half.timed(report["latency"], run.contract.task)
    else:
        p50, fp32 = report["latency"][f"onnxruntime_{label}"]["p50_ms"], report["latency"]["onnxruntime"]["p50_ms"]
        torch_p50 = report["latency"]["torch"]["p50_ms"]
    quant.update(accuracy=accuracy, p50_ms=p50, fp32_p50_ms=fp32, ratio_to_fp32=p50 / fp32,
                 ratio_to_torch=p50 / torch_p50, reason=f"Re-verified: {metric} {accuracy[metric]:.4f} (bound ≥ {bound}).")
    if accuracy[metric] < bound:
        run.failures.append(f"{label}: {metric} {accuracy[metric]:.4f} below the bound {bound}")


def end_to_end(run: VerifyRun, certificate: dict) -> None:
    """The certificate's engine link and end-to-end check again (a failure is collected)."""
    before = certificate.get("adapters_before")
    e2e = cert.end_to_end(run.export_dir, certificate, task=run.contract.task, provider=run.options.provider,
                          threads=run.options.threads, new_tokens=run.options.new_tokens, adapters_before=before,
                          weights_map=read_weights_map(run.export_dir) if before else None)
    run.report["certificate"] = cert.finish(certificate, run.export_dir, run.report["parity"], e2e)
    if e2e.get("passed") is False:
        run.failures.append(f"end to end (base + adapter vs the engine): {failure_summary(e2e)}")


def raise_failures(run: VerifyRun) -> None:
    """Raise one ParityError naming every check that failed (none: return).

    Raises:
        ParityError: a check failed; the hint says when the source's weights changed since export.
    """
    if not run.failures:
        return
    changed = run.report["source"].get("weights_changed_since_export")
    raise ParityError("verification failed: " + "; ".join(run.failures), path=run.export_dir,
                      hint="the source model's weights changed since export: re-export it" if changed else
                      "re-export the model; see report.md for every output")
