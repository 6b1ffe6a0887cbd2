"""Rank allocation without user code, on a fake rank-allocating method registered for the test:
the regulariser joins the loss, allocate_ranks runs once per optimizer step while the gradients
exist, total_steps comes from the Trainer's schedule, and the run draws plots/ranks.png."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import hypermerge as hm
from hypermerge.adapters import registry
from tests.helpers.fake_rank_method import FakeRank
from tests.helpers.training import tiny_recipe


@pytest.fixture
def fake_method(monkeypatch):
    monkeypatch.setitem(registry.METHODS, FakeRank.name, FakeRank)
    monkeypatch.setattr(FakeRank, "allocations", [])
    monkeypatch.setattr(FakeRank, "regularizers", [])
    return FakeRank


def test_allocation_runs_after_each_optimizer_step_before_zero_grad(fake_method, tiny, tmp_path):
    # 2 accumulation steps: 2 forward/backward passes per optimizer step, one allocation.
    recipe = tiny_recipe(tiny, "sequence-classification", "fakerank", max_steps=12, gradient_accumulation_steps=2,
                         save_steps=None)
    result = hm.train(recipe, output_dir=tmp_path / "run", quiet=True)

    # steps taken, the one just taken included (1 after the first); gradients still there
    assert fake_method.allocations == [(step, True) for step in range(1, 13)]
    assert len(fake_method.regularizers) == 2 * 12 + 0  # once per micro-batch (eval adds none)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["config"]["total_steps"] == 12
    layers = len(config["targets"])
    # linear budget from r=4 to target_r=2 per matrix, recorded after each allocation
    assert [total for _, total in result.metrics["rank_budget"]] == [
        round(4 * layers - 2 * layers * step / 12) for step in range(1, 13)]
    assert [step for step, _ in result.metrics["rank_budget"]] == list(range(1, 13))
    assert sum(config["rank_pattern"].values()) == 2 * layers == sum(result.metrics["rank_pattern"].values())
    assert (tmp_path / "run" / "plots" / "ranks.png").stat().st_size > 1000
    assert (tmp_path / "run" / "plots" / "loss.png").exists()


def test_total_steps_comes_from_the_trainers_schedule(fake_method, tiny, tmp_path):
    # 32 examples, global batch 8 -> 4 steps an epoch; 2.5 epochs -> ceil(10) = 10 steps.
    recipe = tiny_recipe(tiny, "causal-lm", "fakerank", max_steps=None, epochs=2.5, save_steps=None)
    result = hm.train(recipe, output_dir=tmp_path / "run", quiet=True)
    assert result.metrics["steps"] == result.metrics["total_steps"] == math.ceil(2.5 * 4)
    assert result.metrics["adapter_config"]["total_steps"] == 10
    resolved = hm.load_recipe(result.recipe_path)
    assert resolved.adapter.options["total_steps"] == 10


def test_the_regulariser_is_added_to_the_training_loss(fake_method, tiny, tmp_path):
    first_losses = {}
    for weight in (0.0, 5.0):
        fake_method.regularizers.clear()
        recipe = tiny_recipe(tiny, "sequence-classification", "fakerank", adapter={"orth_weight": weight},
                             max_steps=2, save_steps=None)
        result = hm.train(recipe, output_dir=tmp_path / f"run{weight}", quiet=True)
        first_losses[weight] = (result.metrics["train_log"][0]["loss"], fake_method.regularizers[0])
    (plain, zero), (regularized, added) = first_losses[0.0], first_losses[5.0]
    assert zero == 0.0 and added > 0.1
    # same seed, same first batch: the logged losses differ by exactly the regulariser
    assert regularized == pytest.approx(plain + added, rel=1e-5)


def test_the_rank_allocated_adapter_loads_and_folds(fake_method, tiny, tmp_path):
    result = hm.train(tiny_recipe(tiny, "causal-lm", "fakerank", max_steps=6, save_steps=None),
                      output_dir=tmp_path / "run", quiet=True)
    model = hm.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"]), result.adapter_dir)
    assert hm.rank_pattern(model) == result.metrics["rank_pattern"]
    inputs = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        adapted = model(inputs).logits
        folded = hm.fold_model(model)(inputs).logits
    torch.testing.assert_close(folded, adapted, rtol=1e-4, atol=1e-5)
