"""The fold plan as typed operations, and torch's thread count set for a block and restored."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hypermerge.fold.operations import CastTensor, CopyTensor, FoldBias, FoldWeight, SaveFullTensor
from hypermerge.fold.plan import FoldPlan
from hypermerge.fold.threads import torch_threads


def _plan() -> FoldPlan:
    return FoldPlan(folds={"a.weight": "a.weight"}, bias_folds={"a.bias": "a.weight"},
                    replacements={"a.bias": "a.bias", "head.weight": "head.weight"}, additions={})


def test_each_base_tensor_gets_one_operation_the_fold_first():
    plan = _plan()
    assert plan.operation("a.weight", torch.float16) == FoldWeight("a.weight", "a.weight", torch.float16)
    assert plan.operation("a.bias", torch.float32) == FoldBias("a.bias", "a.weight", torch.float32)
    assert plan.operation("head.weight", torch.float32) == SaveFullTensor("head.weight", "head.weight", torch.float32)
    assert plan.operation("b.weight", torch.bfloat16, cast=True) == CastTensor("b.weight", torch.bfloat16)
    assert plan.operation("b.weight", None) == CopyTensor("b.weight")


def test_changes_list_every_change_in_order_a_bias_both_folded_and_trained_twice():
    operations = _plan().changes(lambda name: torch.float32)
    assert [type(op) for op in operations] == [FoldWeight, FoldBias, SaveFullTensor, SaveFullTensor]
    assert [op.name for op in operations] == ["a.weight", "a.bias", "a.bias", "head.weight"]


def test_operations_are_frozen_values():
    operation = FoldWeight("a.weight", "a.weight", torch.float32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        operation.name = "b.weight"
    assert len({operation, FoldWeight("a.weight", "a.weight", torch.float32)}) == 1


def test_copy_and_cast_read_the_base_tensor():
    stored = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    read = {"w": stored}.__getitem__
    assert CopyTensor("w").produce(read, adapter=None) is stored
    cast = CastTensor("w", torch.float16).produce(read, adapter=None)
    assert cast.dtype == torch.float16 and torch.equal(cast.float(), stored)


def test_torch_threads_restores_the_count_even_after_an_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError), torch_threads(target):
        assert torch.get_num_threads() == target
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
