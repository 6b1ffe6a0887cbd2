"""The base recognised by content: an adapter folded or patched onto another model of the same
names and shapes is refused in one line (unless --allow-other-base, which is recorded), while
float32, bfloat16 and float16 copies of its own base are accepted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import peft
import torch
import transformers
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.adapters import base_digest as digests
from hypermerge.cli import cli
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import load_tiny, perturb_adapter, save_tiny, tiny_config, tiny_model


def _fold(adapter, base, out, *extra):
    return CliRunner().invoke(cli, ["fold", "--adapter", str(adapter), "--base", str(base), "--out", str(out), "-q",
                                    *extra])


def test_a_qwen2_of_identical_sizes_is_refused_naming_the_weight_and_both_bases(world, tmp_path):
    """The issue's case: a Llama adapter folded onto a Qwen2 of the same names and shapes."""
    torch.manual_seed(0)
    qwen = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(tiny_config("qwen2")).save_pretrained(qwen)
    line = assert_one_line_error(_fold(world.lora, qwen, tmp_path / "out"))
    assert "not the one the adapter was trained on" in line
    assert "model.layers.0.self_attn.q_proj.weight holds other values" in line  # the first target
    assert f"base recorded: {world.llama}" in line and f"base given: {qwen}" in line
    assert "--allow-other-base" in line
    assert not (tmp_path / "out").exists()


def test_another_checkpoint_of_the_same_architecture_is_refused(world, tmp_path):
    other = save_tiny("llama", tmp_path / "other", seed=1)
    line = assert_one_line_error(_fold(world.lora, other, tmp_path / "out"))
    assert "holds other values" in line and not (tmp_path / "out").exists()


def test_allow_other_base_folds_and_records_it(world, tmp_path):
    other = save_tiny("llama", tmp_path / "other", seed=1)
    result = _fold(world.lora, other, tmp_path / "out", "--allow-other-base")
    assert result.exit_code == 0, result.output
    assert "--allow-other-base" in result.output
    provenance = json.loads((tmp_path / "out" / "hypermerge_fold.json").read_text())
    assert provenance["base_check"]["status"] == "other base allowed"
    assert "holds other values" in provenance["base_check"]["detail"]


def test_casts_of_the_same_base_are_the_same_base(world, tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        copy = tmp_path / str(dtype).removeprefix("torch.")
        tiny_model("llama").to(dtype).save_pretrained(copy)
        result = _fold(world.lora, copy, tmp_path / f"out-{copy.name}")
        assert result.exit_code == 0, result.output
        check = json.loads((tmp_path / f"out-{copy.name}" / "hypermerge_fold.json").read_text())["base_check"]
        assert check["status"] == "same base" and check["weights_compared"] == 14, check


def test_the_sample_survives_float16_double_rounding_and_tells_other_values_apart():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=generator) * 0.02
    values[:8] = torch.tensor([1e-6, -3e-7, 5e-5, 0.0, 1.0, -2.0, 3e-8, 100.0])
    recorded = digests.decode(digests.encode(values.numpy()))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert digests.same_sample(recorded, values.to(dtype).float().numpy()), dtype
    # another model: the same distribution, other values (and a 1% change of one value)
    assert not digests.same_sample(recorded, (torch.randn(4096, generator=generator) * 0.02).numpy())
    nudged = values.clone()
    nudged[100] *= 1.02
    assert not digests.same_sample(recorded, nudged.numpy())
    assert np.array_equal(digests.from_bf16_bits(digests.to_bf16_bits(recorded)), recorded)


def test_patch_refuses_an_adapter_of_another_base_and_allows_it_when_asked(world, tmp_path):
    other = save_tiny("llama", tmp_path / "other", seed=1)
    model = hm.inject(load_tiny("llama", other), hm.LoRAConfig(r=4, alpha=8))
    perturb_adapter(model)
    adapter = hm.save_adapter(model, tmp_path / "adapter", base_model=other)
    args = ["patch", str(world.onnx), "--adapter", str(adapter), "--no-verify", "-q"]
    line = assert_one_line_error(CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "p1")]))
    assert "holds other values" in line and f"base given: {world.onnx}" in line
    assert not (tmp_path / "p1").exists()
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "p2"), "--allow-other-base"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p2" / "report.json").read_text())
    assert report["patch"]["base_content_check"]["status"] == "other base allowed"
    # and its own base's adapter passes the content check
    result = CliRunner().invoke(cli, ["patch", str(world.onnx), "--adapter", str(world.lora), "--no-verify", "-q",
                                      "--out", str(tmp_path / "p3")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p3" / "report.json").read_text())["patch"]["base_content_check"]["status"] == \
        "same base"


def test_peft_and_old_adapters_fold_saying_the_base_was_not_checked(world, tmp_path):
    model = peft.get_peft_model(load_tiny("llama", world.llama), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "peft")
    old = shutil.copytree(world.lora, tmp_path / "old")
    raw = json.loads((old / "adapter_config.json").read_text())
    del raw["base_digest"]
    (old / "adapter_config.json").write_text(json.dumps(raw))
    for adapter, why in ((tmp_path / "peft", "PEFT adapters record no content"), (old, "saved before")):
        result = _fold(adapter, world.llama, tmp_path / f"out-{adapter.name}")
        assert result.exit_code == 0, result.output
        assert "base was not checked" in result.output and why in result.output
        check = json.loads((tmp_path / f"out-{adapter.name}" / "hypermerge_fold.json").read_text())["base_check"]
        assert check["status"] == "not checked"
        shown = CliRunner().invoke(cli, ["inspect", str(adapter)])
        assert "base content         not recorded" in shown.output
    assert "base content         recorded: llama, 14 weights" in CliRunner().invoke(cli, ["inspect",
                                                                                         str(world.lora)]).output
