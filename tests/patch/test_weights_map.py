"""weights_map.json: built by evidence (contents), recorded at export, and what patch does with
each kind of location: transposed, tied, merged, fused (a block of a larger initializer), scaled."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

import hypermerge as hm
from hypermerge.export.weights_map import WEIGHTS_MAP_FILE, build_weights_map, read_weights_map

LINEARS = {"llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
           "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense"),
           "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
PREFIX = {"llama": "model.layers", "bert": "bert.encoder.layer", "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_every_block_weight_is_located_in_real_exports(arch, exported):
    _, onnx_dir = exported[arch]
    weights_map = read_weights_map(onnx_dir)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_dir / "model.onnx")).graph.initializer}
    for layer in range(2):
        for module in LINEARS[arch]:
            name = f"{PREFIX[arch]}.{layer}.{module}.weight"
            locations = weights_map.locations[name]
            # Linear -> MatMul on a constant-folded transpose; GPT-2's Conv1D (in, out) -> Gemm as stored
            assert [loc.transform for loc in locations] == ["identity" if arch == "gpt2" else "transpose"]
            held = inits[locations[0].initializer]
            assert held.shape == tuple(weights_map.fingerprint[name][0])[:: 1 if arch == "gpt2" else -1]
    report = json.loads((onnx_dir / "report.json").read_text())
    assert report["weights_map"]["file"] == WEIGHTS_MAP_FILE
    assert report["weights_map"]["mapped"] == len(weights_map.locations)
    assert "## Weights map" in (onnx_dir / "report.md").read_text()


def test_tied_merged_and_dropped_tensors(exported):
    gpt2 = read_weights_map(exported["gpt2"][1])
    # tied: wte is the Gather's table as stored and the LM head's MatMul weight transposed
    assert sorted(loc.transform for loc in gpt2.locations["transformer.wte.weight"]) == ["identity", "transpose"]
    # random biases stay in their Gemm
    assert gpt2.locations["transformer.h.0.attn.c_attn.bias"][0].transform == "identity"
    bert = read_weights_map(exported["bert"][1])
    # bert's zero biases: one initializer holds all of them, flagged as located by scope only
    shared = {loc.initializer for name in ("bert.encoder.layer.0.attention.self.query.bias",
                                           "bert.encoder.layer.1.attention.self.key.bias")
              for loc in bert.locations[name]}
    assert len(shared) == 1 and bert.locations["bert.encoder.layer.0.attention.self.query.bias"][0].constant
    assert bert.constants["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert len(bert.holders()[shared.pop()]) > 2


# -- a hand-built graph with what the torch exporter does not produce here -----------------------

def _synthetic(tmp_path):
    """An 'export' whose initializers hold: q, k, v fused into one (in, 3·out) block (what
    onnxruntime's attention fusion makes), s transposed and scaled by 0.5, a tied embedding, a zero
    bias read only by its own module's node, and a weight the graph never uses."""
    rng = np.random.default_rng(0)
    w = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
         {"q.weight": (4, 6), "k.weight": (4, 6), "v.weight": (4, 6), "s.weight": (5, 6), "emb.weight": (10, 6),
          "unused.weight": (3, 3)}.items()}
    w["z.bias"] = np.zeros(12, dtype=np.float32)
    source = tmp_path / "source"
    source.mkdir()
    save_file({k: torch.from_numpy(v) for k, v in w.items()}, str(source / "model.safetensors"))
    (source / "config.json").write_text("{}")
    inits = [numpy_helper.from_array(np.concatenate([w["q.weight"].T, w["k.weight"].T, w["v.weight"].T], 1), "qkv"),
             numpy_helper.from_array(np.float32(0.5) * w["s.weight"].T, "scaled_s"),
             numpy_helper.from_array(w["emb.weight"], "emb"), numpy_helper.from_array(w["emb.weight"].T.copy(), "emb_t"),
             numpy_helper.from_array(w["z.bias"], "zeros12"), numpy_helper.from_array(np.zeros(12, np.float32), "other0"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")]

    def node(op, inputs, output, scope):
        made = helper.make_node(op, inputs, [output])
        made.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", "model", scope]))
        return made

    nodes = [node("Gather", ["emb", "ids"], "x", "model.emb"), node("MatMul", ["x", "qkv"], "h", "model.qkv"),
             node("Add", ["h", "zeros12"], "hz", "model.z"), node("MatMul", ["x", "scaled_s"], "y2", "model.s"),
             node("MatMul", ["x", "emb_t"], "logits", "model.head"), node("Add", ["hz", "other0"], "y1", "model.other")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "logits")],
                              initializer=inits)
    export = tmp_path / "export"
    export.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(export / "model.onnx"))
    return source, export, w


