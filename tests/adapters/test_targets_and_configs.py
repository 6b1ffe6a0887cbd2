from __future__ import annotations

import pytest

import hypermerge as hm
from hypermerge.adapters.targets import match_suffix, select_targets
from tests.helpers.common import tiny_model


def test_default_targets_skip_lm_head_and_embeddings():
    model = tiny_model("llama")
    names = [n for n, _ in select_targets(model, None)]
    assert "lm_head" not in names
    assert all(n.startswith("model.layers.") for n in names)
    assert len(names) == 2 * 7


def test_default_targets_skip_classifier_and_pooler():
    names = [n for n, _ in select_targets(tiny_model("bert"), None)]
    assert not any("classifier" in n or "pooler" in n for n in names)


def test_suffix_and_regex_targets():
    model = tiny_model("llama")
    suffix = [n for n, _ in select_targets(model, ["q_proj", "v_proj"])]
    assert len(suffix) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in suffix)
    regex = [n for n, _ in select_targets(model, r".*\.0\.mlp\..*")]
    assert regex == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_nothing_matches_is_a_clear_error():
    with pytest.raises(hm.ConfigError, match="matched no linear layer.*q_proj"):
        select_targets(tiny_model("llama"), ["query"])


def test_inject_twice_is_refused():
    model = hm.inject(tiny_model("gpt2"), hm.HyperAdaptConfig())
    with pytest.raises(hm.ConfigError, match="already has"):
        hm.inject(model, hm.LoRAConfig())


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": -1}, "alpha must be positive"),
    ({"dropout": 1.5}, "dropout"),
    ({"target_modules": "(["}, "not a valid regex"),
])
def test_bad_lora_configs(kwargs, message):
    with pytest.raises(hm.ConfigError, match=message):
        hm.LoRAConfig(**kwargs)


def test_all_config_problems_are_reported_at_once():
    with pytest.raises(hm.ConfigError) as info:
        hm.LoRAConfig(r=0, alpha=0)
    assert "r must" in str(info.value) and "alpha must" in str(info.value)


def test_unknown_config_keys_name_the_valid_ones():
    with pytest.raises(hm.ConfigError, match="unknown lora option.*rank.*valid options are.*alpha"):
        hm.LoRAConfig.from_dict({"rank": 8})


def test_match_suffix_handles_base_model_prefix():
    names = ["encoder.layer.0.attention.self.query.weight", "pooler.dense.weight"]
    assert match_suffix("bert.encoder.layer.0.attention.self.query.weight", names) == names[0]
    assert match_suffix("missing.weight", names) is None


def test_modules_to_save_are_trained_and_saved(tmp_path):
    from tests.helpers.common import model_output, perturb_adapter, sample_inputs, save_tiny

    base = save_tiny("bert", tmp_path / "base")
    from tests.helpers.common import load_tiny

    model = load_tiny("bert", base)
    hm.inject(model, hm.HyperAdaptConfig(modules_to_save=["classifier"]))
    assert model.classifier.weight.requires_grad
    perturb_adapter(model)
    expected = model_output(model, sample_inputs())
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    reloaded = hm.load_adapter(load_tiny("bert", base), tmp_path / "adapter")
    assert float((model_output(reloaded, sample_inputs()) - expected).abs().max()) < 1e-6
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    folded = load_tiny("bert", tmp_path / "folded")
    assert float((model_output(folded, sample_inputs()) - expected).abs().max()) < 1e-5


def test_new_head_on_a_headless_base_folds_into_a_loadable_task_model(tmp_path):
    import transformers

    from tests.helpers.common import model_output, perturb_adapter, sample_inputs, tiny_config

    config = tiny_config("bert")
    transformers.BertModel(config).save_pretrained(tmp_path / "base")  # no classifier weights
    model = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=2, id2label={0: "negative", 1: "positive"}).eval()
    hm.inject(model, hm.LoRAConfig(r=2, modules_to_save=["classifier"]))
    perturb_adapter(model)
    expected = model_output(model, sample_inputs())
    hm.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    folded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "folded").eval()
    assert folded.config.id2label == {0: "negative", 1: "positive"}
    assert float((model_output(folded, sample_inputs()) - expected).abs().max()) < 1e-5
