"""Property tests (hypothesis) over random shapes, dtypes and adapter values:

1. each registered method's fold equals its layer's forward, within the rounding of one cast of
   the folded weight to the stored dtype (float32, bfloat16, float16; Linear and GPT-2 Conv1D);
2. the streaming fold of a saved adapter equals the in-memory fold bit for bit, in every dtype;
3. patching an export equals folding then exporting, initializer for initializer.

(tests/adapters/test_fold_math.py covers float32 only; tests/fold/test_streaming.py one seed in
float32; tests/patch/test_patch.py fixed cases.)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import hypermerge as hm
from tests.helpers.common import TEST_CONFIGS, load_tiny, perturb_adapter, save_tiny

METHODS = sorted(hm.METHODS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARED = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _base_layer(kind: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                generator: torch.Generator) -> nn.Module:
    if kind == "linear":
        layer = nn.Linear(in_features, out_features, bias=bias)
    else:
        layer = Conv1D(out_features, in_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    # weights representable in the stored dtype, the layer itself computing in float32
    return layer.to(dtype).float()


@settings(max_examples=60, **SHARED)
@given(method=st.sampled_from(METHODS), kind=st.sampled_from(["linear", "conv1d"]),
       dtype=st.sampled_from(sorted(DTYPES)), in_features=st.integers(1, 40), out_features=st.integers(1, 40),
       bias=st.booleans(), seed=st.integers(0, 2**20), scale=st.floats(0.0, 2.0),
       x_scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_fold_equals_forward_in_every_dtype(method, kind, dtype, in_features, out_features, bias, seed, scale,
                                            x_scale):
    generator = torch.Generator().manual_seed(seed)
    base = _base_layer(kind, in_features, out_features, bias or kind == "conv1d", DTYPES[dtype], generator)
    spec = hm.get_method(method)
    layer = spec.create_layer(base, TEST_CONFIGS[method](), "layer.weight").eval()
    with torch.no_grad():
        for param in layer.adapter_tensors().values():
            param.add_(scale * torch.randn(param.shape, generator=generator))
        x = x_scale * torch.randn(2, 3, in_features, generator=generator)
        expected = layer(x)
        exact = layer.folded_weight(spec)  # float32 fold, stored layout
        stored = exact.to(DTYPES[dtype]).float()  # the one cast the fold engine makes
        as_linear = (lambda w: w.t()) if kind == "conv1d" else (lambda w: w)
        bias_value = layer.folded_bias(spec)
        folded = nn.functional.linear(x, as_linear(stored), bias_value)
        # float32 matmul noise, plus the cast: each folded weight moves by at most eps/2 of itself
        eps = torch.finfo(DTYPES[dtype]).eps
        bound = (eps / 2 + 1e-5) * (x.abs() @ as_linear(exact).abs().t()) + 1e-5 * (1 + expected.abs())
    assert torch.all((folded - expected).abs() <= bound), float(((folded - expected).abs() - bound).max())


def save_tiny_in(arch: str, path, dtype: torch.dtype):
    from tests.helpers.common import tiny_model

    tiny_model(arch).to(dtype).save_pretrained(path)
    return path


@settings(max_examples=12, **SHARED)
@given(method=st.sampled_from(METHODS), arch=st.sampled_from(["llama", "gpt2", "bert"]),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16), scale=st.floats(0.05, 1.0))
def test_streaming_fold_equals_in_memory_fold(method, arch, dtype, seed, scale, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    base = save_tiny_in(arch, tmp / "base", DTYPES[dtype])
    model = hm.inject(load_tiny(arch, base).to(DTYPES[dtype]), TEST_CONFIGS[method]())
    perturb_adapter(model, seed=seed, scale=scale)
    hm.save_adapter(model, tmp / "adapter", base_model=base)
    hm.fold_checkpoint(tmp / "adapter", tmp / "out", progress=False)
    streamed = load_file(str(tmp / "out" / "model.safetensors"))
    in_memory = hm.fold_model(model).state_dict()
    for name, tensor in streamed.items():
        assert tensor.dtype == DTYPES[dtype], name
        assert torch.equal(tensor, in_memory[name].to(tensor.dtype)), name


def _initializers(directory) -> dict[str, np.ndarray]:
    model = onnx.load(str(directory / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def exports(world, tmp_path_factory):
    """arch -> (base, export), exported on first use (the world's Llama export is reused)."""
    root = tmp_path_factory.mktemp("property-exports")
    cache = {"llama": (world.llama, world.onnx)}

    def get(arch: str):
        if arch not in cache:
            base = save_tiny(arch, root / arch)
            hm.export_model(base, root / f"{arch}-onnx", verify=False, progress=False)
            cache[arch] = (base, root / f"{arch}-onnx")
        return cache[arch]

    return get


PATCH_CASES = dict(arch=st.sampled_from(["llama", "gpt2"]), method=st.sampled_from(METHODS), seed=st.integers(0, 2**16))


@settings(max_examples=3, **SHARED)
@given(**PATCH_CASES)
def test_patch_equals_fold_then_export(arch, method, seed, exports, tmp_path_factory):
    check_patch_equals_fold_then_export(arch, method, seed, exports, tmp_path_factory)


@pytest.mark.slow
@settings(max_examples=15, **SHARED)
@given(**PATCH_CASES)
def test_patch_equals_fold_then_export_more_examples(arch, method, seed, exports, tmp_path_factory):
    check_patch_equals_fold_then_export(arch, method, seed, exports, tmp_path_factory)


def check_patch_equals_fold_then_export(arch, method, seed, exports, tmp_path_factory):
    base, onnx_dir = exports(arch)
    tmp = tmp_path_factory.mktemp("patch")
    model = hm.inject(load_tiny(arch, base), TEST_CONFIGS[method]())
    perturb_adapter(model, seed=seed)
    hm.save_adapter(model, tmp / "adapter", base_model=base)
    hm.patch_export(onnx_dir, tmp / "adapter", tmp / "patched", verify=False, progress=False)
    hm.fold_checkpoint(tmp / "adapter", tmp / "folded", progress=False)
    hm.export_model(tmp / "folded", tmp / "folded-onnx", verify=False, progress=False)
    ours, reference = _initializers(tmp / "patched"), _initializers(tmp / "folded-onnx")
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
