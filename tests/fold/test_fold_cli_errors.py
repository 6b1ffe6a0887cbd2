"""Bad inputs to ``hypermerge fold`` / ``inspect``: one line, non-zero exit, no output left."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import load_tiny, perturb_adapter, save_tiny, subprocess_env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    base = save_tiny("llama", root / "base")
    model = hm.inject(load_tiny("llama", base), hm.HyperAdaptConfig())
    perturb_adapter(model)
    hm.save_adapter(model, root / "adapter", base_model=base)
    return root, base, root / "adapter"


def run(args):
    return CliRunner().invoke(cli, args)


def test_missing_adapter(tmp_path):
    result = run(["fold", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "adapter directory not found", "nope")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_untouched(setup, tmp_path):
    _, _, adapter = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(["fold", "--adapter", str(adapter), "--out", str(out)])
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(["fold", "--adapter", str(adapter), "--out", str(out), "--overwrite", "-q"])
    assert result.exit_code == 0 and not (out / "keep.txt").exists()


def test_adapter_for_another_base_is_refused(setup, tmp_path):
    _, _, adapter = setup
    other = save_tiny("qwen2", tmp_path / "other")
    # Same names (Llama and Qwen2 share the layout) but Qwen2 adds biases; shapes match, so change sizes:
    import transformers

    from tests.helpers.common import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 48
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "wider")
    result = run(["fold", "--adapter", str(adapter), "--base", str(tmp_path / "wider"), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "mlp", "shape", "adapter was made for")
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    result = run(["fold", "--adapter", str(adapter), "--base", str(gpt2), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "not in the base checkpoint")
    assert not (tmp_path / "o").exists()
    del other


def test_truncated_adapter_weights(setup, tmp_path):
    _, _, adapter = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    result = run(["fold", "--adapter", str(broken), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "not a readable safetensors file", "adapter_model.safetensors")
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_is_refused(setup, tmp_path):
    _, _, adapter = setup
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    result = run(["fold", "--adapter", str(pickled), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "pickle", "refuses")


def test_pickle_base_is_refused(setup, tmp_path):
    _, _, adapter = setup
    base = tmp_path / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    result = run(["fold", "--adapter", str(adapter), "--base", str(base), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "pickle", "safe_serialization")


def test_nan_in_adapter_is_refused(setup, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _, _, adapter = setup
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0] = torch.nan
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    result = run(["fold", "--adapter", str(bad), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_unknown_method_and_bad_json(setup, tmp_path):
    _, _, adapter = setup
    bad = tmp_path / "unknown"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["method"] = "magic"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert_one_line_error(run(["fold", "--adapter", str(bad), "--out", str(tmp_path / "o")]),
                          "unknown adapter method 'magic'", "hyperadapt")
    (bad / "adapter_config.json").write_text("{not json")
    assert_one_line_error(run(["inspect", str(bad)]), "not valid JSON")


def test_no_recorded_base(setup, tmp_path):
    _, _, adapter = setup
    bad = tmp_path / "nobase"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model"] = None
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert_one_line_error(run(["fold", "--adapter", str(bad), "--out", str(tmp_path / "o")]), "--base")


def test_inspect_reports_counts(setup):
    _, _, adapter = setup
    result = run(["inspect", str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == "hyperadapt" and summary["targets"] == 14
    # per layer: q (32+32), k and v (32+16 each, 2 KV heads), o (32+32), gate, up, down (32+64 each)
    assert summary["trainable_parameters"] == 2 * (64 + 48 + 48 + 64 + 3 * 96)
    assert 0 < summary["trainable_ratio"] < 1


def test_real_process_exit_code_and_debug(setup, tmp_path):
    command = [sys.executable, "-m", "hypermerge", "fold", "--adapter", str(tmp_path / "nope"),
               "--out", str(tmp_path / "o")]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True,
                           env=subprocess_env())
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
