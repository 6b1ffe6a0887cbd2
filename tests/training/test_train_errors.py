"""Bad recipes and bad run directories: one line on stderr, a non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from hypermerge.cli import cli
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import subprocess_env
from tests.helpers.training import tiny_recipe, write_jsonl, write_recipe


def run(args):
    return CliRunner().invoke(cli, args)


def test_invalid_recipe_names_every_bad_key(tiny, tmp_path):
    raw = tiny_recipe(tiny)
    raw["training"]["learning_rte"] = 1e-3
    raw["adapter"]["rank"] = 4
    recipe = write_recipe(tmp_path / "bad.yaml", raw)
    result = run(["train", str(recipe), "--output-dir", str(tmp_path / "out")])
    assert_one_line_error(result, "invalid recipe", "learning_rte", "valid keys are learning_rate",
                          "unknown hyperadapt option(s) rank", str(recipe), exit_code=2)
    assert not (tmp_path / "out").exists()


def test_bad_overrides_and_missing_files(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny))
    assert_one_line_error(run(["train", str(tmp_path / "nope.yaml")]), "recipe file not found", exit_code=2)
    assert_one_line_error(run(["train", str(recipe), "--set", "training.lr"]), "is not of the form", exit_code=2)
    assert_one_line_error(run(["train", str(recipe), "--set", "training.batch_size=big"]),
                          "training.batch_size: expected an integer, got 'big'", exit_code=2)
    missing_data = tiny_recipe(tiny, data={"train": str(tmp_path / "none.jsonl"), "validation": None})
    result = run(["train", str(write_recipe(tmp_path / "m.yaml", missing_data)), "--output-dir", str(tmp_path / "o")])
    assert_one_line_error(result, "data file not found", "none.jsonl", exit_code=1)
    missing_model = tiny_recipe(tiny)
    missing_model["model"] = {"path": str(tmp_path / "no-model")}
    result = run(["train", str(write_recipe(tmp_path / "n.yaml", missing_model)), "--output-dir", str(tmp_path / "o")])
    assert_one_line_error(result, "model directory not found", exit_code=1)


def test_malformed_data_is_named(tiny, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"sentence": "good", "label": 1}])
    recipe = tiny_recipe(tiny, data={"train": str(rows), "validation": None})
    result = run(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--output-dir", str(tmp_path / "o")])
    assert_one_line_error(result, "has no text field 'text' (its fields: sentence, label)", "data.text_field",
                          exit_code=1)


def test_fp16_on_the_cpu_is_refused(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny, device="cpu", precision="fp16"))
    assert_one_line_error(run(["train", str(recipe), "--output-dir", str(tmp_path / "o")]),
                          "fp16 needs CUDA", "bf16 or fp32", exit_code=2)


def test_run_directory_rules(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny, max_steps=2, save_steps=None))
    out = tmp_path / "run"
    assert_one_line_error(run(["train", str(recipe), "--output-dir", str(out), "--resume"]),
                          "no checkpoint to resume from", "training.save_steps", exit_code=1)
    assert run(["train", str(recipe), "--output-dir", str(out), "-q"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert_one_line_error(run(["train", str(recipe), "--output-dir", str(out)]),
                          "already holds a run", "--resume", "--overwrite", exit_code=1)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert_one_line_error(run(["train", str(recipe), "--output-dir", str(out), "--resume", "--overwrite"]),
                          "pass one of them", exit_code=2)
    result = run(["train", str(recipe), "--output-dir", str(out), "--overwrite", "-q", "--set", "training.seed=1"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the run's files, nothing else
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before


def test_the_real_command_exits_with_one_line(tiny, tmp_path):
    raw = tiny_recipe(tiny)
    raw["task"] = "summarization"
    recipe = write_recipe(tmp_path / "bad.yaml", raw)
    done = subprocess.run([sys.executable, "-m", "hypermerge", "train", str(recipe)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypermerge: error: invalid recipe: task: unknown task")


@pytest.mark.parametrize("flag", ["--max-steps=0", "--max-steps=x"])
def test_option_values_are_checked_by_the_cli(tiny, tmp_path, flag):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny))
    result = run(["train", str(recipe), flag])
    assert result.exit_code == 2 and "--max-steps" in result.output
