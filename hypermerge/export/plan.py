"""What ``hypermerge export`` will do, checked before anything is written: its options
(:class:`ExportOptions`, ``hm.export_model``'s keyword arguments as one object), the plan they
resolve to for a model directory, and the state one export run carries from stage to stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hypermerge._fs import require_dir
from hypermerge.errors import ConfigError
from hypermerge.export import quantize as wq
from hypermerge.export import tensorrt as trt_mod
from hypermerge.export.adapter_inputs import ScaleInputs
from hypermerge.export.onnx_export import DEFAULT_OPSET
from hypermerge.export.parity import TOLERANCES, Tolerance
from hypermerge.export.tasks import CAUSAL_LM, IOContract, check_task, detect_task, read_config
from hypermerge.export.verification import Reference
from hypermerge.runtime.files import QUANTIZED_FILES
from hypermerge.runtime.model import Runner
from hypermerge.runtime.ort import open_session

# latency defaults: the MiniLM benchmark shape for encoders; a 64-token prompt for causal LMs
DEFAULT_LATENCY_SHAPE = {"encoder": (8, 64), CAUSAL_LM: (1, 64)}


@dataclasses.dataclass
class ExportOptions:
    """What ``hm.export_model`` does beyond the model and output directories (its keyword arguments).

    Attributes:
        task: auto (from ``config.architectures``), feature-extraction, sequence-classification or causal-lm.
        optimize: apply onnxruntime's transformer optimizer; parity is re-checked on the result.
        quantize: "int8", "int4" or "fp16". Encoders: int8 dynamic quantization, kept as
            ``model.int8.onnx`` only if it is faster and within the accuracy bound. Causal LMs:
            weight-only (MatMulNBits, ``block_size`` weights per scale, ``accuracy_level`` its compute
            type), kept as ``model.int4.onnx`` / ``model.int8.onnx`` only if within its next-token
            agreement bound and faster to decode. fp16 (any task): the graph in float16 for
            onnxruntime's CUDA provider, kept as ``model.fp16.onnx`` only if within int8's bound and
            faster than fp32 on ``provider``. ``model.onnx`` stays fp32 either way.
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
    """

    task: str = "auto"
    opset: int = DEFAULT_OPSET
    optimize: bool = False
    quantize: str | None = None
    trt: bool = False
    precision: str = "fp32"
    shapes: str | None = None
    verify: bool = True
    overwrite: bool = False
    batch: int | None = None
    seq: int | None = None
    threads: int | None = None
    iters: int = 30
    external_data: bool | None = None
    tolerance: Tolerance | None = None
    new_tokens: int = 16
    provider: str = "auto"
    progress: bool = True
    adapter_inputs: bool = False
    block_size: int = 32
    accuracy_level: int = 4
    profile: dict | None = None

    def check(self, task: str) -> None:
        """Raise ConfigError for an option that cannot apply to ``task`` (before anything is loaded)."""
        check_quantize(self.quantize, task, self.block_size, self.accuracy_level)
        if not self.trt and (self.precision != "fp32" or self.shapes):
            raise ConfigError("--fp16, --bf16 and --shapes apply to TensorRT engines", hint="add --trt")
        if self.adapter_inputs and self.trt:
            # TensorRT's ONNX parser takes an input that has a default (an initializer of the same
            # name) for a constant, which would bake the identity scales into the engine
            raise ConfigError("--adapter-inputs cannot be combined with --trt yet",
                              hint="serve adapter inputs with onnxruntime, or hypermerge patch --trt per adapter")
        if self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old for the exporter", hint="use --opset 17 or newer")


def check_quantize(quantize: str | None, task: str, block_size: int, accuracy_level: int) -> None:
    """Raise ConfigError for an unknown scheme, int4 on an encoder, or a block size / level onnxruntime lacks
    (fp16 ignores the block size and level, as int8 does on an encoder)."""
    if quantize not in (None, *QUANTIZED_FILES):
        raise ConfigError(f"unknown quantization {quantize!r}", hint=f"use {' or '.join(QUANTIZED_FILES)}")
    if quantize == "int4" and task != CAUSAL_LM:
        raise ConfigError(f"int4 is weight-only quantization for decoding causal LMs; this is {task}",
                          hint="use --quantize int8 for encoders")
    if block_size not in wq.BLOCK_SIZES:
        raise ConfigError(f"block size {block_size} is not one of {', '.join(map(str, wq.BLOCK_SIZES))}")
    if accuracy_level not in wq.ACCURACY_LEVELS:
        raise ConfigError(f"accuracy level {accuracy_level} is not one of "
                          f"{', '.join(map(str, wq.ACCURACY_LEVELS))}", hint="4 (int8 activations) is fastest on CPU")


def default_shape(task: str, batch: int | None, seq: int | None) -> tuple[int, int]:
    """The latency shape: the given batch and seq, else the task's default."""
    default = DEFAULT_LATENCY_SHAPE[CAUSAL_LM if task == CAUSAL_LM else "encoder"]
    return batch or default[0], seq or default[1]


