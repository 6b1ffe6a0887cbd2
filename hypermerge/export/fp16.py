"""``--quantize fp16``: ``model.fp16.onnx``, the export with its weights and compute in float16, for
onnxruntime's CUDA provider (tensor cores, half the weight stream), beside the fp32 ``model.onnx``.

onnxruntime's own converter (``onnxruntime.transformers.float16``) rewrites every float tensor and
op to float16 except the ops in its block list; the inputs and outputs keep their types (int64 ids,
float32 logits, embeddings and KV cache, with a Cast at each end), so ``hm.OnnxModel`` and ``serve``
run the file unchanged.

Measured like the int8 file: the task's int8 metric and bound (``opt.INT8_BOUNDS``: embedding
cosine or top-1 agreement with PyTorch fp32), the per-output error against PyTorch at fp16's
tolerance, and for causal LMs the greedy decode's agreement length. Kept only within the bound and
faster than fp32 on the export's provider (the forward for encoders, one decode step for causal
LMs). A CPU has no fast float16 matmul: on the CPU provider it is no reliable gain (MiniLM's forward
0.94× fp32, kept; SmolLM2-135M's decode step 1.10×, dropped; one run each on onnxruntime 1.32).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypermerge.errors import ExportError
from hypermerge.export import optimize as opt
from hypermerge.export import quantize as wq
from hypermerge.export.onnx_files import remove_onnx
from hypermerge.export.parity import TOLERANCES, compare_outputs
from hypermerge.export.report import Fp16Section
from hypermerge.export.tasks import CAUSAL_LM, IOContract
from hypermerge.export.verification import Reference, drop_backend
from hypermerge.runtime.model import Runner

BACKEND = "onnxruntime_fp16"  # its name in the latency section
METHOD = "onnxruntime float16 converter (weights and compute fp16, inputs and outputs as in model.onnx)"
# op types kept fp32 beyond the converter's defaults: none so far. The converter keeps every fp32
# input and output, and on MiniLM and tiny Bert / Llama models LayerNorm and Softmax in fp16 stayed
# within the bound (max |Δ logits| 5e-4 on MiniLM), so nothing is blocked until a model shows it must be.
OP_BLOCK_LIST: tuple[str, ...] = ()


def convert_fp16(src: Path, dst: Path, *, external_data: bool = False,
                 op_block_list: tuple[str, ...] = OP_BLOCK_LIST) -> dict:
    """Write ``dst``: ``src`` in float16, its inputs and outputs in their original types.

    Args:
        op_block_list: op types left in fp32, beside the converter's own list.

    Returns:
        ``{"method", "converter", "keep_io_types", "op_block_list", "initializers_fp16", "initializers_fp32"}``.

    Raises:
        ExportError: the converter failed.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    try:
        with opt.silenced():
            # a path, not a model: the converter then infers shapes from the file (models over 2 GB too)
            half = convert_float_to_float16(str(src), keep_io_types=True,
                                            op_block_list=[*DEFAULT_OP_BLOCK_LIST, *op_block_list])
        dst.unlink(missing_ok=True)
        onnx.save_model(half, str(dst), save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data")
    except Exception as exc:  # the converter raises anything from AssertionError to onnx errors
        raise ExportError(f"fp16 conversion failed ({type(exc).__name__}: {exc})", path=src,
                          hint="export without --quantize fp16") from exc
    types = [tensor.data_type for tensor in half.graph.initializer]
    return {"method": METHOD, "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
            "keep_io_types": True, "op_block_list": list(op_block_list),
            "initializers_fp16": types.count(onnx.TensorProto.FLOAT16),
            "initializers_fp32": types.count(onnx.TensorProto.FLOAT)}


def timed(latency: dict, task: str) -> tuple[str, float, float, float]:
    """What the keep decision compares: the forward for encoders, one decode step for causal LMs.

    Returns:
        ``(shape, fp16 p50 ms, fp32 p50 ms, torch p50 ms)`` from a latency section held as a dict.
    """
    shape = "decode_step" if task == CAUSAL_LM and latency.get("decode_step") else "forward"
    timings = latency["decode_step"] if shape == "decode_step" else latency
    return shape, timings[BACKEND]["p50_ms"], timings["onnxruntime"]["p50_ms"], timings["torch"]["p50_ms"]


@dataclasses.dataclass
class Fp16Quality:
    """What was measured of ``model.fp16.onnx`` before the latency run; :meth:`section` decides."""

    task: str
    file: str
    details: dict
    backend: str
    accuracy: dict  # opt.int8_accuracy()
    parity: dict  # compare_outputs() at fp16's tolerance
    greedy: dict | None = None

    @property
    def bound(self) -> tuple[str, float]:
        """The task's int8 metric and its minimum (fp16 must keep at least what int8 must)."""
        return opt.INT8_BOUNDS[self.task]

    def section(self, latency: dict) -> Fp16Section:
        """Kept when within the bound and faster than fp32 on this provider; the section says why."""
        metric, bound = self.bound
        shape, p50, fp32, torch_p50 = timed(latency, self.task)
        within, faster = self.accuracy[metric] >= bound, p50 < fp32
        if within and faster:
            reason = f"Within the bound and {p50 / fp32:.2f}× fp32's time: kept beside model.onnx (which stays fp32)."
        else:
            why = [f"{metric} {self.accuracy[metric]:.4f} < {bound}"] * (not within)
            cpu = "; a CPU has no fast fp16 matmul: fp16 is for the CUDA provider" if "CPU" in self.backend else ""
            why += [f"not faster than fp32 on {self.backend} ({p50 / fp32:.2f}× its time{cpu})"] * (not faster)
            reason = f"Not kept ({'; '.join(why)}): only model.onnx (fp32) is in the directory."
        return Fp16Section(METHOD, self.file, within and faster, self.details, self.backend, self.accuracy,
                           {"metric": metric, "min": bound}, self.parity, shape, p50, fp32, p50 / fp32,
                           p50 / torch_p50, reason, self.greedy)


def measure_fp16(path: Path, run: Runner, backend: str, details: dict, reference: Reference,
                 contract: IOContract, new_tokens: int = 32) -> Fp16Quality:
    """Everything the report says about ``model.fp16.onnx`` but its time (the latency run measures it).

    Args:
        run, backend: the fp16 model's runner and its ``onnxruntime:<provider>`` label.
        new_tokens: greedy tokens compared with PyTorch (causal LMs).
    """
    ref = reference
    accuracy = opt.int8_accuracy(run, ref.wrapper, contract, ref.vocab, ref.tokenizer)
    tolerance = TOLERANCES["fp16"]
    parity = {"tolerance": dataclasses.asdict(tolerance),
              **compare_outputs(run, ref.wrapper, contract, ref.vocab, tolerance)}
    greedy = None
    if contract.task == CAUSAL_LM:
        greedy = wq.greedy_against_torch(run, ref.model, contract, ref.vocab, ref.tokenizer, new_tokens)
    return Fp16Quality(contract.task, path.name, details, backend, accuracy, parity, greedy)


def decide_fp16(out_dir: Path, quality: Fp16Quality, latency: dict) -> dict:
    """Keep ``model.fp16.onnx`` only within its bound and faster than fp32; else remove it and its
    latency entry. Returns the report's ``quantized`` section."""
    section = quality.section(latency)
    if not section.kept:
        remove_onnx(out_dir / quality.file)
        drop_backend(latency, BACKEND)
    return section.to_dict()
