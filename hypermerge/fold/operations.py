"""How each output tensor is made: small typed operations, one ``produce`` each.

``plan_fold`` decides, for every tensor, one of

    CopyTensor       the base tensor as stored (fold copies its bytes file to file)
    CastTensor       the base tensor in another dtype (``--dtype``)
    FoldWeight       a targeted weight folded by the method's pure ``fold``
    FoldBias         the bias of a targeted weight, for methods that scale biases (IA³)
    SaveFullTensor   a tensor the adapter trained in full (a new head), written as saved

and both ``hypermerge fold`` (streaming into safetensors shards) and ``hypermerge patch``
(writing into an export's ONNX initializers) call the operation's ``produce``: the same float32
math, the same single cast, the same NaN/Inf refusals, whatever the destination. The shape is
mergekit's typed tasks (``mergekit/io/tasks.py``): a plan is a list of values, not strings that
two dispatchers must agree on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.checkpoint import AdapterCheckpoint
from hypermerge.errors import AdapterMismatchError, CheckpointError
from hypermerge.fold.finite import all_finite

# the stored base tensor of a name, in its stored dtype and layout
ReadBase = Callable[[str], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FoldOperation:
    """One output tensor and how to make it; ``name`` is its name in the output."""

    name: str

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        """The output tensor's values.

        Args:
            read: gives the stored base tensor of a name (not called by SaveFullTensor).
            adapter: the adapter whose tensors the operation folds in.
            source: the file ``read`` reads from, for messages.

        Returns:
            The tensor in the output dtype and the stored layout.

        Raises:
            AdapterMismatchError: the fold does not fit the weight.
            CheckpointError: the result holds NaN/Inf.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class CopyTensor(FoldOperation):
    """The base tensor, unchanged. Fold copies its bytes file to file instead of calling this."""

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        return read(self.name)


@dataclasses.dataclass(frozen=True)
class CastTensor(FoldOperation):
    """The base tensor converted to ``dtype`` (an output ``--dtype``)."""

    dtype: torch.dtype

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        return read(self.name).to(self.dtype)


@dataclasses.dataclass(frozen=True)
class FoldWeight(FoldOperation):
    """A weight the adapter targets, folded (``target``: the adapter's name for it)."""

    target: str
    dtype: torch.dtype

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        return fold_tensor(adapter.method, read(self.name), adapter.layer_params(self.target), adapter.config,
                           transposed=self.target in adapter.fan_in_fan_out, out_dtype=self.dtype, name=self.name,
                           source=source)


@dataclasses.dataclass(frozen=True)
class FoldBias(FoldOperation):
    """The bias of a targeted weight, for methods whose fold also scales the bias (IA³)."""

    target: str
    dtype: torch.dtype

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        params = {k: v.float() for k, v in adapter.layer_params(self.target).items()}
        bias = adapter.method.fold_bias(read(self.name).float(), params, adapter.config).to(self.dtype)
        if not all_finite(bias):
            raise CheckpointError(f"folding {self.name} produced NaN or Inf",
                                  hint="the base bias or the adapter holds extreme values")
        return bias


@dataclasses.dataclass(frozen=True)
class SaveFullTensor(FoldOperation):
    """A tensor the adapter trained in full (``key``: its name among the adapter's full tensors)."""

    key: str
    dtype: torch.dtype

    def produce(self, read: ReadBase, adapter: AdapterCheckpoint, source: Path | None = None) -> torch.Tensor:
        tensor = adapter.full_tensors()[self.key].to(self.dtype)
        if not all_finite(tensor):  # finite as saved (plan_fold checks), but it may overflow the cast
            raise CheckpointError(f"the adapter's {self.key} holds NaN or Inf", path=adapter.weights_path)
        return tensor


def mismatch_message(weight_name: str, shape: tuple[int, ...], params: dict[str, torch.Tensor], why: object) -> str:
    """The one-line reason an adapter's tensors do not fit a base weight.

    Args:
        weight_name: the base weight.
        shape: its stored shape.
        params: the adapter's tensors for it.
        why: the exception or text that says what failed.

    Returns:
        The message.
    """
    sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()))
    reason = str(why).splitlines()[0] if str(why) else type(why).__name__
    return f"the adapter's tensors for {weight_name} ({sizes}) do not fit its shape {shape} in the base ({reason})"


def fold_tensor(method: type[AdapterMethod], weight: torch.Tensor, params: dict[str, torch.Tensor],
                config: AdapterConfig, *, transposed: bool, out_dtype: torch.dtype, name: str,
                source: Path | None = None) -> torch.Tensor:
    """Fold one stored weight: float32 math, one cast at the end, non-finite results refused.

    Args:
        weight: the weight as stored ((in, out) when ``transposed``, GPT-2 ``Conv1D``).
        params: the adapter's tensors for this weight.
        transposed: whether the stored layout is (in, out).
        out_dtype: the dtype to write.
        name: the weight's name, for messages.
        source: the file the weight was read from, for messages.

    Returns:
        The folded weight in stored layout, ``out_dtype``, contiguous.

    Raises:
        AdapterMismatchError: the fold failed or changed the shape.
        CheckpointError: the result holds NaN/Inf (or overflows ``out_dtype``).
    """
    weight32 = weight.float()
    if transposed:
        weight32 = weight32.t()  # Conv1D stores (in, out); fold works on (out, in)
    params32 = {k: v.float() for k, v in params.items()}
    try:
        folded = method.fold(weight32, params32, config)
    except RuntimeError as exc:
        raise AdapterMismatchError(mismatch_message(name, tuple(weight.shape), params, exc),
                                   hint="fold onto the base model the adapter was trained on") from None
    if transposed:
        folded = folded.t()
    if tuple(folded.shape) != tuple(weight.shape):
        raise AdapterMismatchError(f"folding {name} changed its shape from {tuple(weight.shape)} to "
                                   f"{tuple(folded.shape)}", hint="the adapter does not fit this base")
    _check_folded_finite(folded, weight32, name, source)
    if out_dtype != torch.float32:
        folded = folded.to(out_dtype)
        if not all_finite(folded):
            raise CheckpointError(f"folding {name} gives values too large for "
                                  f"{str(out_dtype).removeprefix('torch.')}", hint="pass --dtype float32 or bfloat16")
    return folded.contiguous()


def _check_folded_finite(folded: torch.Tensor, weight32: torch.Tensor, name: str, source: Path | None) -> None:
    """Refuse a non-finite fold, blaming the base weight when it was already non-finite."""
    if all_finite(folded):
        return
    if not all_finite(weight32):  # only looked at once something is wrong
        raise CheckpointError(f"the base weight {name} holds NaN or Inf", path=source,
                              hint="the base checkpoint is damaged; re-save or re-download it")
    raise CheckpointError(f"folding {name} produced NaN or Inf",
                          hint="the base weight or the adapter holds extreme values; check both")