def test_fused_scaled_constant_and_unused_tensors(tmp_path):
    source, export, w = _synthetic(tmp_path)
    weights_map = build_weights_map(export / "model.onnx", source)
    (q,), (k,), (v,) = (weights_map.locations[f"{n}.weight"] for n in "qkv")
    assert (q.initializer, q.transform, q.slice) == ("qkv", "transpose", ((0, 6), (0, 4)))
    assert k.slice == ((0, 6), (4, 8)) and v.slice == ((0, 6), (8, 12))
    (s,) = weights_map.locations["s.weight"]
    assert (s.initializer, s.transform) == ("scaled_s", "transpose") and s.scale == pytest.approx(0.5)
    assert sorted((loc.initializer, loc.transform) for loc in weights_map.locations["emb.weight"]) == [
        ("emb", "identity"), ("emb_t", "transpose")]
    # zeros: two initializers hold them, only one is read by z's own node
    assert [(loc.initializer, loc.constant) for loc in weights_map.locations["z.bias"]] == [("zeros12", True)]
    assert "not used by the exported graph" in weights_map.unmapped["unused.weight"]
    assert weights_map.summary()["unmapped"] == [{"weight": "unused.weight",
                                                  "reason": weights_map.unmapped["unused.weight"]}]


def _lora_adapter(path, base, targets, shapes, seed=0):
    """A hypermerge LoRA checkpoint written by hand (the synthetic base has no model class)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        out_features, in_features = shapes[name]
        tensors[f"{name}::lora.lora_A"] = torch.randn(2, in_features, generator=generator)
        tensors[f"{name}::lora.lora_B"] = torch.randn(out_features, 2, generator=generator)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "format": "hypermerge-adapter", "format_version": 1, "method": "lora", "base_model": str(base),
        "base_fingerprint": {n: [list(shapes[n]), "float32"] for n in targets}, "targets": targets,
        "fan_in_fan_out": [], "config": {"r": 2, "alpha": 2}}))
    return tensors


def test_patch_writes_blocks_scaled_copies_and_every_tied_copy(tmp_path):
    source, export, w = _synthetic(tmp_path)
    from hypermerge.export.weights_map import write_weights_map

    write_weights_map(export, build_weights_map(export / "model.onnx", source))
    targets = ["k.weight", "s.weight", "emb.weight"]
    tensors = _lora_adapter(tmp_path / "adapter", source, targets, {n: w[n].shape for n in targets})
    hm.patch_export(export, tmp_path / "adapter", tmp_path / "out", verify=False, progress=False)
    out = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer}

    def folded(name):
        a, b = tensors[f"{name}::lora.lora_A"], tensors[f"{name}::lora.lora_B"]
        return (b @ a + torch.from_numpy(w[name])).numpy()  # alpha / r = 1

    np.testing.assert_array_equal(out["qkv"][:, 0:4], w["q.weight"].T)  # the other blocks are untouched
    np.testing.assert_array_equal(out["qkv"][:, 4:8], folded("k.weight").T)
    np.testing.assert_array_equal(out["qkv"][:, 8:12], w["v.weight"].T)
    np.testing.assert_allclose(out["scaled_s"], 0.5 * folded("s.weight").T, rtol=1e-6)
    np.testing.assert_array_equal(out["emb"], folded("emb.weight"))
    np.testing.assert_array_equal(out["emb_t"], folded("emb.weight").T)
    np.testing.assert_array_equal(out["zeros12"], 0)


def test_a_dropped_constant_bias_is_fine_while_unchanged_and_refused_once_changed(tmp_path):
    """GPT-2's zero Conv1D biases vanish from the exported Gemm. IA³ scales a bias with its output
    scales: a zero bias stays zero, so the patch needs no location for it; a new value does."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((12, 6)).astype(np.float32)
    source = tmp_path / "source"
    source.mkdir()
    save_file({"z.weight": torch.from_numpy(weight), "z.bias": torch.zeros(12)}, str(source / "model.safetensors"))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "z_t"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight.T.copy(), "z_t")])
    export = tmp_path / "export"
    export.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(export / "model.onnx"))
    from hypermerge.export.weights_map import write_weights_map

    weights_map = build_weights_map(export / "model.onnx", source)
    assert "z.bias" in weights_map.unmapped and weights_map.constants["z.bias"] == 0.0
    write_weights_map(export, weights_map)

    def adapter(path, tensors):
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "format": "hypermerge-adapter", "format_version": 1, "method": "ia3", "base_model": str(source),
            "base_fingerprint": {"z.weight": [[12, 6], "float32"]}, "targets": ["z.weight"], "fan_in_fan_out": [],
            "config": {}}))
        return path

    scale = torch.linspace(0.5, 2.0, 12)
    result = hm.patch_export(export, adapter(tmp_path / "ia3", {"z.weight::ia3.l_out": scale}), tmp_path / "out",
                             verify=False, progress=False)
    assert result.unchanged == ["z.bias"] and result.folded == 1
    (z_t,) = onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer
    np.testing.assert_allclose(numpy_helper.to_array(z_t), (scale.numpy()[:, None] * weight).T, rtol=1e-7)
    # a new bias (trained in full) has nowhere to go: refused by name, with the map's reason
    trained = adapter(tmp_path / "with-bias", {"z.weight::ia3.l_out": scale, "z.bias::full": torch.ones(12)})
    with pytest.raises(hm.ExportError, match="cannot patch z.bias.*values are all equal"):
        hm.patch_export(export, trained, tmp_path / "out2", verify=False, progress=False)
