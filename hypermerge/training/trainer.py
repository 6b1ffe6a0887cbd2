"""``hypermerge train``: a recipe in, an adapter checkpoint, metrics and plots out.

The training loop is the transformers ``Trainer``'s (mixed precision, DDP under ``torchrun`` or
``accelerate launch``, checkpoints, resume, progress bars). What this module adds:

* the adapter: injected after the Trainer has computed its schedule, so a rank-allocating
  method's ``total_steps`` is the number of optimizer steps the Trainer will take;
* rank allocation without user code: the method's regulariser (AdaLoRA's orthogonality term) is
  added to the loss in ``compute_loss``, and ``hm.allocate_ranks`` runs in the
  ``on_optimizer_step`` callback, which the Trainer calls after ``optimizer.step()`` and before
  ``model.zero_grad()``, so the allocator sees this step's gradients;
* checkpoints that hold only what is trained (the adapter in the hypermerge format, plus the
  exact training state), and ``--resume`` that gives the same final adapter as a run that was
  never interrupted;
* a batch size that means the global batch, so one recipe trains the same on 1 or N processes;
* the run directory: ``adapter/`` (or ``model/`` for a full fine-tune), ``metrics.json``,
  ``plots/``, ``recipe.yaml`` (the resolved recipe) and ``checkpoints/``.

The parts: :mod:`~hypermerge.training.launch` (processes, device, the Trainer's arguments),
:mod:`~hypermerge.training.hf_trainer` (the Trainer subclass, checkpoints and resume state),
:mod:`~hypermerge.training.callbacks`, :mod:`~hypermerge.training.run_dir` (the run directory) and
:mod:`~hypermerge.training.metrics` (``metrics.json``); :func:`train` runs them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback

import hypermerge.adapters.model as adapter_model
import hypermerge.training.plots as plots
import hypermerge.training.tasks as tasks
from hypermerge._fs import atomic_output_dir
from hypermerge.adapters.adalora import allocation_final
from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.checkpoint import save_adapter
from hypermerge.errors import ConfigError, HypermergeError
from hypermerge.training.callbacks import RankAllocationCallback, ScheduleCheck, StepTimer
from hypermerge.training.hf_trainer import (
    RUN_STATE_FILE,
    TRAINING_STATE_FILE,
    HypermergeTrainer,
    apply_lr_multipliers,
    implements,
    load_training_state,
    training_state,
)
from hypermerge.training.launch import (
    RunPlan,
    plan_run,
    run_directory,
    training_arguments,
)
from hypermerge.training.metrics import (
    RunRecord,
    peak_memory,
    reset_peak_memory,
    run_metrics,
    trained_values_digest,
)
from hypermerge.training.recipe import Recipe, load_recipe
from hypermerge.training.run_dir import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    RECIPE_FILE,
    RUN_ENTRIES,
    check_resume_recipe,
    disk_errors,
    last_complete_checkpoint,
    remove_run_entries,
    resolved_recipe,
    write_text,
    yaml_text,
)

__all__ = ["CHECKPOINTS_DIR", "METRICS_FILE", "RECIPE_FILE", "RUN_ENTRIES", "RUN_STATE_FILE", "TRAINING_STATE_FILE",
           "HypermergeTrainer", "RankAllocationCallback", "ScheduleCheck", "StepTimer", "TrainResult",
           "apply_lr_multipliers", "last_complete_checkpoint", "load_training_state", "train", "training_state"]


@dataclasses.dataclass
class TrainResult:
    """What a training run wrote.

    Attributes:
        output_dir: the run directory.
        adapter_dir: ``adapter/`` (a hypermerge adapter checkpoint), None for a full fine-tune.
        model_dir: ``model/`` (a HF model directory) for a full fine-tune, else None.
        metrics: the contents of ``metrics.json``.
        plots: the PNG files written.
        resumed_from: the checkpoint training continued from, if any.
    """

    output_dir: Path
    adapter_dir: Path | None
    model_dir: Path | None
    metrics: dict[str, Any]
    plots: list[Path]
    resumed_from: Path | None = None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def recipe_path(self) -> Path:
        return self.output_dir / RECIPE_FILE


def train(recipe_or_path: str | Path | Recipe | Mapping[str, Any], output_dir: str | Path | None = None,
          max_steps: int | None = None, overrides: Iterable[str] = (), resume: bool = False, *,
          overwrite: bool = False, quiet: bool = False,
          callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Train the recipe's model with its adapter on its data; write the run directory.

    Launch under ``torchrun`` / ``accelerate launch`` for DDP: every process runs this function,
    the first one writes the files.

    Args:
        recipe_or_path: a recipe YAML file, a Recipe, or a dict in recipe form.
        output_dir: the run directory [default: the recipe's output_dir, else runs/<recipe name>].
        max_steps: optimizer steps (overrides the recipe's max_steps / epochs).
        overrides: ``section.key=value`` changes to the recipe (values parsed as YAML).
        resume: continue from the last checkpoint in ``output_dir/checkpoints``.
        overwrite: remove a previous run's files from ``output_dir`` and start over.
        quiet: no progress bars and no log lines.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        A TrainResult naming what was written.

    Raises:
        ConfigError: the recipe is invalid, or differs from the run being resumed.
        OutputExistsError: ``output_dir`` holds a run and neither resume nor overwrite was given.
        CheckpointError: nothing to resume from, or a model/data file is missing or damaged.
        BackendUnavailableError: the recipe asks for CUDA where there is none.
        HypermergeError: the disk is full, a file grew past the size limit, or a file cannot be written.
    """
    with _console(quiet), disk_errors() as where:
        return _train(recipe_or_path, output_dir, max_steps, overrides, resume, overwrite=overwrite, quiet=quiet,
                      callbacks=callbacks, where=where)


