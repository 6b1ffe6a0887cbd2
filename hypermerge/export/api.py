"""``export_model`` and ``verify_export``: what ``hypermerge export`` and ``hypermerge verify`` run."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hypermerge._fs import atomic_output_dir, require_dir
from hypermerge._version import __version__
from hypermerge.errors import ConfigError, ExportError, ParityError
from hypermerge.export import certificate as cert
from hypermerge.export import optimize as opt
from hypermerge.export import quantize as wq
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.adapter_inputs import ScaleInputs, scales_section
from hypermerge.export.certificate import weights_sha256
from hypermerge.export.latency import measure
from hypermerge.export.onnx_export import DEFAULT_OPSET, export_onnx, hf_tokenizer, load_torch_model, wrap
from hypermerge.export.parity import TOLERANCES, Tolerance, check_parity, failure_summary
from hypermerge.export.report import FORMAT, read_report, to_markdown, utc_now, write_report
from hypermerge.export.tasks import CAUSAL_LM, check_task, detect_task, read_config
from hypermerge.export.verification import (
    Reference,
    cases_within,
    drop_backend,
    reference_model,
    verify_engine,
)
from hypermerge.export.weights_map import read_weights_map, record_weights_map
from hypermerge.fold.hfdir import copy_model_files
from hypermerge.runtime.files import ENGINE_FILE, INT8_FILE, MODEL_FILE, OPTIMIZED_FILE, WEIGHT_ONLY_FILES
from hypermerge.runtime.ort import open_session, session_contract, session_provider, session_runner

# latency defaults: the MiniLM benchmark shape for encoders; a 64-token prompt for causal LMs
DEFAULT_LATENCY_SHAPE = {"encoder": (8, 64), CAUSAL_LM: (1, 64)}


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


def _io_spec(session) -> tuple[list[dict], list[dict]]:
    def spec(values):
        return [{"name": v.name, "dtype": v.type.removeprefix("tensor(").rstrip(")"), "shape": list(v.shape)}
                for v in values]

    return spec(session.get_inputs()), spec(session.get_outputs())


class _Stages:
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


def _default_shape(task: str, batch: int | None, seq: int | None) -> tuple[int, int]:
    default = DEFAULT_LATENCY_SHAPE[CAUSAL_LM if task == CAUSAL_LM else "encoder"]
    return batch or default[0], seq or default[1]


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
        task: auto (from ``config.architectures``), feature-extraction, sequence-classification or causal-lm.
        optimize: apply onnxruntime's transformer optimizer; parity is re-checked on the result.
        quantize: "int8" or "int4". Encoders: int8 dynamic quantization, kept as ``model.int8.onnx``
            only if it is faster and within the accuracy bound. Causal LMs: weight-only (MatMulNBits,
            ``block_size`` weights per scale, ``accuracy_level`` its compute type), kept as
            ``model.int4.onnx`` / ``model.int8.onnx`` only if within its next-token agreement bound
            and faster to decode. ``model.onnx`` stays fp32 either way.
        trt: also build ``model.engine`` with TensorRT (``precision`` fp32/fp16/bf16, ``shapes`` its profile).
        verify: check parity (and measure latency); False skips both.
        batch, seq, threads, iters: the latency measurement (defaults: 8×64 encoders, 1×64 causal LMs;
            torch's thread count; 30 interleaved runs).
        tolerance: parity bound (default: fp32 atol 1e-4, rtol 1e-3).
        new_tokens: greedy tokens compared with PyTorch (causal LMs, at least 16 recommended).
        adapter_inputs: HyperAdapt's row and column scales of every linear layer of the transformer
            blocks become one packed graph input (``adapter_scales``, default ones; layout in
            ``adapter_inputs.json``), so one model serves many adapters
            (``hm.OnnxModel.load(...).embed(texts, adapter=DIR)``); parity is also checked with
            random scales against the PyTorch model with those scales.
        profile: the resolved export profile these options came from (recorded in the report; see
            :func:`hypermerge.export.profiles.export_with_profile`).

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
    model_dir = require_dir(model_dir, "model directory").absolute()
    config = read_config(model_dir)
    task = detect_task(config, model_dir / "config.json") if task == "auto" else check_task(task)
    _check_quantize(quantize, task, block_size, accuracy_level)
    if not trt and (precision != "fp32" or shapes):
        raise ConfigError("--fp16, --bf16 and --shapes apply to TensorRT engines", hint="add --trt")
    if adapter_inputs and trt:
        # TensorRT's ONNX parser takes an input that has a default (an initializer of the same
        # name) for a constant, which would bake the identity scales into the engine
        raise ConfigError("--adapter-inputs cannot be combined with --trt yet",
                          hint="serve adapter inputs with onnxruntime, or hypermerge patch --trt per adapter")
    if opset < 17:
        raise ConfigError(f"opset {opset} is too old for the exporter", hint="use --opset 17 or newer")
    shape_range = trt_mod.parse_shapes(shapes, task) if trt else None
    if trt:
        trt_mod.builder_flags(trt_mod.require_tensorrt(), precision)  # before anything is written
    tolerance = tolerance or TOLERANCES["fp32"]
    batch, seq = _default_shape(task, batch, seq)
    threads = threads or torch.get_num_threads()
    names = ["loading the model", "exporting to ONNX"] + ["parity"] * verify + ["adapter inputs"] * (
        adapter_inputs and verify) + ["optimizing"] * optimize
    names += [str(quantize)] * bool(quantize) + ["TensorRT"] * trt + ["latency", "weights map"]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        # the bar starts once the output is known to be writable: errors before it stay one line
        stage = _Stages(names, progress)
        try:
            stage("loading the model")
            model = load_torch_model(model_dir, task)
            scales = ScaleInputs.attach(model) if adapter_inputs else None
            stage("exporting to ONNX")
            contract = export_onnx(model, task, tmp / MODEL_FILE, opset=opset, external_data=external_data,
                                   scales=scales)
            copy_model_files(model_dir, tmp)
            if scales is not None:
                scales.write(tmp)
            wrapper, _ = wrap(model, task)
            tokenizer = hf_tokenizer(model_dir)
            session = open_session(tmp / MODEL_FILE, provider, threads, exact=True)
            inputs, outputs = _io_spec(session)
            report = {"format": FORMAT, "format_version": 1, "hypermerge": __version__, "created_at": utc_now(),
                      "source": {"path": str(model_dir), "weights_sha256": weights_sha256(model_dir)},
                      "task": task, "opset": opset, "dtype": "float32",
                      "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                      "model_file": MODEL_FILE, "external_data": (tmp / f"{MODEL_FILE}.data").exists(),
                      "inputs": inputs, "outputs": outputs, "parity": None, "latency": None,
                      **({"profile": profile} if profile is not None else {})}
            backend = f"onnxruntime:{session_provider(session)}"
            if verify:
                stage("parity")
                report["parity"] = check_parity(session_runner(session, contract), model, wrapper, contract, backend=backend,
                                                tolerance=tolerance, new_tokens=new_tokens, tokenizer=tokenizer)
                if not report["parity"]["passed"]:
                    raise ParityError(f"the ONNX model does not match PyTorch: {failure_summary(report['parity'])}",
                                      path=model_dir, hint="run with --debug, or try another --opset")
            backends = {"onnxruntime": session_runner(session, contract)}
            if scales is not None:
                if verify:
                    stage("adapter inputs")
                report["adapter_inputs"] = scales_section(scales, session, contract, model, wrapper, verify=verify,
                                                          backend=backend, tolerance=tolerance,
                                                          new_tokens=new_tokens, tokenizer=tokenizer)
                backends["onnxruntime_adapter_scales"] = scales.runner(session, contract)
            served = tmp / MODEL_FILE
            if optimize:
                stage("optimizing")
                served = tmp / OPTIMIZED_FILE
                report["optimize"] = opt.optimize_onnx(tmp / MODEL_FILE, served, config,
                                                       external_data=report["external_data"])
                session = open_session(served, provider, threads, exact=True)
                if verify:
                    parity = check_parity(session_runner(session, contract), model, wrapper, contract, backend=backend,
                                          tolerance=tolerance, new_tokens=new_tokens, tokenizer=tokenizer)
                    report["optimize"]["parity"] = parity
                    if not parity["passed"]:
                        raise ParityError(f"--optimize broke parity: {failure_summary(parity)}", path=model_dir,
                                          hint="export without --optimize")
                report["optimize"]["parity_passed"] = report["optimize"].get("parity", {}).get("passed")
                backends = {"onnxruntime": session_runner(session, contract),
                            "onnxruntime_unoptimized": backends["onnxruntime"]}
            accuracy = decoder_quant = None
            if quantize and task == CAUSAL_LM:
                stage(quantize)
                decoder_quant, backends[f"onnxruntime_{quantize}"] = _weight_only(
                    served, tmp, quantize, wq.WeightOnlyConfig(wq.BITS[quantize], block_size, accuracy_level),
                    report["external_data"], provider, threads, backends["onnxruntime"], model, wrapper, contract,
                    tokenizer, max(new_tokens, 32))
            elif quantize:
                stage("int8")
                int8, accuracy = _quantize(served, tmp / INT8_FILE, report["external_data"], provider, threads,
                                           contract, wrapper, _vocab(model), tokenizer, task)
                backends["onnxruntime_int8"] = session_runner(int8, contract)
            if trt:
                stage("TensorRT")
                # TensorRT parses the plain graph: the optimizer's fused ops are onnxruntime-only
                report["tensorrt"], backends["tensorrt"] = _tensorrt(
                    tmp, contract, shape_range, precision, model, wrapper, tokenizer, new_tokens, verify)
            stage("latency")
            if verify or optimize or quantize:
                report["latency"] = measure(backends, wrapper, contract, _vocab(model), batch=batch, seq=seq,
                                            threads=threads, iters=iters)
            if optimize:
                if report["latency"]:
                    report["optimize"]["plain_p50_ms"] = report["latency"]["onnxruntime_unoptimized"]["p50_ms"]
                    report["optimize"]["optimized_p50_ms"] = report["latency"]["onnxruntime"]["p50_ms"]
                    drop_backend(report["latency"], "onnxruntime_unoptimized")
                del session, backends
                move_onnx(served, tmp / MODEL_FILE)
            if decoder_quant is not None:
                report["quantized"] = _decide_weight_only(tmp, decoder_quant, report["latency"])
            elif quantize:
                report["quantized"] = _decide_int8(tmp, report["latency"], accuracy, task)
            stage("weights map")
            report["weights_map"] = record_weights_map(tmp, model_dir, report["source"]["weights_sha256"])
            certify_export(model_dir, tmp, report, task=task, provider=provider, threads=threads,
                           new_tokens=new_tokens, verify=verify)
            report["files"] = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
            report["seconds"] = round(time.perf_counter() - start, 1)
            write_report(tmp, report)
            files = sorted(p.name for p in tmp.iterdir())
        finally:
            stage.close()
    out = Path(out).absolute()
    return ExportResult(out, task, Report(report, out / "report.json"), files, time.perf_counter() - start)


def _vocab(model: torch.nn.Module) -> int:
    return int(model.config.get_text_config().vocab_size)


def _external_data_files(path: Path) -> list[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [path.parent / name for name in sorted(locations)]


def move_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX model; its external data file (named inside the model) is renamed with it."""
    data = _external_data_files(src)
    if not data:
        os.replace(src, dst)
        return
    import onnx

    model = onnx.load(str(src))
    dst.unlink(missing_ok=True)
    for path in _external_data_files(dst.parent / dst.name) if dst.exists() else []:
        path.unlink(missing_ok=True)
    Path(f"{dst}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data")
    src.unlink()
    for path in data:
        path.unlink(missing_ok=True)


