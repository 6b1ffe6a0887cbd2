"""AdaLoRA's rank schedule through ``hypermerge train``: every schedule shape ends at exactly
``target_r x n`` kept ranks with the allocation final, and the budget reaches the target exactly
at step ``total_steps - tfinal`` (the allocator and the trainer count steps the same way: the
number of optimizer steps taken, 1 after the first)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import hypermerge as hm
from hypermerge.cli import cli
from tests.helpers.training import Interrupt, tiny_recipe, write_recipe

TARGET_R = 2  # tests.helpers.training.ADAPTER_OPTIONS: init_r 4, target_r 2


def train_cli(recipe: dict, out, *extra: str) -> dict:
    """``hypermerge train`` on the recipe; returns metrics.json."""
    path = write_recipe(out.parent / f"{out.name}.yaml", recipe)
    result = CliRunner().invoke(cli, ["train", str(path), "--output-dir", str(out), "-q", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def check_final(run, *, total: int, tfinal: int) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    n = len(metrics["rank_pattern"])
    assert sum(metrics["rank_pattern"].values()) == TARGET_R * n
    assert metrics["rank_allocation_final"] is True
    budget = dict(metrics["rank_budget"])
    assert sorted(budget) == list(range(1, total + 1))
    # every rank up to tinit (1 in these schedules); the target from total - tfinal to the end
    assert budget[1] == 4 * n
    assert all(budget[step] == TARGET_R * n for step in range(total - tfinal, total + 1))
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == metrics["rank_pattern"]
    return metrics


SHAPES = {
    # the example: allocation every step, the last step is the final allocation
    "tfinal0": ("adalora", 6, dict(tinit=1, tfinal=0, delta_t=1), {}),
    # masks at steps 3 and 6 only, the final allocation (step 8) not a multiple of delta_t;
    # two micro-batches per optimizer step
    "tfinal2-delta_t3-accumulation2": ("adalora", 10, dict(tinit=1, tfinal=2, delta_t=3),
                                       {"gradient_accumulation_steps": 2}),
    "hyper-tfinal0": ("hyperadalora", 6, dict(tinit=1, tfinal=0, delta_t=1), {}),
    "hyper-tfinal1-delta_t2-accumulation2": ("hyperadalora", 7, dict(tinit=1, tfinal=1, delta_t=2),
                                             {"gradient_accumulation_steps": 2}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_schedule_ends_at_the_target_with_final_layers(shape, tiny, tmp_path):
    method, total, schedule, training = SHAPES[shape]
    recipe = tiny_recipe(tiny, "sequence-classification", method, max_steps=total, save_steps=None, **training)
    sets = [f"--set=adapter.{key}={value}" for key, value in schedule.items()]
    train_cli(recipe, tmp_path / "run", "--max-steps", str(total), *sets)
    check_final(tmp_path / "run", total=total, tfinal=schedule["tfinal"])


@pytest.mark.parametrize("method", ["adalora", "hyperadalora"])
def test_resume_across_the_final_allocation(method, tiny, tmp_path):
    """Interrupted after the final allocation, resumed from a checkpoint before it: the same
    adapter and rank pattern as a run never interrupted (the allocator's averages are restored)."""
    schedule = {"tinit": 1, "tfinal": 3, "delta_t": 1}
    recipe = tiny_recipe(tiny, "sequence-classification", method, adapter=schedule, max_steps=10, save_steps=5)
    straight = train_cli(recipe, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        hm.train(recipe, output_dir=interrupted, quiet=True, callbacks=[Interrupt(8)])  # final allocation at 7
    train_cli(recipe, interrupted, "--resume")
    resumed = check_final(interrupted, total=10, tfinal=3)
    assert resumed["resumed_from"].endswith("checkpoint-5")
    assert resumed["rank_pattern"] == straight["rank_pattern"]
    assert resumed["rank_budget"] == straight["rank_budget"]
    expected = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    actual = load_file(str(interrupted / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
