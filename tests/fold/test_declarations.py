"""Each method's parameter declaration (``AdapterMethod.params``), which plan-time validation
checks checkpoints against, matches what its layers actually save."""

from __future__ import annotations

import pytest
import torch

import hypermerge as hm
from hypermerge.adapters.model import adapter_state
from hypermerge.adapters.validation import layer_problem
from tests.helpers.common import TEST_CONFIGS, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(hm.METHODS))
def test_layers_save_exactly_what_their_method_declares(method, arch):
    spec = hm.get_method(method)
    assert spec.params, f"{method} declares no parameters"
    model = hm.inject(tiny_model(arch), TEST_CONFIGS[method]())
    declared = {p.key for p in spec.params}
    for name, layer in adapter_state(model).layers.items():
        saved = layer.adapter_tensors()
        assert set(saved) <= declared, (name, sorted(saved))
        logical = (layer.out_features, layer.in_features)
        assert layer_problem(spec, layer.config, name, saved, logical) is None


def test_a_wrong_declaration_is_caught():
    """The check above can fail: a layer saving a tensor of another shape than declared."""
    spec = hm.get_method("hyperadapt")
    params = {"a": torch.ones(5), "b": torch.ones(4)}
    assert layer_problem(spec, hm.HyperAdaptConfig(), "w", params, (5, 4)) is None
    assert "dimension should be 3" in layer_problem(spec, hm.HyperAdaptConfig(), "w", params, (5, 3))
    assert "lacks hyperadapt parameter(s) b" in layer_problem(spec, hm.HyperAdaptConfig(), "w", {"a": params["a"]},
                                                               (5, 4))
