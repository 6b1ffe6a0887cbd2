"""What a training run measured: ``metrics.json``, from a typed record of the run, and how it is measured
(peak memory, a digest of the trained values)."""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from hypermerge._version import __version__
from hypermerge.training.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything ``metrics.json`` reports about a finished run.

    Attributes:
        recipe: the recipe as run.
        base: the base model's directory.
        trainable: values trained; total: values in the model.
        total_steps: the schedule's optimizer steps; steps: those taken (fewer if stopped early).
        log_history: the Trainer's log (``trainer.state.log_history``).
        step_seconds: wall time of each optimizer step (``StepTimer``).
        train_seconds: wall time of ``trainer.train``.
        memory_mib, memory_kind: peak memory during training, and what was measured.
        device, precision, world, per_device: where and how it trained.
        digests: each process's SHA-256 of the trained values.
        resumed_from: the checkpoint training continued from, if any.
        adapter_config: the adapter's config (None: a full fine-tune).
        rank_pattern, rank_budget: the final ranks and the budget trace (rank-allocating methods).
        rank_allocation_final: the allocator's final state (only with a pattern or a budget).
    """

    recipe: Recipe
    base: Path
    trainable: int
    total: int
    total_steps: int
    steps: int
    log_history: list[dict[str, Any]]
    step_seconds: list[float]
    train_seconds: float
    memory_mib: float
    memory_kind: str
    device: str
    precision: str
    world: int
    per_device: int
    digests: list[str]
    resumed_from: Path | None
    adapter_config: Any | None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    rank_budget: list[list[int]] = dataclasses.field(default_factory=list)
    rank_allocation_final: Any = None


def run_metrics(run: RunRecord) -> dict[str, Any]:
    """The contents of ``metrics.json`` (keys in their documented order)."""
    recipe = run.recipe
    train_log, eval_log = _logs(run.log_history)
    step_ms = _steady_step_ms(run.step_seconds)
    final_eval = eval_log[-1] if eval_log else {}
    metrics: dict[str, Any] = {
        "recipe": recipe.source,
        "method": recipe.adapter.method,
        "task": recipe.task,
        "base_model": str(run.base),
        "steps": run.steps,
        "total_steps": run.total_steps,
        "train_loss": train_log[-1]["loss"] if train_log else None,
        "eval_loss": final_eval.get("loss"),
        "eval_accuracy": final_eval.get("accuracy"),
        "trainable_parameters": run.trainable,
        "total_parameters": run.total,
        "trainable_ratio": run.trainable / run.total,
        "step_time_ms": step_ms,
        "steps_per_second": 1000 / step_ms if step_ms else None,
        "samples_per_second": recipe.training.batch_size * 1000 / step_ms if step_ms else None,
        "train_seconds": run.train_seconds,
        "peak_memory_mib": run.memory_mib,
        "peak_memory_kind": run.memory_kind,
        "device": run.device,
        "precision": run.precision,
        "processes": run.world,
        "global_batch": recipe.training.batch_size,
        "per_device_batch": run.per_device,
        "gradient_accumulation_steps": recipe.training.gradient_accumulation_steps,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
        "adapter_config": run.adapter_config.to_dict() if run.adapter_config is not None else None,
        "trained_values_sha256": run.digests,
        "hypermerge_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "train_log": train_log,
        "eval_log": eval_log,
    }
    if run.rank_pattern or run.rank_budget:
        metrics["rank_pattern"] = run.rank_pattern
        metrics["rank_budget"] = run.rank_budget
        metrics["rank_allocation_final"] = run.rank_allocation_final
    return metrics


def _logs(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training loss log and the evaluation log, from the Trainer's log history."""
    train_log = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
                 for e in history if "loss" in e]
    eval_log = [{k.removeprefix("eval_"): v for k, v in e.items()
                 if k in ("step", "eval_loss", "eval_accuracy")} for e in history if "eval_loss" in e]
    return train_log, eval_log


def _steady_step_ms(seconds: list[float]) -> float | None:
    """The median step time in ms, without the first steps' one-off costs (allocator warm-up, lazy initialisation)."""
    steady = seconds[2:] if len(seconds) > 4 else seconds
    return statistics.median(steady) * 1000 if steady else None


def trained_values_digest(model: nn.Module, full: bool) -> str:
    """SHA-256 over the trained values (to check that every DDP rank ended with the same ones)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if full or param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory count at training (loading the model and data is not training)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: str) -> tuple[float, str]:
    """Peak memory since ``reset_peak_memory`` in MiB, and what was measured."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS during training"
    except (OSError, ValueError, IndexError):
        pass
    # elsewhere: the process's peak so far (KiB on Linux, bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"
