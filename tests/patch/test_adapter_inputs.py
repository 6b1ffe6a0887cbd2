"""``hypermerge export --adapter-inputs``: one graph, HyperAdapt adapters chosen per call. With the
identity scales it is the base export; with an adapter's scales it is that adapter's folded export."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

import hypermerge as hm
from hypermerge.export.adapter_inputs import INPUT_NAME, LAYOUT_FILE, read_layout
from tests.helpers.common import minilm_dir, perturb_adapter
from tests.helpers.patch import (
    assert_matches_torch,
    base_model,
    folded_torch,
    make_adapter,
    sample_feeds,
    save_base,
)

PROMPTS = ["the weather today is", "a"]


@pytest.fixture(scope="module")
def scaled(exported, tmp_path_factory):
    """The tiny Llama (with a tokenizer) exported with adapter inputs, parity on (random scales too)."""
    base, _ = exported["llama"]
    out = tmp_path_factory.mktemp("adapter-inputs") / "onnx"
    result = hm.export_model(base, out, adapter_inputs=True, batch=2, seq=8, iters=2, progress=False)
    return base, out, result


def outputs(model, feeds, **kwargs):
    return model.run({k: v.numpy() for k, v in feeds.items()}, **kwargs)


def test_the_graph_takes_one_packed_input_with_a_default(scaled):
    base, out, result = scaled
    layout = read_layout(out)
    assert layout.input == INPUT_NAME and len(layout.entries) == 14  # 7 linear layers x 2 blocks
    assert layout.size == sum(e.out_features + e.in_features for e in layout.entries)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    # overridable: not a required input, so clients that know nothing of adapters get the base
    assert INPUT_NAME not in [i.name for i in session.get_inputs()]
    assert [i.name for i in session.get_overridable_initializers()] == [INPUT_NAME]
    section = result.report["adapter_inputs"]
    assert section["size"] == layout.size and section["parity_random_scales"]["passed"]
    assert result.report["parity"]["passed"] and result.report["parity"]["greedy_decode_match"]
    assert "onnxruntime_adapter_scales" in result.report["latency"]
    assert (out / LAYOUT_FILE).exists() and "## Adapter inputs" in (out / "report.md").read_text()


def test_identity_scales_are_the_base_export(scaled, exported):
    base, out, _ = scaled
    plain = hm.OnnxModel.load(exported["llama"][1])
    model = hm.OnnxModel.load(out)
    assert model.accepts_adapters and not plain.accepts_adapters
    for feeds, _ in sample_feeds("llama", base_model("llama", base)):
        for a, e in zip(outputs(model, feeds), outputs(plain, feeds), strict=True):
            np.testing.assert_allclose(a, e, rtol=0, atol=1e-6 * max(1.0, float(np.abs(e).max())))
    assert model.generate(PROMPTS, 6, stop_at_eos=False) == plain.generate(PROMPTS, 6, stop_at_eos=False)


@pytest.mark.parametrize("method", ["hyperadapt", "ia3"])
def test_an_adapters_scales_are_its_folded_export(method, scaled, exported, adapters, tmp_path):
    base, out, _ = scaled
    adapter = adapters("llama", method)
    hm.patch_export(exported["llama"][1], adapter, tmp_path / "patched", verify=False, progress=False)
    patched, model = hm.OnnxModel.load(tmp_path / "patched"), hm.OnnxModel.load(out)
    reference = base_model("llama", base)
    for feeds, _ in sample_feeds("llama", reference):
        for a, e in zip(outputs(model, feeds, adapter=adapter), outputs(patched, feeds), strict=True):
            assert float(np.abs(a - e).max() / np.abs(e).max()) <= 1e-5
    assert model.generate(PROMPTS, 8, adapter=adapter, stop_at_eos=False) == patched.generate(PROMPTS, 8,
                                                                                              stop_at_eos=False)
    assert model.generate(PROMPTS, 8, adapter=adapter, stop_at_eos=False) != model.generate(PROMPTS, 8,
                                                                                            stop_at_eos=False)


def test_adapters_are_read_once_and_again_when_resaved(scaled, tmp_path):
    base, out, _ = scaled
    model = hm.OnnxModel.load(out)
    adapter = make_adapter("hyperadapt", "llama", base, tmp_path / "adapter")
    first = model.generate(PROMPTS, 4, adapter=adapter, stop_at_eos=False)
    for _ in range(3):
        assert model.generate(PROMPTS, 4, adapter=str(adapter), stop_at_eos=False) == first
    assert model.adapter_scales.loads == 1
    # re-saved in place with other values: the cache notices (modification times)
    torch_model = base_model("llama", base)
    hm.inject(torch_model, hm.HyperAdaptConfig())
    perturb_adapter(torch_model, seed=5, scale=0.5)
    hm.save_adapter(torch_model, adapter, base_model=base)
    stat = (adapter / "adapter_model.safetensors").stat()
    os.utime(adapter / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    model.generate(PROMPTS, 4, adapter=adapter, stop_at_eos=False)
    assert model.adapter_scales.loads == 2
    np.testing.assert_array_equal(model.adapter_scales.get(None), 1.0)


def test_what_the_inputs_cannot_carry_is_refused(scaled, exported, adapters, tmp_path):
    base, out, _ = scaled
    model = hm.OnnxModel.load(out)
    with pytest.raises(hm.ConfigError, match="lora adapter changes the weights themselves.*hypermerge patch"):
        model.generate(PROMPTS, 2, adapter=adapters("llama", "lora"))
    with pytest.raises(hm.AdapterMismatchError, match="no scales for"):
        model.generate(PROMPTS, 2, adapter=adapters("gpt2", "hyperadapt"))
    twin = make_adapter("hyperadapt", "llama", save_base("llama", tmp_path / "twin", seed=3), tmp_path / "twin-adapter")
    with pytest.raises(hm.AdapterMismatchError, match="differs from the model this export holds"):
        model.generate(PROMPTS, 2, adapter=twin)
    with pytest.raises(hm.ConfigError, match="without --adapter-inputs"):
        hm.OnnxModel.load(exported["llama"][1]).generate(PROMPTS, 2, adapter=adapters("llama", "hyperadapt"))
    with pytest.raises(hm.CheckpointError, match="not found"):
        model.generate(PROMPTS, 2, adapter=tmp_path / "missing")
    with pytest.raises(hm.ConfigError, match="--trt"):
        hm.export_model(base, tmp_path / "x", adapter_inputs=True, trt=True, progress=False)


@pytest.mark.parametrize("method", sorted(set(hm.METHODS) - {"hyperadapt", "ia3"}))
def test_every_method_that_is_not_a_scaling_is_sent_to_patch(method, scaled, adapters):
    """LoRA-family adapters (AdaLoRA, HyperLoRA, HyperAdaLoRA included) change the weights: the scales
    cannot carry them, and the error says what can."""
    _, out, _ = scaled
    with pytest.raises(hm.ConfigError, match=f"{method} adapter changes the weights themselves") as error:
        hm.OnnxModel.load(out).generate(PROMPTS, 2, adapter=adapters("llama", method))
    assert "hypermerge patch" in str(error.value)


def test_layout_json_is_self_describing(scaled):
    _, out, _ = scaled
    data = json.loads((out / LAYOUT_FILE).read_text())
    first = data["matrices"][0]
    assert first["weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert (first["a_offset"], first["b_offset"]) == (0, first["out_features"])
    assert data["forward"] == "y = a * (W @ (b * x)) + bias"


def test_gpt2_conv1d_scaled_layers_equal_the_folded_model(exported, tmp_path):
    """The PyTorch side the graph is traced from, on GPT-2's transposed Conv1D (bias after the
    scaling): an adapter's packed scales give the folded model's outputs."""
    from hypermerge.export.adapter_inputs import ScaleInputs, scales_from_adapter
    from hypermerge.export.onnx_export import call_wrapper, wrap

    base, _ = exported["gpt2"]
    adapter = make_adapter("hyperadapt", "gpt2", base, tmp_path / "adapter")
    model = base_model("gpt2", base)
    scales = ScaleInputs.attach(model)
    assert [(e.out_features, e.in_features) for e in scales.layout.entries[:2]] == [(96, 32), (32, 32)]
    scales.set(scales_from_adapter(scales.layout, adapter))
    reference = folded_torch("gpt2", base, adapter)
    wrapper, contract = wrap(model, "causal-lm")
    for feeds, _ in sample_feeds("gpt2", reference):
        actual = call_wrapper(wrapper, contract, feeds)[0]
        expected = call_wrapper(*wrap(reference, "causal-lm"), feeds)[0]
        assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_adapter_inputs_export_with_an_adapter_equals_its_folded_model(arch, exported, tmp_path):
    base, _ = exported[arch]
    hm.export_model(base, tmp_path / "onnx", adapter_inputs=True, batch=2, seq=8, iters=2, progress=False)
    adapter = make_adapter("hyperadapt", arch, base, tmp_path / "adapter")
    assert_matches_torch(arch, tmp_path / "onnx", folded_torch(arch, base, adapter), adapter=adapter)


@pytest.mark.slow
def test_minilm_embed_with_adapters_equals_their_folded_exports(tmp_path):
    """One MiniLM export serves two HyperAdapt adapters; each equals its own fold + export."""
    base = minilm_dir()
    hm.export_model(base, tmp_path / "scaled", adapter_inputs=True, batch=2, seq=16, iters=3, progress=False)
    model = hm.OnnxModel.load(tmp_path / "scaled")
    plain = hm.export_model(base, tmp_path / "plain", verify=False, progress=False)
    texts = ["A gripping, beautifully acted film.", "The plot never comes together.", "short"]
    np.testing.assert_allclose(model.embed(texts), hm.OnnxModel.load(plain.out).embed(texts), atol=1e-6)
    for seed in (0, 1):
        adapter = make_adapter("hyperadapt", "minilm", base, tmp_path / f"adapter{seed}", seed=seed)
        hm.fold_checkpoint(adapter, tmp_path / f"folded{seed}", progress=False)
        folded = hm.export_model(tmp_path / f"folded{seed}", tmp_path / f"folded{seed}-onnx", verify=False,
                                 progress=False)
        np.testing.assert_allclose(model.embed(texts, adapter=adapter), hm.OnnxModel.load(folded.out).embed(texts),
                                   atol=1e-5)
