"""Where and how a run trains (:class:`RunPlan`): its directory, processes, device, precision, per-process batch,
and the Trainer's arguments."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import transformers

from hypermerge.errors import BackendUnavailableError, ConfigError
from hypermerge.training.recipe import Recipe
from hypermerge.training.run_dir import CHECKPOINTS_DIR, prepare_output_dir


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate launch)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def device_and_precision(recipe: Recipe) -> tuple[str, str]:
    """The device and precision the recipe asks for, ``auto`` resolved for this machine.

    Raises:
        BackendUnavailableError: cuda asked for where there is none.
        ConfigError: fp16 without CUDA.
    """
    spec = recipe.training
    cuda = torch.cuda.is_available()
    device = spec.device if spec.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise BackendUnavailableError("training.device is cuda but CUDA is not available here",
                                      hint="set training.device to auto or cpu")
    precision = spec.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError("training.precision fp16 needs CUDA", hint="use bf16 or fp32 on the CPU")
    return device, precision


def per_device_batch(recipe: Recipe, world: int) -> int:
    """Each process's batch: the recipe's global batch over the processes and accumulation steps.

    Raises:
        ConfigError: the global batch does not divide evenly.
    """
    spec = recipe.training
    per_step = world * spec.gradient_accumulation_steps
    if spec.batch_size % per_step:
        raise ConfigError(f"training.batch_size {spec.batch_size} (the global batch) does not divide into "
                          f"{world} process(es) x {spec.gradient_accumulation_steps} accumulation step(s)",
                          hint=f"use a multiple of {per_step}")
    return spec.batch_size // per_step


def training_arguments(recipe: Recipe, checkpoints: Path, *, device: str, precision: str, world: int,
                       per_device: int, scored: bool, has_eval: bool, quiet: bool) -> transformers.TrainingArguments:
    """The Trainer's arguments for the recipe: checkpoints under ``checkpoints``, no reporting, logs per recipe."""
    spec = recipe.training
    eval_every = spec.eval_steps if has_eval else None
    return transformers.TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=spec.eval_batch_size or 2 * per_device,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        max_steps=spec.max_steps if spec.max_steps is not None else -1,
        num_train_epochs=spec.epochs if spec.epochs is not None else 1.0,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=spec.lr_scheduler,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="steps" if spec.save_steps else "no",
        save_steps=spec.save_steps or 500,
        save_total_limit=spec.save_total_limit,
        logging_strategy="steps",
        logging_steps=spec.logging_steps,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        ddp_backend="gloo" if world > 1 and device == "cpu" else None,
        dataloader_num_workers=spec.dataloader_workers,
        disable_tqdm=quiet,
        report_to=[],
        remove_unused_columns=False,
        prediction_loss_only=not scored,
        log_level="error" if quiet else "warning",
        log_level_replica="error",
    )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Where and how a run trains, settled before anything is loaded or written."""

    recipe: Recipe  # output_dir filled in
    out: Path
    rank: int
    world: int
    device: str
    precision: str
    per_device: int
    resume_from: Path | None
    overwrite: bool
    quiet: bool

    @property
    def main(self) -> bool:
        """The process that writes the files (rank 0)."""
        return self.rank == 0

    @property
    def talk(self) -> bool:
        """Whether this process prints progress lines."""
        return self.main and not self.quiet

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS_DIR


def run_directory(recipe: Recipe) -> Path:
    """The run directory, absolute: the recipe's ``output_dir``, else ``runs/<recipe name>``."""
    return Path(recipe.output_dir or Path("runs") / recipe.name).expanduser().absolute()


def plan_run(recipe: Recipe, out: Path, *, resume: bool, overwrite: bool, quiet: bool) -> RunPlan:
    """Settle the processes, the device, the batch and the run directory, before any loading.

    Args:
        recipe: the recipe, overrides applied.
        out: the run directory (:func:`run_directory`).
        resume, overwrite, quiet: as ``hm.train`` takes them.

    Returns:
        The plan; ``resume_from`` is the checkpoint to continue from, if any.

    Raises:
        ConfigError, BackendUnavailableError: the recipe cannot train here as written.
        OutputExistsError, CheckpointError: the run directory does not allow this run.
    """
    recipe = recipe.replace(output_dir=str(out))
    rank, world = rank_and_world()
    device, precision = device_and_precision(recipe)
    per_device = per_device_batch(recipe, world)
    resume_from = prepare_output_dir(out, resume=resume, overwrite=overwrite)
    return RunPlan(recipe, out, rank, world, device, precision, per_device, resume_from, overwrite, quiet)
