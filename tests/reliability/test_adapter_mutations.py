"""A mutated adapter is refused whole, before any work, by every door it can come in through.

A hypothesis property takes real adapter directories (hypermerge HyperAdapt, LoRA, DoRA, AdaLoRA,
IA³ and a PEFT LoRA, all on a tiny Llama), mutates one thing (drops, renames, reshapes or retypes
a tensor; replaces a value of adapter_config.json with one of the wrong type or out of range;
deletes a required key) and checks that ``hypermerge fold``, ``hypermerge patch`` and
``hypermerge inspect`` each exit non-zero with one line and no traceback, writing nothing, and
that ``hm.load_adapter`` raises a ``HypermergeError``. 30 examples in the default suite, 200 in
the slow one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hypermerge as hm
from hypermerge.cli import cli
from tests.helpers.cli import assert_one_line_error
from tests.helpers.common import TEST_CONFIGS, load_tiny, perturb_adapter, subprocess_env
from tests.helpers.reliability import tree_digest

METHODS = ["hyperadapt", "lora", "dora", "adalora", "ia3", "peft-lora"]
# derandomize: every run draws the same examples, so CI cannot go red on a new draw. A random draw found
# one real gap (pinned below by @example): set derandomize=False by hand now and then to look for more.
SHARED = dict(deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Values no field of an adapter_config.json accepts where a number, a name or a list is expected.
WRONG_TYPES = ["not-a-value", {"k": 1}, [[[]]], True, None]
OUT_OF_RANGE = [-1, 0, 1.5, -2.5, math.nan, math.inf, 10**9]
# Numeric config fields and the mutations that put each out of range.
RANGED = {"r": [-1, 0, 2.5, math.nan], "alpha": [-1, 0, math.nan, math.inf], "dropout": [-0.5, 1.0, 1.5],
          "init_r": [-1, 0, 1, 2.5], "target_r": [-1, 0, 10**6], "beta1": [-0.5, 1.5, math.nan],
          "orth_reg_weight": [-1.0, math.inf], "lora_alpha": ["x", [1]], "peft_type": ["NOPE", 3]}


@pytest.fixture(scope="module")
def adapters(world, tmp_path_factory) -> dict:
    """One real adapter directory per method, each trained (perturbed) on the world's tiny Llama."""
    root = tmp_path_factory.mktemp("mutations")
    made = {}
    for method in METHODS[:-1]:
        model = hm.inject(load_tiny("llama", world.llama), TEST_CONFIGS[method]())
        perturb_adapter(model)
        made[method] = hm.save_adapter(model, root / method, base_model=world.llama)
    model = peft.get_peft_model(load_tiny("llama", world.llama),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_adapter(model)
    model.save_pretrained(root / "peft-lora")
    made["peft-lora"] = root / "peft-lora"
    return made


@st.composite
def mutations(draw) -> tuple[str, str, tuple]:
    method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(["drop", "rename", "reshape", "retype", "config", "config-range", "delete-key"]))
    return method, kind, (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))


def _mutate_tensors(path, kind: str, picks: tuple) -> str:
    tensors = load_file(path / "adapter_model.safetensors")
    keys = sorted(tensors)
    key = keys[picks[0] % len(keys)]
    tensor = tensors.pop(key)
    if kind == "rename":
        how = picks[1] % 3
        if how == 0:
            key = key + "x"
        elif how == 1:
            key = key.replace("layers.0", "layers.7").replace("layers.1", "layers.7")
        else:
            key = key.replace(".weight", ".wieght")
        tensors[key] = tensor
    elif kind == "reshape":
        how, dim = picks[1] % 3, picks[1] % tensor.dim()
        if how == 0:
            tensor = tensor.unsqueeze(0)
        elif how == 1 and tensor.shape[dim] > 1:
            tensor = tensor.narrow(dim, 0, tensor.shape[dim] - 1)
        else:
            tensor = torch.cat([tensor, torch.ones_like(tensor.narrow(dim, 0, 1))], dim=dim)
        tensors[key] = tensor.contiguous()
    elif kind == "retype":
        tensors[key] = tensor.to([torch.int64, torch.int32, torch.uint8, torch.bool][picks[1] % 4])
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return f"{kind} {key}"


