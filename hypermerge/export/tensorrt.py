"""``--trt``: a TensorRT engine built from the exported ONNX with the ``tensorrt`` Python API.

    ONNX parser -> network -> builder config (optimisation profile from --shapes, FP16/BF16, REFIT,
    timing cache kept in the output dir) -> serialized engine -> execution context fed with torch
    CUDA tensors for the same parity and latency checks as onnxruntime.

Written against TensorRT 10's API (``build_serialized_network``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``). The construction logic takes the ``tensorrt`` module
as an argument, so it is unit-tested with a stand-in exposing the same attribute names; nothing here
has run on a real TensorRT yet (docs/export.md, "TensorRT"; README, "What has been run").
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from hypermerge.errors import BackendUnavailableError, ConfigError, ExportError
from hypermerge.export.report import TensorRTSection
from hypermerge.export.tasks import CAUSAL_LM, IOContract
from hypermerge.runtime.files import ENGINE_FILE, TIMING_CACHE_FILE

INSTALL_HINT = ("pip install 'hypermerge[trt]' (the tensorrt wheel, CUDA 12) with a CUDA build of torch, "
                "on a machine with an NVIDIA GPU")
PRECISIONS = ("fp32", "fp16", "bf16")
# defaults for --shapes: min:opt:max as batch x seq (x past for causal LMs)
DEFAULT_SHAPES = {"encoder": "1x1:8x128:32x512", CAUSAL_LM: "1x1x0:1x1x256:8x512x2048"}


def require_tensorrt():
    """The ``tensorrt`` module, checked before anything is written.

    Raises:
        BackendUnavailableError: ``import tensorrt`` fails or torch sees no CUDA device.
    """
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed (import tensorrt failed)", hint=INSTALL_HINT) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch sees none here", hint=INSTALL_HINT)
    return tensorrt


@dataclasses.dataclass(frozen=True)
class ShapePoint:
    batch: int
    seq: int
    past: int = 0


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """An optimisation profile in model terms: min / opt / max of batch, sequence and past length."""

    min: ShapePoint
    opt: ShapePoint
    max: ShapePoint

    def as_dict(self) -> dict:
        return {key: dataclasses.asdict(getattr(self, key)) for key in ("min", "opt", "max")}


def parse_shapes(text: str | None, task: str) -> ShapeRange:
    """Parse ``--shapes min:opt:max``: each point ``BxS`` (encoders) or ``BxSxP`` (causal LMs, P = past).

    Raises:
        ConfigError: malformed, or not min <= opt <= max on every axis.
    """
    causal = task == CAUSAL_LM
    text = text or DEFAULT_SHAPES[CAUSAL_LM if causal else "encoder"]
    form = "BxSxP:BxSxP:BxSxP (batch x sequence x past length)" if causal else "BxS:BxS:BxS (batch x sequence)"
    parts = text.split(":")
    pattern = r"(\d+)x(\d+)x(\d+)" if causal else r"(\d+)x(\d+)"
    matches = [re.fullmatch(pattern, part.strip().lower()) for part in parts]
    if len(parts) != 3 or not all(matches):
        raise ConfigError(f"--shapes {text!r} is not of the form {form}", hint="e.g. "
                          + DEFAULT_SHAPES[CAUSAL_LM if causal else "encoder"])
    points = [ShapePoint(*(int(v) for v in m.groups())) for m in matches]
    for axis in ("batch", "seq", "past"):
        low, mid, high = (getattr(p, axis) for p in points)
        if not low <= mid <= high:
            raise ConfigError(f"--shapes {text!r}: {axis} must satisfy min <= opt <= max ({low}, {mid}, {high})")
    for axis in ("batch", "seq"):
        if getattr(points[0], axis) < 1:
            raise ConfigError(f"--shapes {text!r}: the minimum {axis} must be at least 1")
    return ShapeRange(*points)


def profile_shapes(contract: IOContract, shapes: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min / opt / max shape of every graph input for one optimisation profile."""
    def dims(name: str, p: ShapePoint) -> tuple[int, ...]:
        if name.startswith("past_"):
            return (p.batch, contract.kv_heads, p.past, contract.head_dim)
        if name == "attention_mask" and contract.task == CAUSAL_LM:
            return (p.batch, p.past + p.seq)  # the mask covers past and new tokens
        return (p.batch, p.seq)

    return {name: tuple(dims(name, p) for p in (shapes.min, shapes.opt, shapes.max)) for name in contract.inputs}


