"""NaN/Inf checks: an adapter, a loaded model's weights, any tensor.

A non-finite value loads, trains, folds and exports without complaint and poisons every output,
so each stage refuses one as early as it can see it, naming the tensor and its file.
"""

from __future__ import annotations

import torch

from hypermerge.adapters.checkpoint import AdapterCheckpoint
from hypermerge.errors import CheckpointError
from hypermerge.fold.hfdir import BaseCheckpoint


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one read-only pass in the common case.

    Any NaN or Inf makes the sum NaN or Inf, so a finite sum proves the tensor finite without
    the full-size boolean mask of ``isfinite``; only a non-finite sum (a NaN, or finite values
    whose sum overflows) needs the exact check.

    Args:
        tensor: any tensor (non-float tensors are finite by definition).

    Returns:
        True when no value is NaN or infinite.
    """
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(adapter: AdapterCheckpoint) -> None:
    """Refuse an adapter holding NaN or Inf before any output is written.

    Raises:
        CheckpointError: naming the first non-finite tensor and the file.
    """
    for key, value in adapter.tensors().items():
        if not all_finite(value):
            raise CheckpointError(f"adapter tensor {key} holds NaN or Inf", path=adapter.weights_path,
                                  hint="the adapter is corrupt or training diverged; use an earlier checkpoint")


def check_finite_weights(model: torch.nn.Module, base: BaseCheckpoint) -> None:
    """Refuse a loaded model whose checkpoint weights hold NaN or Inf.

    Parameters never hold one on purpose. Parameters the checkpoint does not have (a new head)
    are not checked.

    Raises:
        CheckpointError: naming the weight and the shard it came from.
    """
    for name, param in model.named_parameters():
        if name in base.shard_of and param.is_floating_point() and not all_finite(param.detach()):
            raise CheckpointError(f"the model's weight {name} holds NaN or Inf", path=base.shard_of[name],
                                  hint="the checkpoint is damaged; re-save or re-download it")
