"""``--quantize``: a quantized copy beside the fp32 ``model.onnx``, measured for accuracy when it is
written and kept only once the latency shows it is also faster.

Encoders get onnxruntime's dynamic int8 (``model.int8.onnx``); causal LMs weight-only int4 / int8
(MatMulNBits, ``model.int4.onnx`` / ``model.int8.onnx``) judged by next-token agreement. ``fp16``
(any task) is the graph in float16 for the CUDA provider (``model.fp16.onnx``, see ``export.fp16``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from hypermerge.export import fp16 as half
from hypermerge.export import optimize as opt
from hypermerge.export import quantize as wq
from hypermerge.export.onnx_files import remove_onnx
from hypermerge.export.plan import ExportRun
from hypermerge.export.report import Int8Section
from hypermerge.export.tasks import CAUSAL_LM
from hypermerge.export.verification import Reference, drop_backend, onnx_label, onnx_runner
from hypermerge.runtime.files import FP16_FILE, INT8_FILE, WEIGHT_ONLY_FILES
from hypermerge.runtime.ort import open_session

# the decision, once the latency is known: the latency section -> the report's ``quantized`` section
Decision = Callable[[dict | None], dict]


def quantized(run: ExportRun, stage: Callable[[str], None]) -> Decision:
    """Write and measure the quantized model (a backend of the latency run); returns how to decide."""
    o = run.options
    if o.quantize == "fp16":
        stage("fp16")
        quality, run.backends[half.BACKEND] = fp16_model(run, max(o.new_tokens, 32))
        return functools.partial(half.decide_fp16, run.out, quality)
    if run.plan.task == CAUSAL_LM:
        stage(o.quantize)
        config = wq.WeightOnlyConfig(wq.BITS[o.quantize], o.block_size, o.accuracy_level)
        quality, run.backends[f"onnxruntime_{o.quantize}"] = weight_only(
            run.served, run.out, o.quantize, config, run.report["external_data"], o.provider, o.threads,
            run.backends["onnxruntime"], run.reference, run.contract, max(o.new_tokens, 32))
        return functools.partial(decide_weight_only, run.out, quality)
    stage("int8")
    int8, accuracy = int8_with_fallback(run.served, run.out / INT8_FILE, run.report["external_data"], o.provider,
                                        o.threads, run.contract, run.reference.wrapper, run.reference.vocab,
                                        run.reference.tokenizer, run.plan.task)
    run.backends["onnxruntime_int8"] = onnx_runner(int8, run.contract)
    return functools.partial(decide_int8, run.out, accuracy=accuracy, task=run.plan.task)


def fp16_model(run: ExportRun, new_tokens: int):
    """Write ``model.fp16.onnx`` from the served fp32 model and measure it (kept or not: decided later).

    Returns:
        Its quality (:class:`~hypermerge.export.fp16.Fp16Quality`) and its runner.
    """
    dst = run.out / FP16_FILE
    details = half.convert_fp16(run.served, dst, external_data=run.report["external_data"])
    session = open_session(dst, run.options.provider, run.options.threads)
    runner = onnx_runner(session, run.contract)
    return half.measure_fp16(dst, runner, onnx_label(session), details, run.reference, run.contract,
                             new_tokens), runner


def weight_only(src: Path, out_dir: Path, scheme: str, config, external_data: bool, provider: str, threads: int,
                fp32_run, reference: Reference, contract, new_tokens: int):
    """Write the weight-only model beside the fp32 one and measure it (kept or not: decided later).

    Returns:
        Its decode quality and its runner.
    """
    dst = out_dir / WEIGHT_ONLY_FILES[scheme]
    details = wq.quantize_weight_only(src, dst, config, external_data=external_data)
    run = onnx_runner(open_session(dst, provider, threads), contract)
    quality = wq.measure_decode_quality(scheme, dst, fp32_run, run, details, model=reference.model,
                                        wrapper=reference.wrapper, contract=contract, vocab=reference.vocab,
                                        tokenizer=reference.tokenizer, new_tokens=new_tokens)
    return quality, run


def decide_weight_only(out_dir: Path, quality, latency: dict | None) -> dict:
    """Keep the weight-only model if within its bound and faster to decode; else remove it."""
    if not quality.decide():
        remove_onnx(out_dir / quality.file)
        if latency:
            drop_backend(latency, f"onnxruntime_{quality.scheme}")
    return quality.to_dict()


def int8_with_fallback(src: Path, dst: Path, external_data: bool, provider: str, threads: int, contract, wrapper,
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
        accuracy = opt.int8_accuracy(onnx_runner(session, contract), wrapper, contract, vocab, tokenizer)
        attempts.append({**details, metric: accuracy[metric]})
        if accuracy[metric] >= bound:
            break
    accuracy["attempts"] = attempts
    accuracy["fp32_matmuls"] = attempts[-1]["fp32_matmuls"]
    return session, accuracy


def decide_int8(out_dir: Path, latency: dict, accuracy: dict, task: str) -> dict:
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
    return Int8Section(f"onnxruntime dynamic quantization (weights int8 per channel, activations uint8{mixed})",
                       INT8_FILE, kept, accuracy, {"metric": metric, "min": bound}, p50, fp32, p50 / fp32,
                       p50 / latency["torch"]["p50_ms"], reason).to_dict()