def remove_onnx(path: Path) -> None:
    """Delete an ONNX model and its external data."""
    if path.exists():
        for data in _external_data_files(path):
            data.unlink(missing_ok=True)
        path.unlink()


def _check_quantize(quantize: str | None, task: str, block_size: int, accuracy_level: int) -> None:
    if quantize not in (None, *wq.BITS):
        raise ConfigError(f"unknown quantization {quantize!r}", hint=f"use {' or '.join(wq.BITS)}")
    if quantize == "int4" and task != CAUSAL_LM:
        raise ConfigError(f"int4 is weight-only quantization for decoding causal LMs; this is {task}",
                          hint="use --quantize int8 for encoders")
    if block_size not in wq.BLOCK_SIZES:
        raise ConfigError(f"block size {block_size} is not one of {', '.join(map(str, wq.BLOCK_SIZES))}")
    if accuracy_level not in wq.ACCURACY_LEVELS:
        raise ConfigError(f"accuracy level {accuracy_level} is not one of "
                          f"{', '.join(map(str, wq.ACCURACY_LEVELS))}", hint="4 (int8 activations) is fastest on CPU")


def _weight_only(src: Path, out_dir: Path, scheme: str, config, external_data: bool, provider: str, threads: int,
                 fp32_run, model, wrapper, contract, tokenizer, new_tokens: int):
    """Write the weight-only model beside the fp32 one and measure it (kept or not: decided later)."""
    dst = out_dir / WEIGHT_ONLY_FILES[scheme]
    details = wq.quantize_weight_only(src, dst, config, external_data=external_data)
    run = session_runner(open_session(dst, provider, threads), contract)
    quality = wq.measure_decode_quality(scheme, dst, fp32_run, run, details, model=model, wrapper=wrapper,
                                        contract=contract, vocab=_vocab(model), tokenizer=tokenizer,
                                        new_tokens=new_tokens)
    return quality, run


