"""Weight-only quantization of causal LMs for decoding (``--quantize int4`` / ``int8``).

On a CPU, decoding one token reads every weight once: it is memory-bound, and the weight stream
is what quantization shrinks. Every MatMul with a constant weight (the attention and MLP
projections and the LM head) becomes onnxruntime's ``com.microsoft.MatMulNBits``: weights in
blocks of ``block_size`` along the input dimension, each block with its own scale (symmetric), 4 or
8 bits; activations stay float (``accuracy_level`` 4 lets the kernel quantize them to int8 per block
on the fly, its fastest CPU path). The KV cache, attention and norms are untouched.

What the report says about it (:class:`DecodeQuality`): the next-token top-1 agreement with PyTorch
fp32 at every valid position of the built-in sentences, the greedy-decode agreement length
(tokens until the first divergence from PyTorch's ``generate``) per prompt, and decode tokens/s
at batch 1 and 4 against the fp32 ONNX model, on the same prompt, interleaved.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from hypermerge.errors import ExportError
from hypermerge.export.report import WeightOnlySection
from hypermerge.export.runtime import Runner, decode
from hypermerge.export.tasks import IOContract
from hypermerge.runtime.files import WEIGHT_ONLY_FILES  # noqa: F401 (its old home)

BITS = {"int4": 4, "int8": 8}
# what a weight-only model must keep to be kept: next-token top-1 agreement with PyTorch fp32
# (int4 moves a few near-ties; the onnxruntime-genai int4 is the bar it has to beat)
WEIGHT_ONLY_BOUNDS = {"int4": 0.90, "int8": 0.99}
SPEED_BATCHES = (1, 4)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 the kernel's default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
SPEED_PROMPT = "The history of the printing press begins in the fifteenth century, when"


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """How the weights are quantized.

    Args:
        bits: 4 or 8.
        block_size: weights per scale along the input dimension (a power of two, 16..256).
        accuracy_level: MatMulNBits compute type: 0 the kernel's default, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations (fastest on CPU).
        symmetric: scales only (no zero points): one load less per block.
    """

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True

    def describe(self) -> str:
        activations = {4: "activations int8 per block in the kernel", 1: "activations fp32"}.get(
            self.accuracy_level, f"accuracy_level {self.accuracy_level}")
        return (f"onnxruntime MatMulNBits weight-only (weights int{self.bits}, blocks of {self.block_size}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}; {activations})")


def untie_transposed_weights(model) -> int:
    """Give every ``MatMul(x, Transpose(W))`` with a constant ``W`` its own transposed initializer.

    A tied LM head (SmolLM2, GPT-2) exports as ``MatMul(hidden, Transpose(embed_tokens.weight))``:
    the quantizer only sees constant weights, and the head is the largest matrix of a small LM.

    Returns:
        How many MatMuls were rewritten.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{source.input[0]}.transposed"
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(initializers[name])
        consumers[node.input[1]] -= 1
        node.input[1] = name
        rewritten += 1
    # the Transposes no one reads any more (onnxruntime would drop them, the quantizer would not)
    dead = [node for node in graph.node if node.op_type == "Transpose" and not consumers.get(node.output[0])
            and node.output[0] not in {o.name for o in graph.output}]
    for node in dead:
        graph.node.remove(node)
    return rewritten