def builder_flags(trt, precision: str) -> list:
    """Builder flags: REFIT always (weights can be swapped into a built engine), plus FP16 or BF16.

    Raises:
        ConfigError: unknown precision.
        BackendUnavailableError: this TensorRT has no BF16 (before 9.0).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    flags = [trt.BuilderFlag.REFIT]
    if precision == "fp16":
        flags.append(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise BackendUnavailableError("this TensorRT has no BF16 support", hint="use TensorRT >= 9, or --fp16")
        flags.append(trt.BuilderFlag.BF16)
    return flags


def build_engine(trt, onnx_path: Path, out_dir: Path, contract: IOContract, shapes: ShapeRange, precision: str,
                 *, workspace_gib: float = 4.0) -> dict:
    """Parse ``onnx_path``, build a serialized engine into ``out_dir/model.engine`` and keep the timing
    cache in ``out_dir/timing.cache`` (an existing one is reused: rebuilds skip kernel timing).

    Returns:
        The ``tensorrt`` report section (version, precision, profile, flags, files), as report.json
        holds it (``TensorRTSection.from_dict`` reads it back typed).

    Raises:
        ExportError: the parser rejects the graph or the builder returns no engine.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights in model.onnx.data are found next to the model
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected the model ({errors[0] if errors else 'no detail'})",
                          path=onnx_path, hint="try another --opset, or export without --optimize")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    flags = builder_flags(trt, precision)
    for flag in flags:
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    per_input = profile_shapes(contract, shapes)
    for name, (low, mid, high) in per_input.items():
        profile.set_shape(name, low, mid, high)
    config.add_optimization_profile(profile)
    cache_path = out_dir / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT's builder returned no engine", path=onnx_path,
                          hint="its log above says why; a smaller --shapes max or more GPU memory often helps")
    (out_dir / ENGINE_FILE).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return TensorRTSection(getattr(trt, "__version__", "unknown"), precision,
                           [str(getattr(flag, "name", flag)) for flag in flags], shapes.as_dict(),
                           {name: [list(s) for s in v] for name, v in per_input.items()}, ENGINE_FILE,
                           TIMING_CACHE_FILE).to_dict()


class TensorRTRunner:
    """Runs an engine on torch CUDA tensors: inputs bound by address, outputs allocated per call
    from the shapes the execution context infers."""

    def __init__(self, trt, engine_path: Path, order: list[str] | None = None):
        import torch

        self.torch = torch
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError("TensorRT cannot load the engine", path=engine_path,
                              hint="engines are tied to a GPU and TensorRT version: rebuild with --trt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if order is not None:  # return outputs in the contract's order, whatever the engine's
            self.outputs = [n for n in order if n in self.outputs]

    def _torch_dtype(self, name: str):
        return self.torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def run_cuda(self, feeds: dict) -> list:
        """One forward on CUDA tensors; returns CUDA tensors in the engine's output order."""
        torch = self.torch
        for name in self.inputs:
            tensor = feeds[name].to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            feeds[name] = tensor  # keep alive until the stream is done
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT failed to execute the engine", hint="check the input shapes against --shapes")
        stream.synchronize()
        return outputs

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """numpy in, numpy (float32) out: the :data:`~hypermerge.export.runtime.Runner` interface."""
        tensors = {name: self.torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.inputs}
        return [out.float().cpu().numpy() for out in self.run_cuda(tensors)]