@contextlib.contextmanager
def _console(quiet: bool) -> Iterator[None]:
    """Quiet: no transformers warnings or progress bars (loading, saving) for the run's duration."""
    if not quiet:
        yield
        return
    with tasks.quiet_transformers():
        yield


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the run trains on: the base model's directory, its tokenizer, the data and the model."""

    base: Path
    tokenizer: Any
    data: tasks.TaskData
    model: nn.Module
    new_modules: list[str]


@dataclasses.dataclass(frozen=True)
class AdapterSetup:
    """The adapter as injected (None for a full fine-tune) and the counts the run reports."""

    total_steps: int
    config: AdapterConfig | None
    method: type[AdapterMethod] | None
    rank_budget: list[list[int]]  # [step, total rank] after each allocation, appended during training
    trainable: int
    total: int


def _train(recipe_or_path, output_dir, max_steps, overrides, resume, *, overwrite, quiet, callbacks,
           where: dict[str, Path]) -> TrainResult:
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over: pass one of them")
    recipe = load_recipe(recipe_or_path, overrides, max_steps=max_steps, output_dir=output_dir)
    where["run"] = out = run_directory(recipe)  # named by a disk error that does not name its file
    run = plan_run(recipe, out, resume=resume, overwrite=overwrite, quiet=quiet)
    inputs = _load_inputs(run)
    args = training_arguments(run.recipe, run.checkpoints, device=run.device, precision=run.precision,
                              world=run.world, per_device=run.per_device, scored=inputs.data.scored,
                              has_eval=inputs.data.eval is not None, quiet=quiet)
    _open_run_dir(run, args)
    timer = StepTimer()
    trainer = _make_trainer(run, inputs, args, [timer, *callbacks])
    adapter = _attach_adapter(run, inputs, trainer)
    _save_recipe(run, adapter)
    _announce(run, inputs, adapter)
    train_seconds = _fit(run, inputs, trainer)
    digests = _agreed_digests(run, inputs.model)
    result = TrainResult(run.out, None, None, {}, [], run.resume_from)
    if run.main:
        _write_model(run, inputs, result)
        record = _record(run, inputs, adapter, trainer, timer, train_seconds, digests)
        result.metrics = run_metrics(record)
        write_text(run.out / METRICS_FILE, json.dumps(result.metrics, indent=2) + "\n")
        result.plots = _plots(run, adapter, trainer, record)
    if args.distributed_state is not None:
        args.distributed_state.wait_for_everyone()
    return result