def quantize_weight_only(src: Path, dst: Path, config: WeightOnlyConfig, *, external_data: bool = False) -> dict:
    """Write ``dst``: ``src`` with every constant-weight MatMul as MatMulNBits.

    Returns:
        ``{"method", "bits", "block_size", "accuracy_level", "matmuls_quantized", "matmuls_fp32",
        "untied"}``.

    Raises:
        ExportError: the quantizer failed.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from hypermerge.export.optimize import silenced

    try:
        model = onnx.load(str(src))
        untied = untie_transposed_weights(model)
        before = sum(node.op_type == "MatMul" for node in model.graph.node)
        with silenced():
            quantizer = MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block_size,
                                             is_symmetric=config.symmetric,
                                             accuracy_level=config.accuracy_level or None,
                                             op_types_to_quantize=("MatMul",))
            quantizer.process()
        quantized = quantizer.model.model
        left = sum(node.op_type == "MatMul" for node in quantized.graph.node)
        dst.unlink(missing_ok=True)
        onnx.save_model(quantized, str(dst), save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data")
    except Exception as exc:  # the quantizer raises anything from AssertionError to onnx errors
        raise ExportError(f"int{config.bits} weight-only quantization failed ({type(exc).__name__}: {exc})",
                          path=src, hint="export without --quantize") from exc
    return {"method": config.describe(), "bits": config.bits, "block_size": config.block_size,
            "accuracy_level": config.accuracy_level, "matmuls_quantized": before - left, "matmuls_fp32": left,
            "untied": untied}


def greedy_agreement(run: Runner, contract: IOContract, ids: np.ndarray, mask: np.ndarray,
                     reference: np.ndarray) -> dict:
    """Greedy tokens of ``run`` against ``reference`` (PyTorch's ``generate`` on the same prompts).

    Returns:
        ``{"new_tokens", "lengths": [tokens until the first divergence, per prompt], "mean_length",
        "all_equal"}``.
    """
    actual = decode(run, contract, ids, mask, max_new_tokens=reference.shape[1])
    lengths = []
    for row in range(reference.shape[0]):
        differs = np.flatnonzero(actual[row] != reference[row])
        lengths.append(int(differs[0]) if differs.size else int(reference.shape[1]))
    return {"new_tokens": int(reference.shape[1]), "prompts": int(reference.shape[0]), "lengths": lengths,
            "mean_length": float(np.mean(lengths)), "all_equal": all(n == reference.shape[1] for n in lengths)}


def greedy_against_torch(run: Runner, model, contract: IOContract, vocab: int, tokenizer=None,
                         new_tokens: int = 32) -> dict:
    """:func:`greedy_agreement` of ``run`` on the built-in greedy prompts against PyTorch's
    ``generate`` on ``model`` (what a weight-only or fp16 model's report quotes)."""
    from hypermerge.export.parity import greedy_prompts, torch_greedy

    ids, mask = greedy_prompts(vocab, tokenizer)
    return greedy_agreement(run, contract, ids, mask, torch_greedy(model, ids, mask, new_tokens))


def speed_prompt(contract: IOContract, batch: int, vocab: int, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """The same prompt ``batch`` times (real text when there is a tokenizer)."""
    if tokenizer is not None:
        ids = np.asarray(tokenizer(SPEED_PROMPT)["input_ids"], dtype=np.int64)
    else:
        ids = np.random.default_rng(0).integers(0, vocab, 16).astype(np.int64)
    ids = np.tile(ids[None], (batch, 1))
    return ids, np.ones_like(ids)


def decode_speed(runners: dict[str, Runner], contract: IOContract, vocab: int, tokenizer=None, *,
                 new_tokens: int = 32, batches: tuple[int, ...] = SPEED_BATCHES, rounds: int = 3) -> dict:
    """Greedy decode tokens/s of each runner at each batch size: same prompt, rounds interleaved
    (a loaded machine slows both alike), the median round quoted.

    Returns:
        ``{"new_tokens", "rounds", "batch_<n>": {runner: tokens/s}}``.
    """
    section: dict = {"new_tokens": new_tokens, "rounds": rounds, "prompt": "tokenized text" if tokenizer else
                     "random ids"}
    for batch in batches:
        ids, mask = speed_prompt(contract, batch, vocab, tokenizer)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(rounds + 1):  # round 0 warms up
            for name, run in runners.items():
                start = time.perf_counter()
                decode(run, contract, ids, mask, max_new_tokens=new_tokens)
                if round_:
                    times[name].append(time.perf_counter() - start)
        section[f"batch_{batch}"] = {name: batch * new_tokens / float(np.median(values))
                                     for name, values in times.items()}
    return section


@dataclasses.dataclass
class DecodeQuality:
    """The report's weight-only section (``report["quantized"]`` for causal LMs)."""

    scheme: str  # int4 or int8
    file: str
    details: dict
    top1: dict  # next-token agreement with PyTorch fp32 (opt.int8_accuracy's dict)
    greedy: dict  # greedy_agreement()
    speed: dict  # decode_speed(): tokens/s of fp32 ONNX and the quantized model
    bound: float
    kept: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float:
        """Quantized vs fp32 ONNX decode tokens/s at batch 1."""
        batch1 = self.speed[f"batch_{SPEED_BATCHES[0]}"]
        return batch1["quantized"] / batch1["fp32"]

    def decide(self) -> bool:
        """Kept when within the agreement bound and faster than fp32 at batch 1."""
        within, faster = self.top1["top1_agreement"] >= self.bound, self.speedup > 1.0
        self.kept = within and faster
        if self.kept:
            self.reason = f"Within the bound and {self.speedup:.2f}× fp32's decode speed: kept beside model.onnx."
        else:
            why = [f"top-1 agreement {self.top1['top1_agreement']:.4f} < {self.bound}"] * (not within)
            why += [f"not faster than fp32 ({self.speedup:.2f}×)"] * (not faster)
            self.reason = f"Not kept ({'; '.join(why)}): only model.onnx (fp32) is in the directory."
        return self.kept

    def section(self) -> WeightOnlySection:
        """The report's ``quantized`` section as of now (decide first: it sets ``kept`` and ``reason``)."""
        return WeightOnlySection(self.scheme, self.details["method"], self.file, self.kept, self.details, self.top1,
                                 {"metric": "top1_agreement", "min": self.bound}, self.greedy, self.speed,
                                 self.speedup, self.reason)

    def to_dict(self) -> dict:
        """The section as report.json holds it."""
        return self.section().to_dict()


def measure_decode_quality(scheme: str, path: Path, fp32_run: Runner, run: Runner, details: dict, *, model,
                           wrapper, contract: IOContract, vocab: int, tokenizer=None,
                           new_tokens: int = 32) -> DecodeQuality:
    """Everything the report says about a weight-only model (not yet decided: see :meth:`DecodeQuality.decide`).

    Args:
        fp32_run, run: the fp32 ONNX model and the quantized one.
        model, wrapper: the PyTorch fp32 model (``generate``) and its export wrapper (one forward).
        new_tokens: greedy tokens compared with PyTorch, and generated per tokens/s round.
    """
    from hypermerge.export.optimize import int8_accuracy

    top1 = int8_accuracy(run, wrapper, contract, vocab, tokenizer)
    greedy = greedy_against_torch(run, model, contract, vocab, tokenizer, new_tokens)
    speed = decode_speed({"fp32": fp32_run, "quantized": run}, contract, vocab, tokenizer, new_tokens=new_tokens)
    return DecodeQuality(scheme, path.name, details, top1, greedy, speed, WEIGHT_ONLY_BOUNDS[scheme])
