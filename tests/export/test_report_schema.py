"""report.json's sections as typed objects: ``to_dict`` gives the keys in the documented order,
optional keys only when set, and ``from_dict`` reads a section back."""

from __future__ import annotations

import json

from hypermerge.export.report import (
    ExportHeader,
    Int8Section,
    LatencySection,
    ParitySection,
    PatchSection,
    ShapeTimings,
    TensorRTSection,
    Timing,
    WeightOnlySection,
    WeightsMapSection,
)
from hypermerge.export.verification import drop_backend


def test_the_export_header_keeps_the_documented_key_order():
    header = ExportHeader("0.1.0", "2026-12-02T00:00:00+00:00", {"path": "/m", "weights_sha256": "ab"}, "causal-lm",
                          18, "torch.onnx.export(dynamo=True), torch 2", False, [], [])
    assert list(header.to_dict()) == ["format", "format_version", "hypermerge", "created_at", "source", "task",
                                      "opset", "dtype", "exporter", "model_file", "external_data", "inputs",
                                      "outputs", "parity", "latency"]
    assert header.to_dict()["format"] == "hypermerge-export-report" and header.to_dict()["model_file"] == "model.onnx"
    header.profile = {"name": "cpu"}
    assert list(header.to_dict())[-1] == "profile"


def test_optional_keys_appear_only_when_set_and_sections_read_back():
    parity = ParitySection(True, "onnxruntime:CPUExecutionProvider", {"atol": 1e-4, "rtol": 1e-3}, [], 0.0, 0.0, {})
    assert "greedy_decode" not in parity.to_dict() and parity.to_dict()["greedy_decode_match"] is None
    parity.greedy_decode = {"match": True}
    assert list(parity.to_dict())[-1] == "greedy_decode"
    assert ParitySection.from_dict(json.loads(json.dumps(parity.to_dict()))) == parity
    patch = PatchSection("/a", "lora", "hypermerge", 2, 2, [], "ok", {}, "sha", "unchanged (weights only)", False, [])
    assert "seconds" not in patch.to_dict()
    patch.seconds = 1.5
    assert list(patch.to_dict())[-1] == "seconds" and PatchSection.from_dict(patch.to_dict()) == patch
    int8 = Int8Section("m", "model.int8.onnx", True, {}, {"metric": "cosine_min", "min": 0.99}, 1.0, 2.0, 0.5, 0.4, "r")
    assert list(int8.to_dict()) == ["method", "file", "kept", "accuracy", "bound", "p50_ms", "fp32_p50_ms",
                                    "ratio_to_fp32", "ratio_to_torch", "reason"]


def _timings(*backends: str) -> ShapeTimings:
    return ShapeTimings({name: Timing(1.0, 2.0, 3.0, 1.5, 30) for name in ("torch", *backends)},
                        {name: 0.5 for name in backends})


def test_the_latency_section_keeps_its_backends_beside_ratio_and_reads_back():
    latency = LatencySection(2, 8, 2, 30, _timings("onnxruntime", "onnxruntime_int4"),
                             _timings("onnxruntime", "onnxruntime_int4"))
    data = json.loads(json.dumps(latency.to_dict()))
    assert list(data) == ["batch", "seq", "threads", "iterations", "torch", "onnxruntime", "onnxruntime_int4",
                          "ratio", "decode_step"]
    assert list(data["torch"]) == ["p50_ms", "p90_ms", "p99_ms", "mean_ms", "runs"]
    assert list(data["decode_step"]) == ["torch", "onnxruntime", "onnxruntime_int4", "ratio"]
    assert LatencySection.from_dict(data) == latency
    encoder = LatencySection(8, 64, 2, 30, _timings("onnxruntime"))
    assert "decode_step" not in encoder.to_dict() and LatencySection.from_dict(encoder.to_dict()) == encoder


def test_dropping_a_backend_removes_it_from_the_forward_the_ratio_and_the_decode_step():
    latency = LatencySection(2, 8, 2, 30, _timings("onnxruntime", "tensorrt"), _timings("onnxruntime", "tensorrt"))
    data = latency.to_dict()
    latency.drop_backend("tensorrt")
    assert "tensorrt" not in latency.forward.timings and "tensorrt" not in latency.decode_step.ratio
    drop_backend(data, "tensorrt")  # the old function, on report.json's dict, in place
    assert data == latency.to_dict() and "tensorrt" not in data["decode_step"]


def test_the_tensorrt_section_adds_parity_and_reverified_only_when_set():
    section = TensorRTSection("10.0", "fp16", ["REFIT", "FP16"], {"min": {}, "opt": {}, "max": {}},
                              {"input_ids": [[1, 1], [1, 32], [4, 64]]}, "model.engine", "timing.cache")
    assert list(section.to_dict()) == ["version", "precision", "flags", "profile", "input_shapes", "engine",
                                       "timing_cache"]
    section.parity, section.reverified = {"passed": True}, "yes"
    assert list(section.to_dict())[-2:] == ["parity", "reverified"]
    assert TensorRTSection.from_dict(json.loads(json.dumps(section.to_dict()))) == section


def test_the_weight_only_section_opens_with_its_kind_and_reads_back():
    section = WeightOnlySection("int4", "MatMulNBits", "model.int4.onnx", True, {"bits": 4},
                                {"top1_agreement": 0.9}, {"metric": "top1_agreement", "min": 0.8},
                                {"lengths": [8]}, {"new_tokens": 8, "batch_1": {"fp32": 1.0, "quantized": 2.0}},
                                2.0, "kept")
    assert list(section.to_dict()) == ["kind", "scheme", "method", "file", "kept", "details", "accuracy", "bound",
                                       "greedy", "decode_tokens_per_s", "speedup_batch_1", "reason"]
    assert section.to_dict()["kind"] == "weight-only"
    assert WeightOnlySection.from_dict(json.loads(json.dumps(section.to_dict()))) == section


def test_the_weights_map_section_is_its_counts_or_why_there_is_no_map():
    built = WeightsMapSection("weights_map.json", 3, 2, 2, {"identity": 2}, 0, [], [{"weight": "w", "reason": "r"}])
    assert list(built.to_dict()) == ["file", "tensors", "mapped", "locations", "transforms", "shared_initializers",
                                     "constant_tensors", "unmapped"]
    assert WeightsMapSection.from_dict(json.loads(json.dumps(built.to_dict()))) == built
    failed = WeightsMapSection.failed("no map: why")
    assert failed.to_dict() == {"file": None, "error": "no map: why"}
    assert WeightsMapSection.from_dict(failed.to_dict()) == failed