def _mutate_config(path, method: str, kind: str, picks: tuple) -> str:
    config_path = path / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    peft_format = "peft_type" in raw
    if kind == "delete-key":
        keys = ["peft_type", "r"] if peft_format else ["format", "method", "targets", "base_fingerprint"]
        key = keys[picks[0] % len(keys)]
        del raw[key]
        if peft_format and key == "r":
            raw["rank_pattern"] = {}
            raw["r"] = 3  # PEFT's default is 8: a rank that disagrees with the tensors either way
        change = f"delete {key}"
    elif kind == "config-range":
        fields = raw if peft_format else raw["config"]
        candidates = sorted(k for k in RANGED if k in fields and (not peft_format or k in ("r", "lora_alpha", "peft_type")))
        field = candidates[picks[0] % len(candidates)] if candidates else None
        if field is None:  # a method without ranged fields (HyperAdapt, IA³): break the targets instead
            raw["targets"] = raw["targets"][1:]
            change = "drop a target"
        else:
            value = RANGED[field][picks[1] % len(RANGED[field])]
            fields[field] = value
            change = f"{field}={value!r}"
    else:
        if peft_format:
            keys = ["peft_type", "r", "lora_alpha", "fan_in_fan_out", "target_modules"]
        else:
            keys = ["format", "format_version", "method", "targets", "base_fingerprint", "fan_in_fan_out", "config",
                    "base_digest", *[f"config.{k}" for k in sorted(raw["config"])]]
        key = keys[picks[0] % len(keys)]
        value = WRONG_TYPES[picks[1] % len(WRONG_TYPES)]
        if key == "target_modules" and (value is None or isinstance(value, str)):
            value = 7  # null and a regex are valid there
        if key.startswith("config."):
            field = key.split(".", 1)[1]
            if value is None and field in ("target_modules", "modules_to_save", "total_steps", "feedforward_modules"):
                value = 7  # None is valid there
            if isinstance(value, str) and field in ("target_modules", "feedforward_modules"):
                value = "[unclosed"  # a regex is valid there: an invalid one is not
            raw["config"][field] = value
        else:
            if key in ("fan_in_fan_out", "base_digest", "config") and value is None:
                value = 7  # None is valid there (no Conv1D, no digest, default config)
            raw[key] = value
        change = f"{key}={value!r}"
    config_path.write_text(json.dumps(raw))
    return change


def _assert_refused(result, where, what: str) -> None:
    try:
        assert_one_line_error(result)
    except AssertionError as error:  # say which tensor or key was mutated: the drawn example only implies it
        raise AssertionError(f"{what}: {error}") from None
    if where is not None:
        assert not where.exists() and not list(where.parent.glob(f"{where.name}*hm-tmp*")), what


def check_mutation(world, adapters, tmp_path_factory, method: str, kind: str, picks: tuple) -> None:
    work = tmp_path_factory.mktemp("m")
    adapter = shutil.copytree(adapters[method], work / "adapter")
    if kind in ("drop", "rename", "reshape", "retype"):
        what = _mutate_tensors(adapter, kind, picks)
    else:
        what = _mutate_config(adapter, method, kind, picks)
    what = f"{method}: {what}"
    before = tree_digest(work)
    runner = CliRunner()
    result = runner.invoke(cli, ["fold", "--adapter", str(adapter), "--base", str(world.llama),
                                 "--out", str(work / "folded"), "-q"])
    _assert_refused(result, work / "folded", what)
    result = runner.invoke(cli, ["patch", str(world.onnx), "--adapter", str(adapter), "--out", str(work / "patched"),
                                 "--no-verify", "-q"])
    _assert_refused(result, work / "patched", what)
    result = runner.invoke(cli, ["inspect", str(adapter)])
    _assert_refused(result, None, what)
    with pytest.raises(hm.HypermergeError):
        hm.load_adapter(load_tiny("llama", world.llama), adapter)
    assert tree_digest(work) == before, what  # nothing written, the adapter untouched
    shutil.rmtree(work)


@settings(max_examples=30, **SHARED)
@given(mutation=mutations())
# Found by the slow suite's 200 examples: a PEFT adapter (no recorded shapes) with a tensor cut along
# its base dimension, which inspect used to describe as sound.
@example(mutation=("peft-lora", "reshape", (0, 1)))
def test_mutated_adapter_is_refused_everywhere(world, adapters, tmp_path_factory, mutation):
    check_mutation(world, adapters, tmp_path_factory, *mutation)


@pytest.mark.slow
@settings(max_examples=200, **SHARED)
@given(mutation=mutations())
def test_mutated_adapter_is_refused_everywhere_200(world, adapters, tmp_path_factory, mutation):
    check_mutation(world, adapters, tmp_path_factory, *mutation)


def test_the_unmutated_adapters_are_accepted(world, adapters, tmp_path):
    """The property's control: without a mutation every door lets each adapter in."""
    runner = CliRunner()
    for method, adapter in adapters.items():
        result = runner.invoke(cli, ["fold", "--adapter", str(adapter), "--base", str(world.llama),
                                     "--out", str(tmp_path / method), "-q"])
        assert result.exit_code == 0, (method, result.output)
        assert runner.invoke(cli, ["inspect", str(adapter)]).exit_code == 0
        hm.load_adapter(load_tiny("llama", world.llama), adapter)


def test_the_issues_missing_tensor_is_one_line_from_the_real_cli(adapters, world, tmp_path):
    """The reported case: one layer's ``::hyperadapt.a`` removed gave a KeyError traceback mid-fold."""
    adapter = shutil.copytree(adapters["hyperadapt"], tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight::hyperadapt.a"]
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    done = subprocess.run([sys.executable, "-m", "hypermerge", "fold", "--adapter", str(adapter), "--base",
                           str(world.llama), "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.1.mlp.up_proj.weight lacks hyperadapt parameter(s) a" in lines[0], lines
    assert not (tmp_path / "out").exists()