def _decide_weight_only(out_dir: Path, quality, latency: dict | None) -> dict:
    """Keep the weight-only model if within its bound and faster to decode; else remove it."""
    if not quality.decide():
        remove_onnx(out_dir / quality.file)
        if latency:
            drop_backend(latency, f"onnxruntime_{quality.scheme}")
    return quality.to_dict()


def _quantize(src: Path, dst: Path, external_data: bool, provider: str, threads: int, contract, wrapper,
              vocab: int, tokenizer, task: str):
    """Every weight matmul in int8; if that misses the accuracy bound, again with the MLP
    down-projections in fp32 (their inputs have the widest range: on MiniLM this halves the
    embedding error for ~10% of the speed-up). Returns the session and the accuracy (with attempts)."""
    metric, bound = opt.INT8_BOUNDS[task]
    attempts = []
    for keep in ([], opt.ffn_down_nodes(src)):
        if attempts and not keep:
            break
        details = opt.quantize_int8(src, dst, external_data=external_data, keep_fp32=keep)
        session = open_session(dst, provider, threads)
        accuracy = opt.int8_accuracy(session_runner(session, contract), wrapper, contract, vocab, tokenizer)
        attempts.append({**details, metric: accuracy[metric]})
        if accuracy[metric] >= bound:
            break
    accuracy["attempts"] = attempts
    accuracy["fp32_matmuls"] = attempts[-1]["fp32_matmuls"]
    return session, accuracy


