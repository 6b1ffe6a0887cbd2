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
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import hypermerge.adapters.model as adapter_model
from hypermerge._fs import atomic_output_dir
from hypermerge._version import __version__
from hypermerge.adapters.adalora import (
    ALLOCATOR_PREFIX,
    allocation_final,
    allocator_state_tensors,
    restore_allocator_state,
)
from hypermerge.adapters.base import AdapterMethod
from hypermerge.adapters.checkpoint import save_adapter
from hypermerge.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    HypermergeError,
    OutputExistsError,
)
from hypermerge.training import plots, tasks
from hypermerge.training.recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_FILE = "training_state.safetensors"  # inside a checkpoint: what resume loads
RUN_STATE_FILE = "hypermerge_state.json"  # inside a checkpoint: the rank budget trace so far
# What a run directory holds; --overwrite removes these and nothing else.
RUN_ENTRIES = ("adapter", "model", CHECKPOINTS_DIR, "plots", METRICS_FILE, RECIPE_FILE)


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


def _overrides(method: type[AdapterMethod], hook: str) -> bool:
    """True when ``method`` implements the model-level ``hook`` (the base class's is a no-op)."""
    return getattr(method, hook).__func__ is not getattr(AdapterMethod, hook).__func__


# -- the Trainer -----------------------------------------------------------------------------
class HypermergeTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that knows about hypermerge adapters.

    After ``attach_adapter``: adds the method's regulariser to the training loss, saves
    checkpoints as the adapter alone (plus the exact training state, for resume) instead of
    the whole model, and loads that state back on resume. Without an adapter (a full
    fine-tune) it behaves as the plain Trainer.
    """

    adapter_model: nn.Module | None = None
    base_model_path: Path | None = None
    rank_budget: list[list[int]]

    def attach_adapter(self, model: nn.Module, base_model_path: Path, rank_budget: list[list[int]]) -> None:
        """Declare ``model`` (unwrapped, with an injected adapter) as what this Trainer trains."""
        self.adapter_model = model
        self.base_model_path = base_model_path
        self.rank_budget = rank_budget
        method = adapter_model.adapter_state(model).method
        self._regularized = _overrides(method, "regularization_loss")

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.adapter_model is not None:
            apply_lr_multipliers(optimizer, self.adapter_model)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.adapter_model is None or not self._regularized or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        regularizer = adapter_model.regularization_loss(self.adapter_model)
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps; the regulariser
            # must count once per optimizer step, so divide it here.
            regularizer = regularizer / self.current_gradient_accumulation_steps
        loss = loss + regularizer.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step's decision (transformers 5.x).
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- checkpoints: the trained values only ---------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.adapter_model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        # A foldable adapter in every checkpoint (hypermerge fold --adapter CKPT/adapter) ...
        save_adapter(self.adapter_model, output / "adapter", base_model=self.base_model_path)
        # ... and the exact state to resume from (rank-allocating methods save pruned tensors
        # in the adapter, but resume needs the unpruned parameters and the allocator's buffers).
        save_file(training_state(self.adapter_model), str(output / TRAINING_STATE_FILE), metadata={"format": "pt"})
        (output / RUN_STATE_FILE).write_text(json.dumps({"rank_budget": self.rank_budget}) + "\n")
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.adapter_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        checkpoint = Path(resume_from_checkpoint)
        load_training_state(self.adapter_model, checkpoint / TRAINING_STATE_FILE)
        run_state = checkpoint / RUN_STATE_FILE
        if run_state.exists():
            self.rank_budget[:] = json.loads(run_state.read_text()).get("rank_budget", [])
        return None


def apply_lr_multipliers(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Move the parameters a method trains at a multiple of the learning rate (HyperAdaLoRA's
    ``hyper_lr_multiplier``) into their own param groups, before the scheduler reads the rates."""
    method = adapter_model.adapter_state(model).method
    multipliers = {prefix: m for prefix, m in method.learning_rate_multipliers(model).items() if m != 1.0}
    if not multipliers:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    for group in list(optimizer.param_groups):
        kept, moved = [], {}
        for param in group["params"]:
            name = names.get(id(param), "")
            factor = next((m for prefix, m in multipliers.items() if name.startswith(prefix)), 1.0)
            (kept if factor == 1.0 else moved.setdefault(factor, [])).append(param)
        group["params"] = kept
        for factor, params in moved.items():
            settings = {k: v for k, v in group.items() if k != "params"}
            optimizer.add_param_group({**settings, "params": params, "lr": group["lr"] * factor})


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter run needs to resume exactly: trainable parameters, buffers of the
    adapter layers (masks, allocator statistics) and the method's model-level tensors."""
    state = adapter_model.adapter_state(model)
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    module_names = {id(m): n for n, m in model.named_modules()}
    for layer in state.layers.values():
        prefix = module_names[id(layer)]
        for name, buffer in layer.named_buffers():
            if not name.startswith("base_layer."):
                tensors[f"{prefix}.{name}"] = buffer
    tensors.update(state.method.model_tensors(model))
    tensors.update(allocator_state_tensors(model))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def load_training_state(model: nn.Module, path: Path) -> None:
    """Restore what ``training_state`` saved into a model with the same adapter.

    Raises:
        CheckpointError: the file is missing or unreadable, or does not fit the model.
    """
    from hypermerge.adapters.checkpoint import read_safetensors

    tensors = read_safetensors(path, what="training state")
    state = adapter_model.adapter_state(model)
    prefix = f"{state.method.name}::"
    model_level = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    # the allocator's averages exist only once it has run: not part of the key check
    allocator = {k: v for k, v in tensors.items() if k.startswith(ALLOCATOR_PREFIX)}
    expected = {k for k in training_state(model) if not k.startswith(ALLOCATOR_PREFIX)}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - set(allocator))
    if missing or unexpected:
        raise CheckpointError(f"the training state does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})", path=path,
                              hint="resume with the recipe the run was started with")
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in model_level or name in allocator:
                continue
            target = current[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)} in the checkpoint, "
                                      f"{tuple(target.shape)} in the model", path=path,
                                      hint="resume with the recipe the run was started with")
            target.copy_(tensor.to(target.dtype))
    if model_level:
        state.method.load_model_tensors(model, model_level)
    if allocator:
        restore_allocator_state(model, allocator)


