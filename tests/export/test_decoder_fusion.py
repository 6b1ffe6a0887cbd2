"""``--optimize`` on Llama-family causal LMs: every RMSNorm becomes onnxruntime's
(Skip)SimplifiedLayerNormalization and every attention GroupQueryAttention (rotary as
RotaryEmbedding), parity and greedy decode with left padding still match PyTorch, and
``--quantize int4`` quantizes the fused graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import hypermerge as hm
from hypermerge.export import optimize
from hypermerge.export import quantize as wq
from hypermerge.export.onnx_export import load_torch_model
from hypermerge.export.parity import torch_greedy
from hypermerge.export.runtime import decode
from tests.helpers.common import save_tiny
from tests.helpers.export import FAST

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
LAYERS = 2  # tiny_config's


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fused(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fused-{request.param}")
    source = save_tiny(request.param, root / "source")
    return source, hm.export_model(source, root / "onnx", optimize=True, **FAST)


def test_llama_family_uses_the_rmsnorm_fusions():
    assert optimize.fusion_family({"model_type": "llama"}) == "qwen3"
    assert optimize.fusion_family({"model_type": "qwen2"}) == "qwen3"
    assert optimize.fusion_family({"model_type": "gpt2"}) == "gpt2"
    assert optimize.fusion_family({"model_type": "bert"}) == "bert"


def test_every_rmsnorm_is_fused_and_parity_holds(fused):
    _, result = fused
    section = json.loads((result.out / "report.json").read_text())["optimize"]
    assert section["model_type"] == "qwen3" and section["parity"]["passed"]
    # two norms per layer (input, post-attention) and the final one; all but the first take the
    # residual Add with them
    assert section["fused_ops"].get("SkipSimplifiedLayerNormalization", 0) + section["fused_ops"].get(
        "SimplifiedLayerNormalization", 0) == 2 * LAYERS + 1
    ops = _ops(result.out / "model.onnx")
    assert ops.get("SkipSimplifiedLayerNormalization", 0) + ops.get("SimplifiedLayerNormalization", 0) == 2 * LAYERS + 1
    assert "Pow" not in ops and "ReduceMean" not in ops


def test_every_attention_is_one_group_query_attention(fused):
    _, result = fused
    section = json.loads((result.out / "report.json").read_text())["optimize"]
    assert section["fused_ops"]["GroupQueryAttention"] == LAYERS
    ops = _ops(result.out / "model.onnx")
    assert ops["GroupQueryAttention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS
    # what the kernels do in one launch each: rotate_half, softmax, the attention matmuls
    assert "Neg" not in ops and "Softmax" not in ops and ops["MatMul"] == 7 * LAYERS + 1
    model = hm.OnnxModel.load(result.out, provider="cpu")  # the contract the runtime reads is unchanged
    assert tuple(model.contract.past_names[:2]) == ("past_key_0", "past_value_0")


def test_an_unknown_graph_is_left_alone():
    from onnx import TensorProto, helper

    from hypermerge.export.decoder_fusion import fuse_attention

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "num_hidden_layers": 2}
    assert fuse_attention(model, config) == 0 and [n.op_type for n in model.graph.node] == ["Relu"]


def test_fused_greedy_decode_equals_pytorch_with_left_padding(fused):
    source, result = fused
    model = hm.OnnxModel.load(result.out, provider="cpu")
    for batch in (1, 4):
        _greedy_matches(source, model, batch)


def _greedy_matches(source, model, batch: int) -> None:
    ids = np.random.default_rng(5).integers(0, 128, (batch, 7))
    mask = np.ones_like(ids)
    mask[1:2, :3] = 0
    mask[2:3, :5] = 0
    expected = torch_greedy(load_torch_model(source, "causal-lm"), ids, mask, 16)
    np.testing.assert_array_equal(decode(model.run, model.contract, ids, mask, max_new_tokens=16), expected)


def test_int4_quantizes_the_fused_graph(tmp_path):
    source = save_tiny("llama", tmp_path / "source")
    with pytest.MonkeyPatch.context() as patch:  # a random tiny model is neither accurate nor faster in int4
        patch.setitem(wq.WEIGHT_ONLY_BOUNDS, "int4", 0.0)
        patch.setattr(wq.DecodeQuality, "speedup", property(lambda self: 2.0))
        result = hm.export_model(source, tmp_path / "onnx", optimize=True, quantize="int4", new_tokens=8, **FAST)
    ops = _ops(result.out / "model.int4.onnx")
    assert ops["MatMulNBits"] == 7 * LAYERS + 1 and ops["SkipSimplifiedLayerNormalization"] >= 2 * LAYERS
    model = hm.OnnxModel.load(result.out, provider="cpu", model_file="model.int4.onnx")
    ids = np.random.default_rng(0).integers(0, 128, (2, 5))
    tokens = decode(model.run, model.contract, ids, np.ones_like(ids), max_new_tokens=6)
    assert tokens.shape == (2, 6)