def _decide_int8(out_dir: Path, latency: dict, accuracy: dict, task: str) -> dict:
    """Keep model.int8.onnx only if it is faster than fp32 and within the accuracy bound."""
    metric, bound = opt.INT8_BOUNDS[task]
    p50, fp32 = latency["onnxruntime_int8"]["p50_ms"], latency["onnxruntime"]["p50_ms"]
    within, faster = accuracy[metric] >= bound, p50 < fp32
    kept = within and faster
    if kept:
        reason = "Faster than fp32 and within the bound: kept beside model.onnx (which stays fp32)."
    else:
        why = [f"{metric} {accuracy[metric]:.4f} < {bound}"] * (not within) + ["not faster than fp32"] * (not faster)
        reason = f"Not kept ({'; '.join(why)}): only model.onnx (fp32) is in the directory."
        remove_onnx(out_dir / INT8_FILE)
        drop_backend(latency, "onnxruntime_int8")
    mixed = f", {accuracy['fp32_matmuls']} MLP down-projections kept fp32" if accuracy.get("fp32_matmuls") else ""
    return {"method": f"onnxruntime dynamic quantization (weights int8 per channel, activations uint8{mixed})",
            "file": INT8_FILE, "kept": kept, "accuracy": accuracy, "bound": {"metric": metric, "min": bound},
            "p50_ms": p50, "fp32_p50_ms": fp32, "ratio_to_fp32": p50 / fp32,
            "ratio_to_torch": p50 / latency["torch"]["p50_ms"], "reason": reason}


