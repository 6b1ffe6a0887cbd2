"""Weight-only quantization of causal LMs (``--quantize int4`` / ``int8``): MatMulNBits in place of
every constant-weight MatMul (the tied LM head included), the report's decode section, the keep
decision, and running / serving the kept file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export import quantize as wq
from hypermerge.export.ort import open_session
from hypermerge.export.runtime import decode
from tests.helpers.common import TOKENIZER_FILES, minilm_dir, save_tiny, tiny_config
from tests.helpers.export import FAST

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def tied_llama(path):
    """A tiny Llama whose LM head is its embedding (as SmolLM2's), with MiniLM's tokenizer."""
    config = tiny_config("llama")
    config.vocab_size, config.tie_word_embeddings = 30522, True
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, path / name)
    return path


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    """An int4 export whose model is kept: the bound and the speed test are lifted (a random tiny
    model is neither accurate nor faster quantized; the decision itself is tested below)."""
    root = tmp_path_factory.mktemp("int4")
    source = tied_llama(root / "source")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(wq.WEIGHT_ONLY_BOUNDS, "int4", 0.0)
        patch.setattr(wq.DecodeQuality, "speedup", property(lambda self: 2.0))
        result = hm.export_model(source, root / "onnx", quantize="int4", new_tokens=8, **FAST)
    return source, result


def _ops(path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_every_weight_matmul_becomes_matmulnbits_including_the_tied_head(int4_export):
    _, result = int4_export
    fp32, int4 = _ops(result.out / "model.onnx"), _ops(result.out / "model.int4.onnx")
    # 2 layers × 7 projections + the LM head; the 2 × 2 attention matmuls (activations only) stay
    assert int4["MatMulNBits"] == 15 and int4["MatMul"] == 4 and fp32["MatMul"] == 19
    details = json.loads((result.out / "report.json").read_text())["quantized"]["details"]
    assert details["untied"] == 1 and details["matmuls_quantized"] == 15 and details["matmuls_fp32"] == 4
    assert (details["bits"], details["block_size"], details["accuracy_level"]) == (4, 32, 4)


def test_report_section_and_kept_file(int4_export):
    _, result = int4_export
    report = json.loads((result.out / "report.json").read_text())
    quant = report["quantized"]
    assert quant["kind"] == "weight-only" and quant["scheme"] == "int4" and quant["kept"]
    assert quant["file"] == "model.int4.onnx" and (result.out / "model.int4.onnx").exists()
    assert "model.int4.onnx" in report["files"] and "onnxruntime_int4" in report["latency"]["decode_step"]
    assert 0.0 <= quant["accuracy"]["top1_agreement"] <= 1.0 and quant["accuracy"]["inputs"] == "sentences"
    greedy = quant["greedy"]
    assert greedy["prompts"] >= 3 and len(greedy["lengths"]) == greedy["prompts"] == 3
    assert greedy["new_tokens"] == 32 and all(0 <= n <= 32 for n in greedy["lengths"])
    for batch in ("batch_1", "batch_4"):
        assert set(quant["decode_tokens_per_s"][batch]) == {"fp32", "quantized"}
        assert all(v > 0 for v in quant["decode_tokens_per_s"][batch].values())
    markdown = (result.out / "report.md").read_text()
    assert "## int4 (onnxruntime MatMulNBits weight-only" in markdown and "| batch 4 |" in markdown
    assert report["parity"]["passed"]  # model.onnx is still the fp32 export


def test_the_kept_file_runs_and_greedy_lengths_are_real(int4_export):
    """OnnxModel runs model.int4.onnx; its greedy tokens reproduce the report's agreement lengths."""
    source, result = int4_export
    from hypermerge.export.onnx_export import load_torch_model
    from hypermerge.export.parity import greedy_prompts, torch_greedy

    model = hm.OnnxModel.load(result.out, provider="cpu", model_file="model.int4.onnx")
    assert "MatMulNBits" in _ops(result.out / "model.int4.onnx")
    texts = model.generate(["the weather today", "a"], max_new_tokens=4, stop_at_eos=False)
    assert len(texts) == 2
    ids, mask = greedy_prompts(30522, model.tokenizer)
    reference = torch_greedy(load_torch_model(source, "causal-lm"), ids, mask, 32)
    again = wq.greedy_agreement(model.run, model.contract, ids, mask, reference)
    assert again["lengths"] == json.loads((result.out / "report.json").read_text())["quantized"]["greedy"]["lengths"]


def test_int8_weight_only_stays_close_to_fp32(int4_export, tmp_path):
    """8 bits per weight in blocks of 32: the tiny model's greedy tokens follow the fp32 ONNX model."""
    _, result = int4_export
    details = wq.quantize_weight_only(result.out / "model.onnx", tmp_path / "model.int8.onnx",
                                      wq.WeightOnlyConfig(bits=8, accuracy_level=1))
    assert details["bits"] == 8 and details["matmuls_quantized"] == 15
    fp32 = hm.OnnxModel.load(result.out, provider="cpu")
    int8 = open_session(tmp_path / "model.int8.onnx", "cpu", 1)
    ids = np.random.default_rng(0).integers(0, 30522, (2, 6))
    mask = np.ones_like(ids)
    names = list(fp32.contract.outputs)
    expected = decode(fp32.run, fp32.contract, ids, mask, max_new_tokens=8)
    actual = decode(lambda feeds: int8.run(names, feeds), fp32.contract, ids, mask, max_new_tokens=8)
    assert (actual == expected).mean() >= 0.75


def test_untie_rewrites_only_transposed_constant_weights():
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(4, 3)  # (vocab, hidden), as an embedding
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"]),
         helper.make_node("Gather", ["W", "ids"], ["e"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph)
    assert wq.untie_transposed_weights(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops == ["MatMul", "Gather"]  # the dead Transpose is gone, the embedding keeps W
    new = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(new["W.transposed"], weight.T)
    assert wq.untie_transposed_weights(model) == 0


def _quality(agreement: float, fp32: float, quantized: float) -> wq.DecodeQuality:
    speed = {"new_tokens": 32, "rounds": 3, "batch_1": {"fp32": fp32, "quantized": quantized},
             "batch_4": {"fp32": fp32 * 3, "quantized": quantized * 3}}
    return wq.DecodeQuality("int4", "model.int4.onnx", {"method": "m"}, {"top1_agreement": agreement, "samples": 32,
                            "inputs": "sentences", "positions": 400},
                            {"new_tokens": 32, "prompts": 3, "lengths": [32, 9, 4]}, speed, 0.9)


@pytest.mark.parametrize(("agreement", "quantized", "kept", "why"), [
    (0.95, 100.0, True, "kept beside model.onnx"),
    (0.85, 100.0, False, "top-1 agreement 0.8500 < 0.9"),
    (0.95, 30.0, False, "not faster than fp32 (0.75×)"),
])
def test_keep_decision(agreement, quantized, kept, why):
    quality = _quality(agreement, 40.0, quantized)
    assert quality.decide() is kept and why in quality.reason
    from hypermerge.export.report import weight_only_lines

    text = "\n".join(weight_only_lines(quality.to_dict()))
    assert ("kept as model.int4.onnx" in text) is kept and "9, 4" in text


def test_bad_quantize_options_are_one_line_errors(tmp_path):
    source = save_tiny("bert", tmp_path / "bert")
    for args, fragment in ((["--quantize", "int4"], "int4 is weight-only quantization for decoding causal LMs"),
                           (["--quantize", "int4", "--block-size", "48"], "block_size: 48"),
                           (["--quantize", "fp8"], "quantize: 'fp8'")):
        result = CliRunner().invoke(cli, ["export", str(source), "--out", str(tmp_path / "o"), *args])
        lines = [line for line in result.output.strip().splitlines() if line]
        assert result.exit_code != 0 and len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_serve_loads_the_model_file(int4_export):
    from hypermerge.serve.app import ServeSettings
    from hypermerge.serve.server import load_model

    _, result = int4_export
    served = load_model(result.out, ServeSettings(model_file="model.int4.onnx", threads=1))
    fp32 = load_model(result.out, ServeSettings(threads=1))
    direct = open_session(result.out / "model.int4.onnx", "cpu", 1)
    ids = np.random.default_rng(1).integers(0, 30522, (1, 5))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None],
             **{name: np.zeros((1, 2, 0, 8), np.float32) for name in served.contract.past_names}}
    logits = served.run(feeds)[0]
    np.testing.assert_array_equal(logits, direct.run(["logits"], feeds)[0])
    assert not np.array_equal(logits, fp32.run(feeds)[0])
    with pytest.raises(hm.ExportError, match="model.int2.onnx"):
        load_model(result.out, ServeSettings(model_file="model.int2.onnx"))


def test_verify_rechecks_the_int4_model(int4_export, monkeypatch):
    _, result = int4_export
    monkeypatch.setitem(wq.WEIGHT_ONLY_BOUNDS, "int4", 0.0)  # as in the fixture: a random model's int4
    report = hm.verify_export(result.out, batch=2, seq=8, iters=3, progress=False)
    quant = report["quantized"]
    assert quant["file"] == "model.int4.onnx" and "Re-verified: top1_agreement" in quant["reason"]
    assert "onnxruntime_int4" in report["latency"] and quant["bound"]["min"] == wq.WEIGHT_ONLY_BOUNDS["int4"]


def test_a_patch_drops_the_int4_model_it_would_leave_stale(int4_export, tmp_path):
    """model.int4.onnx holds the base's weights: a patched export must not carry it (nor claim it in
    its report), or `serve --model-file model.int4.onnx` would serve the unpatched model."""
    from tests.helpers.common import TEST_CONFIGS, perturb_adapter

    source, result = int4_export
    model = hm.inject(transformers.AutoModelForCausalLM.from_pretrained(source).eval(), TEST_CONFIGS["lora"]())
    perturb_adapter(model)
    adapter = hm.save_adapter(model, tmp_path / "adapter", base_model=source)
    patched = hm.patch_export(result.out, adapter, tmp_path / "patched", verify=False, progress=False)
    assert not (patched.out / "model.int4.onnx").exists()
    assert any(line.startswith("model.int4.onnx") for line in patched.dropped)
    report = json.loads((patched.out / "report.json").read_text())
    assert "quantized" not in report
    assert "onnxruntime_int4" not in json.dumps(report.get("latency") or {})
