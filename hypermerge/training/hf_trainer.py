"""``HypermergeTrainer``: the transformers ``Trainer`` that trains, checkpoints and resumes a hypermerge adapter.

Checkpoints hold only what is trained: the adapter in the hypermerge format (foldable as it is) and
the exact training state (:func:`training_state`), so ``--resume`` gives the same final adapter as a
run that was never interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import hypermerge.adapters.model as adapter_model
from hypermerge.adapters.adalora import ALLOCATOR_PREFIX, allocator_state_tensors, restore_allocator_state
from hypermerge.adapters.base import AdapterMethod
from hypermerge.adapters.checkpoint import save_adapter
from hypermerge.adapters.checkpoint_format import read_safetensors
from hypermerge.errors import CheckpointError

TRAINING_STATE_FILE = "training_state.safetensors"  # inside a checkpoint: what resume loads
RUN_STATE_FILE = "hypermerge_state.json"  # inside a checkpoint: the rank budget trace so far


def implements(method: type[AdapterMethod], hook: str) -> bool:
    """True when ``method`` implements the model-level ``hook`` (the base class's is a no-op)."""
    return getattr(method, hook).__func__ is not getattr(AdapterMethod, hook).__func__


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
        self._regularized = implements(method, "regularization_loss")

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
