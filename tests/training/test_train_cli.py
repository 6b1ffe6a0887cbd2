"""``hypermerge train`` through the CLI on tiny models: every method and task learns, the run
directory holds what docs/training.md promises, and the adapter folds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.adapters.base import AdapterMethod
from hypermerge.cli import cli
from tests.helpers.training import tiny_recipe, write_recipe

METHODS = sorted(hm.METHODS) + ["full"]
TASKS = ["sequence-classification", "causal-lm"]


def run_cli(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_through_the_cli(method, task, tiny, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny, task, method))
    out = tmp_path / "run"
    result = run_cli(["train", str(recipe), "--output-dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output

    metrics = json.loads((out / "metrics.json").read_text())
    first_loss = metrics["train_log"][0]["loss"]
    assert metrics["steps"] == 30 and len(metrics["train_log"]) == 30
    assert metrics["eval_loss"] < 0.85 * first_loss, (first_loss, metrics["eval_loss"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    for key in ("trainable_parameters", "total_parameters", "step_time_ms", "steps_per_second",
                "peak_memory_mib", "train_loss"):
        assert metrics[key] > 0, key
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    allocates = method != "full" and hm.get_method(method).allocate_ranks.__func__ is not \
        AdapterMethod.allocate_ranks.__func__
    assert (out / "plots" / "ranks.png").exists() == allocates, "ranks.png exactly for rank-allocating methods"
    if allocates:
        assert metrics["rank_pattern"] and len(metrics["rank_budget"]) == 30
    resolved = hm.load_recipe(out / "recipe.yaml")
    assert resolved.adapter.method == method and resolved.training.max_steps == 30
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-20", "checkpoint-30"]

    model_cls = (transformers.AutoModelForSequenceClassification if task == "sequence-classification"
                 else transformers.AutoModelForCausalLM)
    inputs = {"input_ids": torch.tensor([[2, 10, 20, 30, 40]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    if method == "full":
        assert not (out / "adapter").exists()
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
        model_cls.from_pretrained(out / "model")  # a plain HF model directory
        return
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 2
    # The adapter is the checkpoint format, and `hypermerge fold --adapter` turns it into a model
    # that computes what the trained adapter model computes.
    folded_dir = tmp_path / "folded"
    result = run_cli(["fold", "--adapter", str(out / "adapter"), "--out", str(folded_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    base = tiny["bert"] if task == "sequence-classification" else tiny["llama"]
    if task == "sequence-classification":
        adapted = hm.load_adapter(model_cls.from_pretrained(base, num_labels=2, ignore_mismatched_sizes=True),
                                  out / "adapter")
    else:
        adapted = hm.load_adapter(model_cls.from_pretrained(base), out / "adapter")
    folded = model_cls.from_pretrained(folded_dir)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(**inputs).logits, adapted.eval()(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)
    if task == "sequence-classification":
        assert folded.config.id2label == {0: "negative", 1: "positive"}


def test_help_lists_the_options():
    result = run_cli(["train", "--help"])
    for option in ("--output-dir", "--max-steps", "--set", "--resume", "--overwrite", "--quiet"):
        assert option in result.output


def test_builtin_sentiment_slice_and_command_line_changes(tiny, tmp_path):
    recipe = tiny_recipe(tiny, data={"train": None, "validation": None, "name": "sentiment", "train_examples": 48,
                                     "eval_examples": 16, "padding": "max_length"})
    del recipe["data"]["train"], recipe["data"]["validation"]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "run"
    result = run_cli(["train", str(path), "--output-dir", str(out), "--max-steps", "3",
                      "--set", "training.learning_rate=1e-3", "--set", "training.save_steps=null", "-q"])
    assert result.exit_code == 0, result.output
    resolved = hm.load_recipe(out / "recipe.yaml")
    assert resolved.training.max_steps == 3 and resolved.training.learning_rate == 1e-3
    assert resolved.adapter.options["modules_to_save"] == ["classifier"]  # the new head, added for the user
    assert resolved.output_dir == str(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_log"][-1]["learning_rate"] is not None
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    checkpoint = hm.read_adapter(out / "adapter")
    assert checkpoint.config_overrides["id2label"] == {"0": "negative", "1": "positive"}
