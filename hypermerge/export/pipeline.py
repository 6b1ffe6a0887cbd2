"""The stages of ``hypermerge export``, in order, over one :class:`ExportRun`:

    plan (every option checked, before anything is written) -> load the model -> export to ONNX
    -> parity -> adapter inputs -> optimize -> quantize -> TensorRT -> latency -> keep or drop
    what was measured -> weights map -> certificate

Each stage returns its section of the report; :func:`run_export` puts them in the order the
report has always had them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hypermerge._version import __version__
from hypermerge.export import optimize as opt
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.adapter_inputs import ScaleInputs, scales_section
from hypermerge.export.certificate import certify_export, weights_sha256
from hypermerge.export.latency import measure
from hypermerge.export.onnx_export import export_onnx, load_torch_model
from hypermerge.export.onnx_files import move_onnx
from hypermerge.export.parity import TOLERANCES
from hypermerge.export.plan import ExportPlan, ExportRun
from hypermerge.export.quantized import quantized
from hypermerge.export.report import ExportHeader, LatencySection, TensorRTSection, io_spec, utc_now
from hypermerge.export.verification import (
    Reference,
    cases_within,
    engine_runner,
    onnx_label,
    onnx_runner,
    require_parity,
)
from hypermerge.export.weights_map import record_weights_map
from hypermerge.fold.hfdir import copy_model_files
from hypermerge.runtime.files import MODEL_DATA_FILE, MODEL_FILE, OPTIMIZED_FILE


def load_and_export(plan: ExportPlan, out: Path, stage: Callable[[str], None]) -> ExportRun:
    """Load the PyTorch model, export it to ``out/model.onnx`` with the model's files, open a session."""
    stage("loading the model")
    model = load_torch_model(plan.model_dir, plan.task)
    scales = ScaleInputs.attach(model) if plan.options.adapter_inputs else None
    stage("exporting to ONNX")
    contract = export_onnx(model, plan.task, out / MODEL_FILE, opset=plan.options.opset,
                           external_data=plan.options.external_data, scales=scales)
    copy_model_files(plan.model_dir, out)
    if scales is not None:
        scales.write(out)
    reference = Reference.of(model, plan.task, plan.model_dir)
    run = ExportRun(plan, out, reference, contract, scales, served=out / MODEL_FILE)
    run.session = run.open(out / MODEL_FILE)
    run.label = onnx_label(run.session)
    run.backends["onnxruntime"] = onnx_runner(run.session, contract)
    return run


def header(run: ExportRun) -> dict:
    """The report's opening fields: provenance, the model file and its inputs and outputs."""
    plan, out = run.plan, run.out
    inputs, outputs = io_spec(run.session)
    source = {"path": str(plan.model_dir), "weights_sha256": weights_sha256(plan.model_dir)}
    return ExportHeader(__version__, utc_now(), source, plan.task, plan.options.opset,
                        f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                        (out / MODEL_DATA_FILE).exists(), inputs, outputs, profile=plan.options.profile).to_dict()


def onnx_parity(run: ExportRun) -> dict:
    """The exported model against PyTorch.

    Raises:
        ParityError: it does not match.
    """
    parity = run.parity(run.backends["onnxruntime"])
    require_parity(parity, "the ONNX model does not match PyTorch", path=run.plan.model_dir,
                   hint="run with --debug, or try another --opset")
    return parity


def adapter_inputs(run: ExportRun) -> dict:
    """The packed adapter input's section (parity with random scales, where verified)."""
    ref, options = run.reference, run.options
    section = scales_section(run.scales, run.session, run.contract, ref.model, ref.wrapper, verify=options.verify,
                             backend=run.label, tolerance=options.tolerance,
                             new_tokens=options.new_tokens, tokenizer=ref.tokenizer)
    run.backends["onnxruntime_adapter_scales"] = run.scales.runner(run.session, run.contract)
    return section


