"""``--quantize fp16`` (``model.fp16.onnx``, the ``ort-cuda-fp16`` profile): the converted graph, the
report's section and the keep decision, and the kept file run, served, re-verified and dropped by a patch.

On this CPU the speed half of the decision goes either way, so each test asserts what the measured
numbers imply, and the causal-LM export forces "faster" to test the kept file (no timing is asserted).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import transformers
from click.testing import CliRunner

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.export import fp16 as half
from hypermerge.export import optimize as opt
from hypermerge.export.ort import open_session
from hypermerge.export.profiles import load_profile
from tests.helpers.common import TEST_CONFIGS, perturb_adapter, save_with_tokenizer
from tests.helpers.export import FAST

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def encoder_fp16(tmp_path_factory):
    """A tiny Bert classifier exported through the CLI with the shipped profile, on the CPU provider."""
    root = tmp_path_factory.mktemp("fp16-bert")
    source = save_with_tokenizer("bert", root / "source")
    result = CliRunner().invoke(cli, ["export", str(source), "--out", str(root / "onnx"), "--profile",
                                      "ort-cuda-fp16", "--provider", "cpu", "--batch", "2", "--seq", "8",
                                      "--iters", "3", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    return source, root / "onnx"


@pytest.fixture(scope="module")
def causal_fp16(tmp_path_factory):
    """A tiny Llama exported with fp16 kept: its measured times stand, but fp16 is taken as faster
    (on a CPU it often is not; the decision itself is tested on hand-made latencies below)."""
    root = tmp_path_factory.mktemp("fp16-llama")
    source = save_with_tokenizer("llama", root / "source")
    measured = half.timed

    def faster(latency, task):
        shape, _, fp32, torch_p50 = measured(latency, task)
        return shape, fp32 / 2, fp32, torch_p50

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(half, "timed", faster)
        result = hm.export_model(source, root / "onnx", quantize="fp16", provider="cpu", threads=1, new_tokens=8,
                                 **FAST)
    return source, result


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_the_profile_says_cuda_and_fp16_and_bad_values_are_named_at_once():
    profile = load_profile("ort-cuda-fp16")
    assert (profile.provider, profile.quantize, profile.trt) == ("cuda", "fp16", False)
    with pytest.raises(hm.ConfigError) as error:
        load_profile("ort-cuda-fp16", {"quantize": "fp8", "provider": "gpu"})
    message = str(error.value)
    assert "quantize: 'fp8' is not one of int8, int4, fp16" in message and "provider: 'gpu'" in message


def test_convert_keeps_the_io_types_and_halves_every_weight(encoder_fp16, tmp_path):
    _, out = encoder_fp16
    details = half.convert_fp16(out / "model.onnx", tmp_path / "model.fp16.onnx")
    graph = onnx.load(str(tmp_path / "model.fp16.onnx")).graph
    assert {t.data_type for t in graph.initializer if t.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
    assert details["initializers_fp16"] > 0 and details["initializers_fp32"] == 0 and details["keep_io_types"]
    fp32, fp16 = open_session(out / "model.onnx", "cpu", 1), open_session(tmp_path / "model.fp16.onnx", "cpu", 1)
    for kind in ("get_inputs", "get_outputs"):
        assert [(v.name, v.type) for v in getattr(fp16, kind)()] == [(v.name, v.type) for v in getattr(fp32, kind)()]


def test_the_encoder_section_is_consistent_with_its_numbers(encoder_fp16):
    """Kept exactly when within int8's bound and faster than fp32; the file, the latency entry and
    the reason follow the decision."""
    _, out = encoder_fp16
    report = _report(out)
    quant = report["quantized"]
    metric, bound = opt.INT8_BOUNDS["sequence-classification"]
    assert quant["kind"] == "fp16" and quant["file"] == "model.fp16.onnx" and quant["timed"] == "forward"
    assert quant["bound"] == {"metric": metric, "min": bound} and quant["accuracy"]["inputs"] == "sentences"
    assert quant["backend"] == "onnxruntime:CPUExecutionProvider" and "greedy" not in quant
    assert quant["details"]["initializers_fp16"] > 0 and quant["details"]["initializers_fp32"] == 0  # it was written
    assert quant["parity"]["tolerance"] == {"atol": 2e-2, "rtol": 2e-2} and quant["parity"]["max_abs_err"] > 0
    assert quant["fp32_p50_ms"] == report["latency"]["onnxruntime"]["p50_ms"]
    within, faster = quant["accuracy"][metric] >= bound, quant["p50_ms"] < quant["fp32_p50_ms"]
    assert quant["kept"] == (within and faster)
    assert (out / "model.fp16.onnx").exists() == quant["kept"] == ("onnxruntime_fp16" in report["latency"])
    assert ("kept beside model.onnx" in quant["reason"]) == quant["kept"]
    assert ("not faster than fp32 on onnxruntime:CPUExecutionProvider" in quant["reason"]) == (not faster)
    assert (f"{metric} {quant['accuracy'][metric]:.4f} < {bound}" in quant["reason"]) == (not within)
    assert report["profile"]["name"] == "ort-cuda-fp16" and report["profile"]["provider"] == "cpu"
    assert "## fp16 (onnxruntime float16 converter" in (out / "report.md").read_text()


def _identity_model(path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                            "g", [x], [y])), str(path))


def _latency(forward: tuple[float, float], step: tuple[float, float]) -> dict:
    def timings(fp32: float, fp16: float) -> dict:
        return {**{name: {"p50_ms": p50, "p90_ms": p50, "p99_ms": p50, "mean_ms": p50, "runs": 3}
                   for name, p50 in (("torch", 4.0), ("onnxruntime", fp32), ("onnxruntime_fp16", fp16))},
                "ratio": {"onnxruntime": fp32 / 4.0, "onnxruntime_fp16": fp16 / 4.0}}

    return {"batch": 1, "seq": 8, "threads": 1, "iterations": 3, **timings(*forward), "decode_step": timings(*step)}


@pytest.mark.parametrize(("agreement", "step", "kept", "why"), [
    (1.0, (2.0, 1.0), True, "Within the bound and 0.50× fp32's time: kept beside model.onnx"),
    (0.95, (2.0, 1.0), False, "Not kept (top1_agreement 0.9500 < 0.99)"),
    (1.0, (1.0, 2.0), False, "Not kept (not faster than fp32 on onnxruntime:CPUExecutionProvider (2.00× its time; "
                             "a CPU has no fast fp16 matmul"),
])
def test_decide_on_hand_made_latencies(tmp_path, agreement, step, kept, why):
    """A causal LM is timed on its decode step: the forward (fp16 always slower here) must not decide."""
    _identity_model(tmp_path / "model.fp16.onnx")
    quality = half.Fp16Quality("causal-lm", "model.fp16.onnx", {"method": "m"}, "onnxruntime:CPUExecutionProvider",
                               {"top1_agreement": agreement, "samples": 32, "inputs": "sentences", "positions": 9},
                               {"max_abs_err": 1e-3, "passed": True}, {"new_tokens": 32, "lengths": [32, 5, 1]})
    latency = _latency((1.0, 3.0), step)
    section = half.decide_fp16(tmp_path, quality, latency)
    assert section["kept"] is kept and why in section["reason"], section["reason"]
    assert section["timed"] == "decode_step" and section["p50_ms"] == step[1] and section["ratio_to_torch"] == step[1] / 4
    assert (tmp_path / "model.fp16.onnx").exists() is kept
    assert ("onnxruntime_fp16" in latency) is kept and ("onnxruntime_fp16" in latency["decode_step"]) is kept
    from hypermerge.export.report import fp16_lines

    text = "\n".join(fp16_lines(section))
    assert ("kept as model.fp16.onnx" in text) is kept and "one decode step p50" in text and "32, 5, 1" in text


def test_the_causal_lm_section_and_kept_file(causal_fp16):
    _, result = causal_fp16
    report = _report(result.out)
    quant = report["quantized"]
    assert quant["kind"] == "fp16" and quant["kept"] and quant["timed"] == "decode_step"
    assert (result.out / "model.fp16.onnx").exists() and "model.fp16.onnx" in report["files"]
    assert "onnxruntime_fp16" in report["latency"]["decode_step"]
    assert quant["fp32_p50_ms"] == report["latency"]["decode_step"]["onnxruntime"]["p50_ms"]
    assert quant["greedy"]["prompts"] == 3 and quant["greedy"]["new_tokens"] == 32
    assert 0.0 <= quant["accuracy"]["top1_agreement"] <= 1.0 and quant["accuracy"]["positions"] > 0
    assert report["parity"]["passed"]  # model.onnx is still the fp32 export


def test_the_kept_file_runs_and_decodes_as_fp32_does(causal_fp16):
    """OnnxModel runs model.fp16.onnx: a different graph (its logits are not fp32's bit for bit), the
    same greedy text on the tiny model, and the greedy lengths the report quotes."""
    source, result = causal_fp16
    from hypermerge.export import quantize as wq
    from hypermerge.export.onnx_export import load_torch_model

    fp16 = hm.OnnxModel.load(result.out, provider="cpu", threads=1, model_file="model.fp16.onnx")
    fp32 = hm.OnnxModel.load(result.out, provider="cpu", threads=1)
    prompts = ["the weather today", "a"]
    assert fp16.generate(prompts, max_new_tokens=8, stop_at_eos=False) == fp32.generate(
        prompts, max_new_tokens=8, stop_at_eos=False)
    ids = np.random.default_rng(1).integers(0, 30522, (1, 5))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None],
             **{name: np.zeros((1, 2, 0, 8), np.float32) for name in fp32.contract.past_names}}
    logits16, logits32 = fp16.run(feeds)[0], fp32.run(feeds)[0]
    assert logits16.dtype == np.float32 and not np.array_equal(logits16, logits32)
    np.testing.assert_allclose(logits16, logits32, atol=2e-2)
    again = wq.greedy_against_torch(fp16.run, load_torch_model(source, "causal-lm"), fp16.contract, 30522,
                                    fp16.tokenizer, 32)
    assert again["lengths"] == _report(result.out)["quantized"]["greedy"]["lengths"]


def test_serve_takes_the_fp16_model_file(causal_fp16):
    from hypermerge.serve.app import ServeSettings
    from hypermerge.serve.server import load_model

    _, result = causal_fp16
    served = load_model(result.out, ServeSettings(model_file="model.fp16.onnx", provider="cpu", threads=1))
    direct = open_session(result.out / "model.fp16.onnx", "cpu", 1)
    ids = np.random.default_rng(2).integers(0, 30522, (1, 4))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None],
             **{name: np.zeros((1, 2, 0, 8), np.float32) for name in served.contract.past_names}}
    np.testing.assert_array_equal(served.run(feeds)[0], direct.run(["logits"], feeds)[0])


def test_verify_rechecks_the_fp16_model(causal_fp16, tmp_path):
    import shutil

    _, result = causal_fp16
    copy = shutil.copytree(result.out, tmp_path / "copy")  # the other tests read the export's report
    report = hm.verify_export(copy, batch=2, seq=8, iters=3, threads=1, progress=False)
    quant = report["quantized"]
    assert quant["kind"] == "fp16" and "Re-verified: top1_agreement" in quant["reason"]
    assert "onnxruntime_fp16" in report["latency"]["decode_step"]
    assert quant["p50_ms"] == report["latency"]["decode_step"]["onnxruntime_fp16"]["p50_ms"]


def test_a_patch_drops_the_fp16_model_it_would_leave_stale(causal_fp16, tmp_path):
    """model.fp16.onnx holds the base's weights: a patched export must not carry it, nor its section
    and latency entry, or `serve --model-file model.fp16.onnx` would serve the unpatched model."""
    source, result = causal_fp16
    model = hm.inject(transformers.AutoModelForCausalLM.from_pretrained(source).eval(), TEST_CONFIGS["lora"]())
    perturb_adapter(model)
    adapter = hm.save_adapter(model, tmp_path / "adapter", base_model=source)
    patched = hm.patch_export(result.out, adapter, tmp_path / "patched", verify=False, progress=False)
    assert not (patched.out / "model.fp16.onnx").exists() and (patched.out / "model.onnx").exists()
    assert any(line.startswith("model.fp16.onnx") for line in patched.dropped)
    report = _report(patched.out)
    assert "quantized" not in report and "onnxruntime_fp16" not in json.dumps(report.get("latency") or {})
