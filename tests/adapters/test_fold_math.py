"""Property tests: each method's pure fold equals its layer's forward, for Linear and Conv1D."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import hypermerge as hm
from tests.helpers.common import TEST_CONFIGS


def _base_layer(kind: str, in_features: int, out_features: int, bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    layer = Conv1D(out_features, in_features)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(hm.METHODS)),
    kind=st.sampled_from(["linear", "conv1d"]),
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 3.0),
)
def test_fold_equals_forward(method, kind, in_features, out_features, bias, seed, scale):
    base = _base_layer(kind, in_features, out_features, bias or kind == "conv1d", seed)
    spec = hm.get_method(method)
    layer = spec.create_layer(base, TEST_CONFIGS[method](), "layer.weight").eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in layer.adapter_tensors().values():
            param.add_(scale * torch.randn(param.shape, generator=generator))
        x = torch.randn(3, 5, in_features, generator=generator)
        expected = layer(x)
        weight = layer.folded_weight(spec)  # stored layout
        folded = nn.functional.linear(x, weight.t() if kind == "conv1d" else weight, layer.folded_bias(spec))
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_hyperadapt_fold_is_row_and_column_scaling(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    a, b = torch.randn(rows, generator=generator), torch.randn(cols, generator=generator)
    folded = hm.get_method("hyperadapt").fold(weight, {"a": a, "b": b}, hm.HyperAdaptConfig())
    torch.testing.assert_close(folded, torch.diag(a) @ weight @ torch.diag(b))


def test_lora_fold_matches_definition():
    generator = torch.Generator().manual_seed(0)
    weight, lora_a, lora_b = (torch.randn(6, 5, generator=generator), torch.randn(3, 5, generator=generator),
                              torch.randn(6, 3, generator=generator))
    config = hm.LoRAConfig(r=3, alpha=6)
    folded = hm.get_method("lora").fold(weight, {"lora_A": lora_a, "lora_B": lora_b}, config)
    torch.testing.assert_close(folded, weight + 2.0 * lora_b @ lora_a)
    rs = hm.LoRAConfig(r=4, alpha=6, use_rslora=True)
    assert rs.scaling == 3.0
