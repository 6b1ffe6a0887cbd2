"""report.json's sections as typed objects: ``to_dict`` gives the keys in the documented order,
optional keys only when set, and ``from_dict`` reads a section back."""

from __future__ import annotations

import json

from hypermerge.export.report import ExportHeader, Int8Section, ParitySection, PatchSection


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