def _load_inputs(run: RunPlan) -> Inputs:
    """The tokenizer, the data and the model, loaded (and checked) before anything is written:
    a damaged base leaves no run directory."""
    recipe = run.recipe
    base = recipe.model.resolve()
    tokenizer = tasks.load_tokenizer(base)
    data = tasks.build_data(recipe, tokenizer)
    transformers.set_seed(recipe.training.seed)  # the new head's initialisation
    model, new_modules = tasks.load_model(recipe, base, data.label_names, tokenizer)
    return Inputs(base, tokenizer, data, model, new_modules)


def _open_run_dir(run: RunPlan, args: transformers.TrainingArguments) -> None:
    """Once every process has checked the directory, the first one clears (--overwrite) and creates it.

    Raises:
        HypermergeError: the run directory cannot be created.
    """
    state = args.distributed_state  # set up by TrainingArguments (joins the process group under DDP)
    if state is not None:
        state.wait_for_everyone()  # every rank has checked the directory before the first one writes
    if not run.main:
        return
    if run.overwrite and run.resume_from is None:
        remove_run_entries(run.out)
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HypermergeError(f"cannot create the run directory ({exc.strerror})", path=run.out,
                              hint="choose a writable --output-dir") from exc


def _make_trainer(run: RunPlan, inputs: Inputs, args: transformers.TrainingArguments,
                  callbacks: Sequence[TrainerCallback]) -> HypermergeTrainer:
    """The Trainer over the inputs (no adapter yet: it is injected once the schedule is known)."""
    data = inputs.data
    trainer = HypermergeTrainer(
        model=inputs.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=data.collator, processing_class=inputs.tokenizer,
        compute_metrics=tasks.accuracy if data.scored else None,
        preprocess_logits_for_metrics=tasks.argmax_logits if data.scored else None,
        callbacks=list(callbacks))
    if run.quiet:
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if run.recipe.task == "sequence-classification":
        # Classification heads return a per-example mean and ignore num_items_in_batch; left
        # True, the Trainer would skip dividing by the accumulation steps and would multiply
        # the loss by the number of processes under DDP.
        trainer.model_accepts_loss_kwargs = False
    return trainer


def _attach_adapter(run: RunPlan, inputs: Inputs, trainer: HypermergeTrainer) -> AdapterSetup:
    """Inject the recipe's adapter, configured for the Trainer's schedule, and give it to the Trainer."""
    recipe, model = run.recipe, inputs.model
    # The schedule the Trainer will follow (max_steps, or epochs x its per-process loader length).
    total_steps = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    trainer.add_callback(ScheduleCheck(total_steps))
    rank_budget: list[list[int]] = []
    config = method = None
    if not recipe.adapter.is_full:
        config = recipe.adapter.build_config(total_steps=total_steps, modules_to_save=inputs.new_modules)
        transformers.set_seed(recipe.training.seed)  # the adapter's initialisation
        adapter_model.inject(model, config)  # in place: the Trainer holds this model
        trainer.attach_adapter(model, inputs.base, rank_budget)
        method = adapter_model.adapter_state(model).method
        if implements(method, "allocate_ranks"):
            trainer.add_callback(RankAllocationCallback(model, rank_budget))
    trainable = adapter_model.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    return AdapterSetup(total_steps, config, method, rank_budget, trainable, total)


def _save_recipe(run: RunPlan, adapter: AdapterSetup) -> None:
    """Write the recipe as run; on resume, refuse one that changes what is trained.

    Raises:
        ConfigError: resuming with a recipe that differs in model, task, data or adapter.
    """
    resolved = resolved_recipe(run.recipe, adapter.config)
    if run.resume_from is not None:
        changed = check_resume_recipe(run.out / RECIPE_FILE, resolved)
        if changed:
            _say(run.talk, f"note: training settings differ from the original run: {', '.join(changed)}")
    if run.main:
        write_text(run.out / RECIPE_FILE, yaml_text(resolved))