def optimized(run: ExportRun) -> dict:
    """onnxruntime's transformer fusions in ``model.optimized.onnx``, parity re-checked; the latency
    then compares it with the plain model.

    Raises:
        ParityError: the fusions changed what the model computes.
    """
    out, plain = run.out, run.backends["onnxruntime"]
    run.served = out / OPTIMIZED_FILE
    # GroupQueryAttention in float32 is a CPU kernel: on CUDA it would pull each layer back to the CPU
    on_cpu = run.session.get_providers()[0] == "CPUExecutionProvider"
    section = opt.optimize_onnx(out / MODEL_FILE, run.served, run.plan.config,
                                external_data=run.report["external_data"], attention=on_cpu)
    run.session = run.open(run.served)
    fused = onnx_runner(run.session, run.contract)
    if run.options.verify:
        section["parity"] = run.parity(fused)
        require_parity(section["parity"], "--optimize broke parity", path=run.plan.model_dir,
                       hint="export without --optimize")
    section["parity_passed"] = section.get("parity", {}).get("passed")
    run.backends = {"onnxruntime": fused, "onnxruntime_unoptimized": plain}
    return section


def serve_optimized(run: ExportRun, latency: LatencySection | None) -> None:
    """Record both latencies in the optimize section, then make the optimized model ``model.onnx``."""
    section = run.report["optimize"]
    if latency:
        section["plain_p50_ms"] = latency.timing("onnxruntime_unoptimized").p50_ms
        section["optimized_p50_ms"] = latency.timing("onnxruntime").p50_ms
        latency.drop_backend("onnxruntime_unoptimized")
    run.session, run.backends = None, {}  # the sessions hold the files open
    move_onnx(run.served, run.out / MODEL_FILE)


def tensorrt_engine(run: ExportRun) -> dict:
    """Build ``model.engine`` from the plain graph (the optimizer's fused ops are onnxruntime-only)
    and check its parity inside its profile.

    Raises:
        ParityError: the engine does not match PyTorch.
    """
    o, shape_range, contract = run.options, run.plan.shape_range, run.contract
    trt = trt_mod.require_tensorrt()
    section = TensorRTSection.from_dict(
        trt_mod.build_engine(trt, run.out / MODEL_FILE, run.out, contract, shape_range, o.precision))
    runner = engine_runner(trt, run.out, contract)
    if o.verify:
        greedy_fits = (shape_range.min.batch <= 3 <= shape_range.max.batch
                       and shape_range.max.past >= 11 + o.new_tokens and shape_range.min.past == 0)
        section.parity = run.parity(runner, backend=f"tensorrt:{o.precision}", tolerance=TOLERANCES[o.precision],
                                    cases=cases_within(shape_range, contract.task), greedy=greedy_fits)
        require_parity(section.parity, "the TensorRT engine does not match PyTorch",
                       hint="try --fp16 instead of --bf16, or fp32")
    run.backends["tensorrt"] = runner
    return section.to_dict()


def latency(run: ExportRun) -> LatencySection | None:
    """PyTorch against every backend still in the run (None when nothing was verified or built)."""
    o = run.options
    if not (o.verify or o.optimize or o.quantize):
        return None
    return measure(run.backends, run.reference.wrapper, run.contract, run.reference.vocab, batch=o.batch,
                   seq=o.seq, threads=o.threads, iters=o.iters)


def run_export(plan: ExportPlan, out: Path, stage: Callable[[str], None]) -> dict:
    """Every stage of the export into ``out``, in order; returns the report (without ``seconds``)."""
    o = plan.options
    run = load_and_export(plan, out, stage)
    report = run.report = header(run)
    if o.verify:
        stage("parity")
        report["parity"] = onnx_parity(run)
    if run.scales is not None:
        if o.verify:
            stage("adapter inputs")
        report["adapter_inputs"] = adapter_inputs(run)
    if o.optimize:
        stage("optimizing")
        report["optimize"] = optimized(run)
    decide = quantized(run, stage) if o.quantize else None
    if o.trt:
        stage("TensorRT")
        report["tensorrt"] = tensorrt_engine(run)
    stage("latency")
    measured = latency(run)
    if o.optimize:
        serve_optimized(run, measured)
    report["latency"] = measured.to_dict() if measured else None
    if decide is not None:
        report["quantized"] = decide(report["latency"])
    stage("weights map")
    report["weights_map"] = record_weights_map(out, plan.model_dir, report["source"]["weights_sha256"]).to_dict()
    certify_export(plan.model_dir, out, report, task=plan.task, provider=o.provider, threads=o.threads,
                   new_tokens=o.new_tokens, verify=o.verify)
    report["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    return report