# -- callbacks -------------------------------------------------------------------------------
class RankAllocationCallback(TrainerCallback):
    """Runs ``hm.allocate_ranks`` after every optimizer step, while this step's gradients still
    exist (the Trainer calls ``on_optimizer_step`` before ``model.zero_grad()``), and records
    the total rank budget (sum of ``hm.rank_pattern``) after each allocation."""

    def __init__(self, model: nn.Module, budget: list[list[int]]):
        self.model = model
        self.budget = budget

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The Trainer increments state.global_step after this callback; allocate_ranks counts the
        # steps taken, the one just taken included (1 after the first): global_step + 1.
        step = state.global_step + 1
        adapter_model.allocate_ranks(self.model, step)
        self.budget.append([step, int(sum(adapter_model.rank_pattern(self.model).values()))])


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, allocation), without the
    evaluations and checkpoint writes that ``train_runtime`` includes."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class ScheduleCheck(TrainerCallback):
    """Fails loudly if the Trainer's step count differs from the one given to the adapter config."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.total_steps:
            raise HypermergeError(f"the Trainer plans {state.max_steps} steps but the adapter was configured "
                                  f"for {self.total_steps}", hint="report this as a bug")


# -- the run ---------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate launch)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device_and_precision(recipe: Recipe) -> tuple[str, str]:
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


def _per_device_batch(recipe: Recipe, world: int) -> int:
    spec = recipe.training
    per_step = world * spec.gradient_accumulation_steps
    if spec.batch_size % per_step:
        raise ConfigError(f"training.batch_size {spec.batch_size} (the global batch) does not divide into "
                          f"{world} process(es) x {spec.gradient_accumulation_steps} accumulation step(s)",
                          hint=f"use a multiple of {per_step}")
    return spec.batch_size // per_step


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint of the latest step that was written to the end, if any.

    The Trainer writes a checkpoint's files in place and trainer_state.json last, so a run killed
    while saving leaves a newer directory without it (or with it cut short): that one is skipped.
    """
    if not checkpoints.is_dir():
        return None
    steps = []
    for entry in checkpoints.iterdir():
        prefix, _, step = entry.name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and entry.is_dir():
            steps.append((int(step), entry))
    for _step, entry in sorted(steps, reverse=True):
        try:
            json.loads((entry / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return entry
    return None


def _prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Check the run directory (read-only) and return the checkpoint to resume from, if any.

    Raises:
        OutputExistsError: it holds a run and neither --resume nor --overwrite was given.
        CheckpointError: --resume with no checkpoint to resume from.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError("the output path is a file", path=out, hint="choose another --output-dir")
    existing = next(p for p in (out, *out.parents) if p.exists())  # checked before any work: fail fast
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HypermergeError("cannot create the run directory here" + (f" ({existing} is a file)"
                              if not existing.is_dir() else " (not writable)"), path=out,
                              hint="choose a writable --output-dir")
    checkpoints = out / CHECKPOINTS_DIR
    if resume:
        last = last_complete_checkpoint(checkpoints)
        if last is None:
            raise CheckpointError("no checkpoint to resume from", path=checkpoints,
                                  hint="run without --resume to start (checkpoints are written every "
                                       "training.save_steps steps)")
        return Path(last)
    existing = [name for name in RUN_ENTRIES if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"the output directory already holds a run ({', '.join(existing)})", path=out,
                                hint="pass --resume to continue it, --overwrite to start over, "
                                     "or choose another --output-dir")
    return None


def _remove_run_entries(out: Path) -> None:
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _disk_errors() -> Iterator[dict[str, Path]]:
    """Turn a write that fails for want of space or permission (in our code or the Trainer's
    checkpointing) into one line naming the file; checkpoints cut short are skipped by --resume."""
    context: dict[str, Path] = {}
    try:
        yield context
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else context.get("run")
        if exc.errno == errno.EFBIG:
            raise HypermergeError(f"a file grew past the largest file allowed here ({exc.strerror})", path=where,
                                  hint="raise the file size limit (ulimit -f) or write to another filesystem") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HypermergeError(f"ran out of disk space ({exc.strerror})", path=where,
                                  hint="free space or choose another --output-dir, then --resume") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and where is not None:
            raise HypermergeError(f"cannot write ({exc.strerror})", path=where,
                                  hint="check permissions or choose another --output-dir") from exc
        raise


def _training_arguments(recipe: Recipe, checkpoints: Path, *, device: str, precision: str, world: int,
                        per_device: int, scored: bool, has_eval: bool, quiet: bool) -> transformers.TrainingArguments:
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


def _resolved_recipe(recipe: Recipe, adapter_config: Any | None) -> dict[str, Any]:
    """The recipe as run: defaults filled in, overrides applied, the adapter config complete
    (``total_steps`` from the schedule, the new head in ``modules_to_save``)."""
    resolved = recipe.to_dict()
    if adapter_config is not None:
        resolved["adapter"] = {"method": recipe.adapter.method, **adapter_config.to_dict()}
    return json.loads(json.dumps(resolved))  # plain lists and numbers, as read back from YAML


def _check_resume_recipe(saved_path: Path, resolved: dict[str, Any]) -> list[str]:
    """Refuse to resume with a recipe that changes what is trained; return the training keys that differ."""
    from hypermerge.training.recipe import parse_yaml

    if not saved_path.exists():
        return []
    saved = parse_yaml(saved_path.read_text(), path=saved_path) or {}
    changed = [f"{section}" for section in ("model", "task", "data", "adapter")
               if saved.get(section) != resolved.get(section)]
    if changed:
        raise ConfigError(f"the recipe differs from the one this run was started with in: {', '.join(changed)}",
                          path=saved_path, hint="resume with the same recipe, or start a new run (--overwrite "
                                                "or another --output-dir)")
    saved_training = saved.get("training") or {}
    return sorted(k for k, v in resolved["training"].items() if saved_training.get(k) != v)


def _adapter_digest(model: nn.Module, full: bool) -> str:
    """SHA-256 over the trained values (to check that every DDP rank ended with the same ones)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if full or param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _reset_peak_memory(device: str) -> None:
    """Start the peak-memory count at training (loading the model and data is not training)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: str) -> tuple[float, str]:
    """Peak memory since ``_reset_peak_memory`` in MiB, and what was measured."""
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


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(f"hypermerge train: {text}", file=sys.stderr, flush=True)


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
    with _console(quiet), _disk_errors() as where:
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


def _train(recipe_or_path, output_dir, max_steps, overrides, resume, *, overwrite, quiet, callbacks,
           where: dict[str, Path]) -> TrainResult:
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over: pass one of them")
    recipe = load_recipe(recipe_or_path, overrides, max_steps=max_steps, output_dir=output_dir)
    out = Path(recipe.output_dir or Path("runs") / recipe.name).expanduser().absolute()
    recipe = recipe.replace(output_dir=str(out))
    where["run"] = out  # named by a disk error that does not name its file
    rank, world = _world()
    main = rank == 0
    talk = main and not quiet
    device, precision = _device_and_precision(recipe)
    per_device = _per_device_batch(recipe, world)
    resume_from = _prepare_output_dir(out, resume=resume, overwrite=overwrite)
    checkpoints = out / CHECKPOINTS_DIR

    base = recipe.model.resolve()
    tokenizer = tasks.load_tokenizer(base)
    data = tasks.build_data(recipe, tokenizer)
    transformers.set_seed(recipe.training.seed)  # the new head's initialisation
    # loaded (and checked) before anything is written: a damaged base leaves no run directory
    model, new_modules = tasks.load_model(recipe, base, data.label_names, tokenizer)
    args = _training_arguments(recipe, checkpoints, device=device, precision=precision, world=world,
                               per_device=per_device, scored=data.scored, has_eval=data.eval is not None,
                               quiet=quiet)
    state = args.distributed_state  # set up by TrainingArguments (joins the process group under DDP)
    if state is not None:
        state.wait_for_everyone()  # every rank has checked the directory before the first one writes
    if main:
        if overwrite and resume_from is None:
            _remove_run_entries(out)
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HypermergeError(f"cannot create the run directory ({exc.strerror})", path=out,
                                  hint="choose a writable --output-dir") from exc

    timer = StepTimer()
    trainer = HypermergeTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
        processing_class=tokenizer,
        compute_metrics=tasks.accuracy if data.scored else None,
        preprocess_logits_for_metrics=tasks.argmax_logits if data.scored else None,
        callbacks=[timer, *callbacks])
    if quiet:
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if recipe.task == "sequence-classification":
        # Classification heads return a per-example mean and ignore num_items_in_batch; left
        # True, the Trainer would skip dividing by the accumulation steps and would multiply
        # the loss by the number of processes under DDP.
        trainer.model_accepts_loss_kwargs = False

    # The schedule the Trainer will follow (max_steps, or epochs x its per-process loader length).
    total_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    trainer.add_callback(ScheduleCheck(total_steps))
    rank_budget: list[list[int]] = []
    adapter_config = None
    method = None
    if not recipe.adapter.is_full:
        adapter_config = recipe.adapter.build_config(total_steps=total_steps, modules_to_save=new_modules)
        transformers.set_seed(recipe.training.seed)  # the adapter's initialisation
        adapter_model.inject(model, adapter_config)  # in place: the Trainer holds this model
        trainer.attach_adapter(model, base, rank_budget)
        method = adapter_model.adapter_state(model).method
        if _overrides(method, "allocate_ranks"):
            trainer.add_callback(RankAllocationCallback(model, rank_budget))
    trainable = adapter_model.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())

    resolved = _resolved_recipe(recipe, adapter_config)
    if resume_from is not None:
        changed = _check_resume_recipe(out / RECIPE_FILE, resolved)
        if changed:
            _say(talk, f"note: training settings differ from the original run: {', '.join(changed)}")
    if main:
        _write_text(out / RECIPE_FILE, _yaml_text(resolved))
    _say(talk, f"{recipe.adapter.method} on {base} ({recipe.task}); {trainable:,} trainable values "
               f"({trainable / total:.3%} of {total:,}); {total_steps} steps, global batch "
               f"{recipe.training.batch_size} on {world} {device} process(es), {precision}")
    if new_modules and not recipe.adapter.is_full:
        _say(talk, f"new head trained in full and saved with the adapter: {', '.join(new_modules)}")
    if resume_from is not None:
        _say(talk, f"resuming from {resume_from}")

    _reset_peak_memory(device)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    train_seconds = time.perf_counter() - started
    final_step = trainer.state.global_step
    if data.eval is not None and not any(e.get("step") == final_step and "eval_loss" in e
                                         for e in trainer.state.log_history):
        trainer.evaluate()

    digests = [_adapter_digest(model, recipe.adapter.is_full)]
    if world > 1 and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, digests[0])
        digests = gathered
        if len(set(digests)) != 1:
            raise HypermergeError("the DDP processes ended with different trained values",
                                  hint="report this as a bug, with the recipe and the launch command")

    result = TrainResult(out, None, None, {}, [], resume_from)
    if main:
        if recipe.adapter.is_full:
            result.model_dir = out / "model"
            with atomic_output_dir(result.model_dir, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        else:
            result.adapter_dir = save_adapter(model, out / "adapter", base_model=base)
        memory, memory_kind = _peak_memory(device)
        pattern = adapter_model.rank_pattern(model) if adapter_config is not None else {}
        result.metrics = _metrics(
            trainer, recipe, base=base, trainable=trainable, total=total, timer=timer, train_seconds=train_seconds,
            memory=memory, memory_kind=memory_kind, device=device, precision=precision, world=world,
            per_device=per_device, total_steps=total_steps, rank_pattern=pattern, rank_budget=rank_budget,
            digests=digests, resumed_from=resume_from, adapter_config=adapter_config)
        _write_text(out / METRICS_FILE, json.dumps(result.metrics, indent=2) + "\n")
        title = f"{recipe.name}: {recipe.adapter.method}"
        result.plots.append(plots.loss_plot(trainer.state.log_history, out / "plots" / "loss.png", title))
        if method is not None and (_overrides(method, "allocate_ranks") or pattern):
            result.plots.append(plots.ranks_plot(pattern, rank_budget, out / "plots" / "ranks.png", title))
    if state is not None:
        state.wait_for_everyone()
    return result


def _yaml_text(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def _metrics(trainer: HypermergeTrainer, recipe: Recipe, *, base: Path, trainable: int, total: int,
             timer: StepTimer, train_seconds: float, memory: float, memory_kind: str, device: str,
             precision: str, world: int, per_device: int, total_steps: int, rank_pattern: dict[str, int],
             rank_budget: list[list[int]], digests: list[str], resumed_from: Path | None,
             adapter_config: Any | None) -> dict[str, Any]:
    history = trainer.state.log_history
    train_log = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
                 for e in history if "loss" in e]
    eval_log = [{k.removeprefix("eval_"): v for k, v in e.items()
                 if k in ("step", "eval_loss", "eval_accuracy")} for e in history if "eval_loss" in e]
    # the first steps include one-off costs (allocator warm-up, lazy initialisation)
    steady = timer.seconds[2:] if len(timer.seconds) > 4 else timer.seconds
    step_ms = statistics.median(steady) * 1000 if steady else None
    final_eval = eval_log[-1] if eval_log else {}
    metrics: dict[str, Any] = {
        "recipe": recipe.source,
        "method": recipe.adapter.method,
        "task": recipe.task,
        "base_model": str(base),
        "steps": trainer.state.global_step,
        "total_steps": total_steps,
        "train_loss": train_log[-1]["loss"] if train_log else None,
        "eval_loss": final_eval.get("loss"),
        "eval_accuracy": final_eval.get("accuracy"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_ratio": trainable / total,
        "step_time_ms": step_ms,
        "steps_per_second": 1000 / step_ms if step_ms else None,
        "samples_per_second": recipe.training.batch_size * 1000 / step_ms if step_ms else None,
        "train_seconds": train_seconds,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "device": device,
        "precision": precision,
        "processes": world,
        "global_batch": recipe.training.batch_size,
        "per_device_batch": per_device,
        "gradient_accumulation_steps": recipe.training.gradient_accumulation_steps,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "adapter_config": adapter_config.to_dict() if adapter_config is not None else None,
        "trained_values_sha256": digests,
        "hypermerge_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "train_log": train_log,
        "eval_log": eval_log,
    }
    if rank_pattern or rank_budget:
        metrics["rank_pattern"] = rank_pattern
        metrics["rank_budget"] = rank_budget
        metrics["rank_allocation_final"] = allocation_final(trainer.adapter_model)
    return metrics