def _announce(run: RunPlan, inputs: Inputs, adapter: AdapterSetup) -> None:
    """The progress lines before training: what trains on what, how long, where."""
    recipe = run.recipe
    _say(run.talk, f"{recipe.adapter.method} on {inputs.base} ({recipe.task}); {adapter.trainable:,} trainable "
                   f"values ({adapter.trainable / adapter.total:.3%} of {adapter.total:,}); {adapter.total_steps} "
                   f"steps, global batch {recipe.training.batch_size} on {run.world} {run.device} process(es), "
                   f"{run.precision}")
    if inputs.new_modules and not recipe.adapter.is_full:
        _say(run.talk, f"new head trained in full and saved with the adapter: {', '.join(inputs.new_modules)}")
    if run.resume_from is not None:
        _say(run.talk, f"resuming from {run.resume_from}")


def _fit(run: RunPlan, inputs: Inputs, trainer: HypermergeTrainer) -> float:
    """Train (from the checkpoint when resuming), then evaluate if the last step was not; the seconds trained."""
    reset_peak_memory(run.device)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from is not None else None)
    train_seconds = time.perf_counter() - started
    final_step = trainer.state.global_step
    if inputs.data.eval is not None and not any(e.get("step") == final_step and "eval_loss" in e
                                                for e in trainer.state.log_history):
        trainer.evaluate()
    return train_seconds


def _agreed_digests(run: RunPlan, model: nn.Module) -> list[str]:
    """Each process's digest of the trained values; under DDP they must all agree.

    Raises:
        HypermergeError: the processes ended with different trained values.
    """
    digests = [trained_values_digest(model, run.recipe.adapter.is_full)]
    if run.world > 1 and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * run.world
        torch.distributed.all_gather_object(gathered, digests[0])
        digests = gathered
        if len(set(digests)) != 1:
            raise HypermergeError("the DDP processes ended with different trained values",
                                  hint="report this as a bug, with the recipe and the launch command")
    return digests


def _write_model(run: RunPlan, inputs: Inputs, result: TrainResult) -> None:
    """``adapter/`` (the hypermerge checkpoint), or ``model/`` with its tokenizer for a full fine-tune."""
    if run.recipe.adapter.is_full:
        result.model_dir = run.out / "model"
        with atomic_output_dir(result.model_dir, overwrite=True) as tmp:
            inputs.model.save_pretrained(tmp)
            inputs.tokenizer.save_pretrained(tmp)
    else:
        result.adapter_dir = save_adapter(inputs.model, run.out / "adapter", base_model=inputs.base)


def _record(run: RunPlan, inputs: Inputs, adapter: AdapterSetup, trainer: HypermergeTrainer, timer: StepTimer,
            train_seconds: float, digests: list[str]) -> RunRecord:
    """What ``metrics.json`` reports about the finished run."""
    memory, memory_kind = peak_memory(run.device)
    pattern = adapter_model.rank_pattern(inputs.model) if adapter.config is not None else {}
    allocation = allocation_final(trainer.adapter_model) if pattern or adapter.rank_budget else None
    return RunRecord(
        recipe=run.recipe, base=inputs.base, trainable=adapter.trainable, total=adapter.total,
        total_steps=adapter.total_steps, steps=trainer.state.global_step, log_history=trainer.state.log_history,
        step_seconds=timer.seconds, train_seconds=train_seconds, memory_mib=memory, memory_kind=memory_kind,
        device=run.device, precision=run.precision, world=run.world, per_device=run.per_device, digests=digests,
        resumed_from=run.resume_from, adapter_config=adapter.config, rank_pattern=pattern,
        rank_budget=adapter.rank_budget, rank_allocation_final=allocation)


def _plots(run: RunPlan, adapter: AdapterSetup, trainer: HypermergeTrainer, record: RunRecord) -> list[Path]:
    """The loss plot, and the rank plot for a method that allocates ranks (or ended with a pattern)."""
    title = f"{run.recipe.name}: {run.recipe.adapter.method}"
    written = [plots.loss_plot(trainer.state.log_history, run.out / "plots" / "loss.png", title)]
    method = adapter.method
    if method is not None and (implements(method, "allocate_ranks") or record.rank_pattern):
        written.append(plots.ranks_plot(record.rank_pattern, adapter.rank_budget, run.out / "plots" / "ranks.png",
                                        title))
    return written


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(f"hypermerge train: {text}", file=sys.stderr, flush=True)