def _tensorrt(out_dir: Path, contract, shape_range, precision: str, model, wrapper, tokenizer, new_tokens: int,
              verify: bool):
    trt = trt_mod.require_tensorrt()
    section = trt_mod.build_engine(trt, out_dir / MODEL_FILE, out_dir, contract, shape_range, precision)
    runner = trt_mod.TensorRTRunner(trt, out_dir / ENGINE_FILE, order=list(contract.outputs))
    if verify:
        greedy_fits = (shape_range.min.batch <= 3 <= shape_range.max.batch
                       and shape_range.max.past >= 11 + new_tokens and shape_range.min.past == 0)
        parity = check_parity(runner, model, wrapper, contract, backend=f"tensorrt:{precision}",
                              tolerance=TOLERANCES[precision], new_tokens=new_tokens, tokenizer=tokenizer,
                              cases=cases_within(shape_range, contract.task), greedy=greedy_fits)
        section["parity"] = parity
        if not parity["passed"]:
            raise ParityError(f"the TensorRT engine does not match PyTorch: {failure_summary(parity)}",
                              hint="try --fp16 instead of --bf16, or fp32")
    return section, runner


def certify_export(model_dir: Path, out_dir: Path, report: dict, *, task: str, provider: str, threads: int,
                   new_tokens: int, verify: bool) -> None:
    """Add the adapter-to-engine certificate when the source came from ``hypermerge fold``.

    Raises:
        ParityError: the engine does not compute what base + adapter (unfolded) compute.
    """
    certificate = cert.fold_certificate(model_dir, report["source"]["weights_sha256"])
    if certificate is None:
        return
    e2e = (cert.end_to_end(out_dir, certificate, task=task, provider=provider, threads=threads, new_tokens=new_tokens)
           if verify else {"passed": None, "why": "not run (--no-verify)"})
    report["certificate"] = cert.finish(certificate, out_dir, report["parity"], e2e)
    if e2e.get("passed") is False:
        raise ParityError(f"the engine does not compute what the adapter model computes: {failure_summary(e2e)}",
                          path=model_dir, hint="fold with --verify to locate the difference; see the parity report")


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
    export_dir, report = open_export(export_dir)
    certificate = cert.verify_links(export_dir, report)  # names the first broken link, before any work
    recorded_source = (report.get("source") or {}).get("path")
    if source is None and not recorded_source:
        raise ExportError("the source model (the PyTorch reference) is not recorded: no report.json",
                          path=export_dir, hint="pass --source MODEL_DIR")
    source_path = Path(source or recorded_source)
    if not (source_path / "config.json").is_file():
        raise ExportError("the source model (the PyTorch reference) is not there", path=source_path,
                          hint="pass --source MODEL_DIR")
    tolerance = tolerance or TOLERANCES["fp32"]
    threads = threads or (report.get("latency") or {}).get("threads") or torch.get_num_threads()
    # the quantized file an export kept: model.int8.onnx, or a causal LM's weight-only model.int4.onnx
    quant_file = next((name for name in (INT8_FILE, WEIGHT_ONLY_FILES["int4"]) if (export_dir / name).exists()),
                      None)
    has_int8, has_engine = quant_file is not None, (export_dir / ENGINE_FILE).exists()
    quant_label = "int4" if quant_file == WEIGHT_ONLY_FILES["int4"] else "int8"
    names = ["loading", "parity"] + [quant_label] * has_int8 + ["TensorRT"] * has_engine + ["latency"]
    stage = _Stages(names, progress)
    try:
        stage("loading")
        session = open_session(export_dir / MODEL_FILE, provider, threads, exact=True)
        contract = session_contract(session)
        adapters = (report.get("source") or {}).get("adapters") or []
        # a patched export: the reference is the source with those adapters folded in
        model = reference_model(source_path, contract.task, adapters,
                                read_weights_map(export_dir) if adapters else None)
        wrapper, _ = wrap(model, contract.task)
        tokenizer = hf_tokenizer(export_dir)
        inputs, outputs = _io_spec(session)
        sha = weights_sha256(source_path)
        recorded = (report.get("source") or {}).get("weights_sha256")
        report.update({"format": FORMAT, "format_version": 1, "hypermerge": __version__, "verified_at": utc_now(),
                       "task": contract.task, "inputs": inputs, "outputs": outputs,
                       "model_file": MODEL_FILE})
        report.setdefault("opset", _opset(export_dir / MODEL_FILE))
        report.setdefault("exporter", "unknown (not exported by hypermerge)")
        report["source"] = {"path": str(source_path.absolute()), "weights_sha256": sha,
                            **({"weights_changed_since_export": recorded != sha} if recorded else {}),
                            **({"adapters": adapters} if adapters else {})}
        stage("parity")
        report["parity"] = check_parity(session_runner(session, contract), model, wrapper, contract,
                                        backend=f"onnxruntime:{session_provider(session)}", tolerance=tolerance,
                                        new_tokens=new_tokens, tokenizer=tokenizer)
        backends = {"onnxruntime": session_runner(session, contract)}
        failures = [] if report["parity"]["passed"] else [f"ONNX: {failure_summary(report['parity'])}"]
        accuracy = None
        if has_int8:
            stage(quant_label)
            int8 = open_session(export_dir / quant_file, provider, threads)
            accuracy = opt.int8_accuracy(session_runner(int8, contract), wrapper, contract, _vocab(model), tokenizer)
            backends[f"onnxruntime_{quant_label}"] = session_runner(int8, contract)
        if has_engine:
            stage("TensorRT")
            runner, failure = verify_engine(export_dir, report.setdefault("tensorrt", {}), contract,
                                            Reference(model, wrapper, tokenizer), new_tokens)
            if runner is not None:
                backends["tensorrt"] = runner
            failures += [failure] if failure else []
        stage("latency")
        batch, seq = _default_shape(contract.task, batch or (report.get("latency") or {}).get("batch"),
                                    seq or (report.get("latency") or {}).get("seq"))
        report["latency"] = measure(backends, wrapper, contract, _vocab(model), batch=batch, seq=seq,
                                    threads=threads, iters=iters)
        if accuracy is not None:
            metric, bound = opt.INT8_BOUNDS[contract.task]
            if contract.task == CAUSAL_LM:  # weight-only: its own bound
                metric, bound = "top1_agreement", wq.WEIGHT_ONLY_BOUNDS[quant_label]
            quant = report.setdefault("quantized", {"method": "onnxruntime dynamic quantization", "file": quant_file,
                                                    "kept": True, "bound": {"metric": metric, "min": bound}})
            p50 = report["latency"][f"onnxruntime_{quant_label}"]["p50_ms"]
            fp32 = report["latency"]["onnxruntime"]["p50_ms"]
            quant.update(accuracy=accuracy, p50_ms=p50, fp32_p50_ms=fp32, ratio_to_fp32=p50 / fp32,
                         ratio_to_torch=p50 / report["latency"]["torch"]["p50_ms"],
                         reason=f"Re-verified: {metric} {accuracy[metric]:.4f} (bound ≥ {bound}).")
            if accuracy[metric] < bound:
                failures.append(f"{quant_label}: {metric} {accuracy[metric]:.4f} below the bound {bound}")
        if certificate is not None:
            e2e = cert.end_to_end(export_dir, certificate, task=contract.task, provider=provider, threads=threads,
                                  new_tokens=new_tokens, adapters_before=certificate.get("adapters_before"),
                                  weights_map=read_weights_map(export_dir) if certificate.get("adapters_before")
                                  else None)
            report["certificate"] = cert.finish(certificate, export_dir, report["parity"], e2e)
            if e2e.get("passed") is False:
                failures.append(f"end to end (base + adapter vs the engine): {failure_summary(e2e)}")
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_report(export_dir, report)
    finally:
        stage.close()
    if failures:
        changed = report["source"].get("weights_changed_since_export")
        raise ParityError("verification failed: " + "; ".join(failures), path=export_dir,
                          hint="the source model's weights changed since export: re-export it" if changed else
                          "re-export the model; see report.md for every output")
    return Report(report, export_dir / "report.json")


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
