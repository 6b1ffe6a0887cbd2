"""The callbacks a training run adds to the Trainer: rank allocation, step timing, the schedule check."""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import TrainerCallback

import hypermerge.adapters.model as adapter_model
from hypermerge.errors import HypermergeError


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
