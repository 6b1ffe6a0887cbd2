"""The contract every registered adapter method honours, on every architecture family."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.adapters.base import AdapterLayer
from hypermerge.cli import cli
from tests.helpers.common import (
    ARCHITECTURES,
    TEST_CONFIGS,
    load_tiny,
    model_output,
    perturb_adapter,
    relative_error,
    sample_inputs,
    save_tiny,
)

METHODS = sorted(hm.METHODS)


def test_every_registered_method_has_a_test_config():
    assert set(TEST_CONFIGS) == set(hm.METHODS)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_contract(method, arch, bases, tmp_path):
    base = bases[arch]
    inputs = sample_inputs()
    model = load_tiny(arch, base)
    reference = model_output(model, inputs)

    hm.inject(model, TEST_CONFIGS[method]())
    assert any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(model_output(model, inputs), reference, rtol=1e-6, atol=1e-6)

    perturb_adapter(model)
    adapted = model_output(model, inputs)
    assert relative_error(adapted, reference) > 1e-3, "perturbing the adapter must change the output"

    adapter_dir = tmp_path / "adapter"
    hm.save_adapter(model, adapter_dir, base_model=base)

    result = CliRunner().invoke(cli, ["fold", "--adapter", str(adapter_dir), "--out", str(tmp_path / "folded"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    folded = load_tiny(arch, tmp_path / "folded")
    assert relative_error(model_output(folded, inputs), adapted) <= 1e-5

    reloaded = hm.load_adapter(load_tiny(arch, base), adapter_dir)
    torch.testing.assert_close(model_output(reloaded, inputs), adapted, rtol=1e-6, atol=1e-6)

    in_memory = hm.fold_model(model)
    assert not any(isinstance(m, AdapterLayer) for m in in_memory.modules())
    assert all(p.requires_grad for p in in_memory.parameters())
    assert relative_error(model_output(in_memory, inputs), adapted) <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hyperadapt_trains_exactly_n_plus_m_values_per_matrix(arch):
    model = load_tiny_from_memory(arch)
    hm.inject(model, hm.HyperAdaptConfig())
    expected = sum(layer.in_features + layer.out_features for layer in hm.adapter_layers(model).values())
    assert hm.trainable_parameters(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith((".a", ".b")) for n in trainable)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_the_adapter(method):
    model = load_tiny_from_memory("llama")
    hm.inject(model, TEST_CONFIGS[method]())
    perturb_adapter(model)
    model.train()
    loss = model(**sample_inputs()).logits.pow(2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def load_tiny_from_memory(arch):
    from tests.helpers.common import tiny_model

    return tiny_model(arch)
