"""The real all-MiniLM-L6-v2: export (task detected), parity, embeddings as sentence-transformers
computes them, and the int8 decision."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

import hypermerge as hm

SENTENCES = ["A gripping, beautifully acted film.", "The plot never comes together.", "short",
             "Folding adapters into dense weights removes their runtime overhead."]


def test_minilm_export_embed_and_int8(minilm, tmp_path):
    result = hm.export_model(minilm, tmp_path / "onnx", quantize="int8", batch=2, seq=16, iters=5, progress=False)
    report = json.loads((result.out / "report.json").read_text())
    assert result.task == "feature-extraction" and report["parity"]["passed"]
    assert report["parity"]["outputs"]["last_hidden_state"]["max_abs"] < 1e-4
    assert [i["name"] for i in report["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (result.out / "modules.json").exists()  # sentence-transformers' pooling config travels along

    model = hm.OnnxModel.load(result.out, provider="cpu", threads=2)
    embeddings = model.embed(SENTENCES, batch_size=3)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    reference_model = AutoModel.from_pretrained(minilm).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert embeddings.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 3]  # two film reviews are closer than a review and a tech note

    quant = report["quantized"]
    accuracy = quant["accuracy"]
    assert accuracy["inputs"] == "sentences" and accuracy["samples"] >= 32
    assert 0.9 < accuracy["cosine_min"] <= accuracy["cosine_mean"] <= 1.0
    faster = quant["p50_ms"] < quant["fp32_p50_ms"]
    assert quant["kept"] == (accuracy["cosine_mean"] >= 0.99 and faster)
    assert (result.out / "model.int8.onnx").exists() == quant["kept"]
    assert ("onnxruntime_int8" in report["latency"]) == quant["kept"]
    if quant["kept"]:
        int8 = hm.OnnxModel.load(result.out, model_file="model.int8.onnx").embed(SENTENCES)
        assert float((int8 * reference).sum(1).min()) > 0.95