@dataclasses.dataclass
class ExportPlan:
    """An export whose options were all checked: nothing is written before this exists."""

    model_dir: Path
    config: dict
    task: str
    options: ExportOptions  # defaults resolved: tolerance, batch, seq, threads
    shape_range: trt_mod.ShapeRange | None

    def stage_names(self) -> list[str]:
        """The progress bar's stages, in order."""
        o = self.options
        names = ["loading the model", "exporting to ONNX"] + ["parity"] * o.verify + ["adapter inputs"] * (
            o.adapter_inputs and o.verify) + ["optimizing"] * o.optimize
        return names + [str(o.quantize)] * bool(o.quantize) + ["TensorRT"] * o.trt + ["latency", "weights map"]


def plan_export(model_dir: str | Path, options: ExportOptions) -> ExportPlan:
    """Check the model directory and every option, TensorRT's availability included.

    Raises:
        ExportError: not a model directory, or an unsupported architecture.
        ConfigError: an invalid option.
        BackendUnavailableError: --trt without TensorRT and a CUDA GPU.
    """
    model_dir = require_dir(model_dir, "model directory").absolute()
    config = read_config(model_dir)
    task = detect_task(config, model_dir / "config.json") if options.task == "auto" else check_task(options.task)
    options.check(task)
    shape_range = trt_mod.parse_shapes(options.shapes, task) if options.trt else None
    if options.trt:
        trt_mod.builder_flags(trt_mod.require_tensorrt(), options.precision)  # before anything is written
    batch, seq = default_shape(task, options.batch, options.seq)
    resolved = dataclasses.replace(options, tolerance=options.tolerance or TOLERANCES["fp32"], batch=batch,
                                   seq=seq, threads=options.threads or torch.get_num_threads())
    return ExportPlan(model_dir, config, task, resolved, shape_range)


@dataclasses.dataclass
class ExportRun:
    """One export in progress: the reference model, the ONNX session and the backends measured."""

    plan: ExportPlan
    out: Path  # the temporary output directory
    reference: Reference
    contract: IOContract
    scales: ScaleInputs | None
    label: str = ""  # the report's name for the onnxruntime backend
    session: object = None
    report: dict = dataclasses.field(default_factory=dict)
    backends: dict[str, Runner] = dataclasses.field(default_factory=dict)
    served: Path | None = None  # the fp32 model the latency runs on (the optimized one, with --optimize)

    @property
    def options(self) -> ExportOptions:
        return self.plan.options

    def open(self, path: Path) -> object:
        """An exact (no graph rewrites) onnxruntime session on ``path`` with the export's provider and threads."""
        return open_session(path, self.options.provider, self.options.threads, exact=True)

    def parity(self, runner: Runner, **kwargs) -> dict:
        """The reference's parity section for ``runner`` at the export's tolerance and greedy length."""
        kwargs.setdefault("backend", self.label)
        kwargs.setdefault("tolerance", self.options.tolerance)
        return self.reference.parity(runner, self.contract, new_tokens=self.options.new_tokens, **kwargs)
