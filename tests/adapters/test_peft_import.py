"""PEFT adapters made by PEFT itself fold to what PEFT's own merge_and_unload computes (fp32).

Where the per-layer scale is the config's (LoRA, rsLoRA, DoRA, IA³), the result is bit for bit
PEFT's; where a per-layer scale had to be folded into lora_B (rank/alpha patterns, AdaLoRA's
alpha / (init_r + 1e-5)) it differs by float32 rounding of the update (a few 1e-9 here).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import hypermerge as hm
from hypermerge.cli import cli
from tests.helpers.common import load_tiny, model_output, sample_inputs, tiny_model

EXACT = dict(rtol=0, atol=0)
ROUNDING = dict(rtol=2e-6, atol=2e-7)


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def _save_peft(arch: str, config, path, *, seed: int = 0, train=None):
    model = peft.get_peft_model(tiny_model(arch, seed), config)
    _perturb(model, seed)
    if train is not None:
        train(model)
    model.save_pretrained(path)
    return path


def _peft_merged(arch: str, base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own answer: load base, PeftModel.from_pretrained, merge_and_unload (float32)."""
    model = peft.PeftModel.from_pretrained(load_tiny(arch, base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _fold_and_compare(arch, base, adapter, out, tolerance, exact_names=None):
    hm.fold_checkpoint(adapter, out, base=base, progress=False)
    folded = load_file(str(out / "model.safetensors"))
    assert set(folded) == set(load_file(str(base / "model.safetensors")))
    reference = _peft_merged(arch, base, adapter)
    changed = 0
    for name, tensor in folded.items():
        tol = EXACT if exact_names is not None and name in exact_names else tolerance
        torch.testing.assert_close(tensor, reference[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
        changed += not torch.equal(tensor, load_file(str(base / "model.safetensors"))[name])
    assert changed > 0
    return folded


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-bases")
    paths = {}
    for arch in ("llama", "gpt2", "bert"):
        model = tiny_model(arch)
        with torch.no_grad():  # random biases, so that IA³'s bias scaling shows
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(generator=torch.Generator().manual_seed(len(name)))
        model.save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def test_lora_with_rank_and_alpha_patterns(bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 3})
    adapter = _save_peft("llama", config, tmp_path / "adapter")
    checkpoint = hm.read_adapter(adapter)
    assert checkpoint.method.name == "lora" and len(checkpoint.targets) == 6
    assert checkpoint.layer_params("model.layers.1.self_attn.v_proj.weight")["lora_A"].shape == (2, 32)
    # Layers at the config's scale (q_proj of layer 1, down_proj) are PEFT's bits exactly.
    exact = {"model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.1.mlp.down_proj.weight"}
    _fold_and_compare("llama", bases["llama"], adapter, tmp_path / "out", ROUNDING, exact_names=exact)


def test_lora_rslora_all_linear_is_bit_exact(bases, tmp_path):
    config = peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear")
    adapter = _save_peft("llama", config, tmp_path / "adapter", seed=1)
    assert len(hm.read_adapter(adapter).targets) == 14  # PEFT saves "all-linear" resolved to names
    _fold_and_compare("llama", bases["llama"], adapter, tmp_path / "out", EXACT)


def test_gpt2_fan_in_fan_out_lora_is_bit_exact(bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = _save_peft("gpt2", config, tmp_path / "adapter", seed=2)
    assert hm.read_adapter(adapter).fan_in_fan_out
    _fold_and_compare("gpt2", bases["gpt2"], adapter, tmp_path / "out", EXACT)


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "up_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_is_bit_exact(arch, targets, bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets,
                             fan_in_fan_out=arch == "gpt2")
    adapter = _save_peft(arch, config, tmp_path / "adapter", seed=3)
    assert hm.read_adapter(adapter).method.name == "dora"
    _fold_and_compare(arch, bases[arch], adapter, tmp_path / "out", EXACT)


def _adalora_training(model) -> None:
    """A few real steps with PEFT's rank allocator, so some ranks are pruned."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = sample_inputs()
    for step in range(10):
        loss = model(**inputs).logits.pow(2).mean() + 0.01 * model(**inputs).logits.mean()
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_adalora_after_rank_allocation(bases, tmp_path):
    config = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=1, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = _save_peft("llama", config, tmp_path / "adapter", seed=4, train=_adalora_training)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["rank_pattern"], "PEFT's allocator should have recorded a rank pattern"
    assert any(not all(mask) for mask in saved["rank_pattern"].values()), "some ranks should be pruned"
    checkpoint = hm.read_adapter(adapter)
    ranks = checkpoint.rank_pattern
    assert ranks and sum(ranks.values()) < 6 * len(ranks)
    for target in checkpoint.targets:
        assert checkpoint.layer_params(target)["lora_A"].shape[0] == ranks[target]
    _fold_and_compare("llama", bases["llama"], adapter, tmp_path / "out", ROUNDING)
    summary = json.loads(CliRunner().invoke(cli, ["inspect", str(adapter), "--json"]).output)
    assert summary["rank_pattern"] == ranks and summary["method"] == "lora"


@pytest.mark.parametrize("arch,targets,feedforward", [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # Conv1D, and biases scaled on c_attn
    ("bert", ["key", "value", "output.dense"], ["output.dense"]),
])
def test_ia3_is_bit_exact(arch, targets, feedforward, bases, tmp_path):
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward,
                            fan_in_fan_out=arch == "gpt2")
    adapter = _save_peft(arch, config, tmp_path / "adapter", seed=5)
    checkpoint = hm.read_adapter(adapter)
    keys = {key.rsplit(".", 1)[1] for key in checkpoint.tensors()}
    assert keys == {"l_in", "l_out"}
    folded = _fold_and_compare(arch, bases[arch], adapter, tmp_path / "out", EXACT)
    if arch == "gpt2":
        base = load_file(str(bases[arch] / "model.safetensors"))
        assert not torch.equal(folded["transformer.h.0.attn.c_attn.bias"], base["transformer.h.0.attn.c_attn.bias"])


def test_bert_classifier_modules_to_save_and_trained_biases(bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")
    adapter = _save_peft("bert", config, tmp_path / "adapter", seed=6)
    checkpoint = hm.read_adapter(adapter)
    assert "classifier.weight" in checkpoint.full_tensors()
    _fold_and_compare("bert", bases["bert"], adapter, tmp_path / "out", EXACT)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_load_adapter_on_peft_dir_matches_peft_forward(kind, bases, tmp_path):
    configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]),
        "ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    adapter = _save_peft("llama", configs[kind], tmp_path / "adapter", seed=7)
    inputs = sample_inputs()
    expected = model_output(peft.PeftModel.from_pretrained(load_tiny("llama", bases["llama"]), adapter), inputs)
    ours = hm.load_adapter(load_tiny("llama", bases["llama"]), adapter)
    torch.testing.assert_close(model_output(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    folded = hm.fold_model(ours)
    torch.testing.assert_close(model_output(folded, inputs), expected, rtol=1e-4, atol=1e-4)


def test_cli_fold_and_inspect_accept_peft_dirs(bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    adapter = _save_peft("llama", config, tmp_path / "adapter", seed=8)
    # A local base_model_name_or_path is used as the base, like hypermerge's recorded base_model.
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = str(bases["llama"])
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    runner = CliRunner()
    result = runner.invoke(cli, ["fold", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "-q",
                                 "--verify"])
    assert result.exit_code == 0, result.output
    assert "folded 2 weights (lora)" in result.output and "verified" in result.output
    provenance = json.loads((tmp_path / "out" / "hypermerge_fold.json").read_text())
    assert provenance["adapter_format"] == "peft" and provenance["verify"]["passed"]
    result = runner.invoke(cli, ["inspect", str(adapter), "--base", str(bases["llama"]), "--json"])
    summary = json.loads(result.output)
    assert summary["method"] == "lora" and summary["targets"] == 2
    assert summary["trainable_parameters"] == 2 * (4 * 32 + 32 * 4)
