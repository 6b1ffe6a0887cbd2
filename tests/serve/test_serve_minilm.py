"""The real all-MiniLM-L6-v2 served over HTTP: embeddings as sentence-transformers computes them
(mean-pooled PyTorch), equal to hm.OnnxModel's, under concurrent load. Slow: a real export."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hypermerge as hm
from tests.helpers.common import minilm_dir
from tests.helpers.serving import Server

SENTENCES = ["A gripping, beautifully acted film.", "The plot never comes together.", "short",
             "Folding adapters into dense weights removes their runtime overhead."]


@pytest.mark.slow
def test_minilm_embeddings_over_http(tmp_path):
    export = hm.export_model(minilm_dir(), tmp_path / "minilm", verify=False, progress=False).out
    server = Server(export, "-q").wait_ready()
    try:
        async def many() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": SENTENCES[i % 4]})
                                              for i in range(64)))

        responses = asyncio.run(many())
    finally:
        assert server.terminate() == 0
    assert all(r.status_code == 200 for r in responses)
    served = np.array([r.json()["data"][0]["embedding"] for r in responses[:4]], dtype=np.float32)
    assert served.shape == (4, 384)
    model = hm.OnnxModel.load(export, provider="cpu")
    np.testing.assert_array_equal(served, np.stack([model.embed([s])[0] for s in SENTENCES]))
    for i, response in enumerate(responses):  # every concurrent answer equals the unbatched one
        np.testing.assert_array_equal(np.float32(response.json()["data"][0]["embedding"]), served[i % 4])

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    reference = AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosine = (served * pooled).sum(1)
    assert cosine.min() > 1 - 1e-4, cosine
