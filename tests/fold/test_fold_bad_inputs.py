"""Bad inputs to the streaming fold: each gives one line naming the file and what to do, and
leaves no output (nor a temporary directory) behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import hypermerge as hm
from hypermerge.cli import cli
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import (
    load_tiny,
    perturb_adapter,
    save_tiny,
    subprocess_env,
    tiny_config,
    tiny_model,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = save_tiny("llama", root / "base")
    model = hm.inject(load_tiny("llama", base), hm.LoRAConfig(r=4, alpha=8))
    perturb_adapter(model)
    hm.save_adapter(model, root / "adapter", base_model=base)
    return root, base, root / "adapter"


def fold(*args: str):
    return CliRunner().invoke(cli, ["fold", *args, "-q"])


def assert_nothing_left(parent, name="out"):
    assert not (parent / name).exists()
    assert not list(parent.glob(f"{name}*hm-tmp*"))


def _copy_base(base, target):
    target.mkdir()
    for entry in base.iterdir():
        (target / entry.name).write_bytes(entry.read_bytes())
    return target


def test_truncated_base_shard(setup, tmp_path):
    _, base, adapter = setup
    broken = _copy_base(base, tmp_path / "base")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    result = fold("--adapter", str(adapter), "--base", str(broken), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "truncated safetensors file", "model.safetensors", "re-download")
    assert_nothing_left(tmp_path)


def test_base_weights_that_are_not_safetensors(setup, tmp_path):
    _, base, adapter = setup
    broken = _copy_base(base, tmp_path / "base")
    (broken / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    result = fold("--adapter", str(adapter), "--base", str(broken), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "not a safetensors file", "model.safetensors")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    result = fold("--adapter", str(adapter), "--base", str(broken), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "not JSON")
    assert_nothing_left(tmp_path)


def test_missing_and_inconsistent_shards(tmp_path):
    base = save_tiny("llama", tmp_path / "base", max_shard_size="20KB")
    model = hm.inject(load_tiny("llama", base), hm.HyperAdaptConfig())
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = (base / shard).rename(tmp_path / shard)
    result = fold("--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "missing", shard)
    moved.rename(base / shard)
    name = next(n for n, s in index["weight_map"].items() if s == shard)
    index["weight_map"][name] = next(s for s in index["weight_map"].values() if s != shard)
    index_path.write_text(json.dumps(index))
    result = fold("--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "index puts", name, "re-save")
    assert_nothing_left(tmp_path)


def test_adapter_without_fingerprint_for_another_base_is_caught_by_shape(tmp_path):
    # PEFT IA³ vectors only say one side of each weight; the engine's meta-tensor dry run catches the rest.
    base = save_tiny("llama", tmp_path / "base")
    config = tiny_config("llama")
    config.intermediate_size = 48
    import transformers

    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "wider")
    ia3 = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(target_modules=["down_proj"],
                                                                    feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert fold("--adapter", str(tmp_path / "ia3"), "--base", str(base), "--out", str(tmp_path / "ok")).exit_code == 0
    result = fold("--adapter", str(tmp_path / "ia3"), "--base", str(tmp_path / "wider"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "down_proj", "do not fit", "(32, 48)", str(tmp_path / "ia3"))
    assert_nothing_left(tmp_path)


def _scaled_adapter(setup, tmp_path, value: float):
    _, base, _ = setup
    model = hm.inject(load_tiny("llama", base), hm.HyperAdaptConfig())
    with torch.no_grad():
        layer = hm.adapter_layers(model)["model.layers.1.mlp.up_proj.weight"]
        layer.a.fill_(value)
        layer.b.fill_(value)
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    return tmp_path / "adapter"


def test_folded_result_overflowing_to_inf_is_refused(setup, tmp_path):
    adapter = _scaled_adapter(setup, tmp_path, 1e25)  # finite scales, but a·w·b overflows float32
    result = fold("--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "folding model.layers.1.mlp.up_proj.weight produced NaN or Inf")
    assert_nothing_left(tmp_path)


def test_folded_result_too_large_for_float16_is_refused(setup, tmp_path):
    adapter = _scaled_adapter(setup, tmp_path, 3e3)
    result = fold("--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "float16")
    assert_one_line_error(result, "too large for float16", "--dtype float32")
    assert fold("--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "bfloat16").exit_code == 0


def test_peft_dir_problems(setup, tmp_path):
    _, base, _ = setup
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    raw = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())

    def variant(name, **changes):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({**raw, **changes}))
        (directory / "adapter_model.safetensors").write_bytes((tmp_path / "lora" / "adapter_model.safetensors")
                                                              .read_bytes())
        return str(directory)

    out = str(tmp_path / "out")
    assert_one_line_error(fold("--adapter", variant("loha", peft_type="LOHA"), "--base", str(base), "--out", out),
                          "PEFT LOHA adapters cannot be folded", "merge_and_unload")
    assert_one_line_error(fold("--adapter", variant("bias", lora_bias=True), "--base", str(base), "--out", out),
                          "lora_bias", "adapter_config.json")
    assert_one_line_error(fold("--adapter", variant("pissa", init_lora_weights="pissa"), "--base", str(base),
                               "--out", out), "changes the base weights", "path_initial_model_for_weight_conversion")
    assert_one_line_error(fold("--adapter", variant("rank", r=8), "--base", str(base), "--out", out),
                          "rank 4 in the weights but 8", "adapter_model.safetensors")
    assert_one_line_error(fold("--adapter", variant("hub", base_model_name_or_path="meta-llama/Llama-3-8B"),
                               "--out", out), "not a local directory", "--base")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(raw))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    assert_one_line_error(fold("--adapter", str(pickled), "--base", str(base), "--out", out), "pickle", "refuses")
    assert_nothing_left(tmp_path)


def test_nan_in_peft_adapter_is_refused(setup, tmp_path):
    _, base, _ = setup
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = torch.inf
    save_file(tensors, str(tmp_path / "lora" / "adapter_model.safetensors"))
    result = fold("--adapter", str(tmp_path / "lora"), "--base", str(base), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "NaN or Inf", "adapter_model.safetensors")
    assert_nothing_left(tmp_path)


def test_copy_without_copy_file_range_goes_through_a_bounded_buffer(setup, tmp_path, monkeypatch):
    _, base, adapter = setup
    from hypermerge.fold import safetensors_io

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(safetensors_io.os, "copy_file_range", cross_device)
    monkeypatch.setattr(safetensors_io, "FALLBACK_CHUNK", 1000)  # many chunks, even for a tiny model
    assert fold("--adapter", str(adapter), "--out", str(tmp_path / "out")).exit_code == 0
    reference = tmp_path / "reference"
    monkeypatch.undo()
    assert fold("--adapter", str(adapter), "--out", str(reference)).exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


@pytest.mark.parametrize("path", ["write", "copy"])
def test_disk_full_is_one_line_and_leaves_nothing(setup, tmp_path, monkeypatch, path):
    _, _, adapter = setup
    from hypermerge.fold import safetensors_io

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if path == "write":  # the header fits, the first folded tensor does not
        original = safetensors_io.ShardWriter._write
        calls = []

        def fill_up(self, data):
            calls.append(1)
            if len(calls) > 1:
                no_space()
            original(self, data)

        monkeypatch.setattr(safetensors_io.ShardWriter, "_write", fill_up)
    else:
        monkeypatch.setattr(safetensors_io.os, "copy_file_range", no_space)
    result = fold("--adapter", str(adapter), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "ran out of disk space writing model.safetensors", "free space")
    assert_nothing_left(tmp_path)


def test_file_size_limit_efbig_in_a_real_process(setup, tmp_path):
    _, _, adapter = setup
    # ulimit -f counts 1024-byte blocks; the tiny model's shard is ~150 KB. Python ignores SIGXFSZ,
    # so the write fails with EFBIG instead of killing the process.
    command = (f"ulimit -f 40; exec {sys.executable} -m hypermerge fold --adapter {adapter} "
               f"--out {tmp_path / 'out'} -q")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "grew past the largest file allowed" in lines[0], done.stderr
    assert "--max-shard-size" in lines[0]
    assert_nothing_left(tmp_path)
