"""The HTTP API against a real `hypermerge serve` subprocess per task: results equal hm.OnnxModel's
(and PyTorch's), streaming equals non-streaming, malformed requests get 4xx, concurrency, metrics."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModel

import hypermerge as hm

TEXTS = ["A gripping, beautifully acted film.", "short", "The plot never comes together and the jokes fall flat.",
         "Folding adapters into dense weights removes their runtime overhead."]
PROMPTS = ["the weather today is", "once upon a time"]


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from /metrics parsed with prometheus_client's parser."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event ("[DONE]" kept as a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- embeddings ------------------------------------------------------------------------------------

def test_embeddings_equal_onnx_model_and_pytorch(embed_url, exports):
    response = post(embed_url, "/v1/embeddings", {"input": TEXTS, "model": "anything"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    served = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)

    model = hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")
    # the server answered from one padded batch; each text embedded alone gives the same floats
    np.testing.assert_array_equal(served, np.stack([model.embed([t])[0] for t in TEXTS]))
    tokens = sum(len(ids) for ids in model.tokenizer(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    source = exports["feature-extraction"].parent / "bert-encoder-source"
    reference = AutoModel.from_pretrained(source).eval()
    batch = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosine = (served * pooled).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(pooled, axis=1)
    assert cosine.min() > 1 - 1e-4, cosine

    single = post(embed_url, "/v1/embeddings", {"input": TEXTS[0]}).json()
    assert len(single["data"]) == 1 and np.array_equal(np.float32(single["data"][0]["embedding"]), served[0])
    encoded = post(embed_url, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in encoded["data"]])
    np.testing.assert_array_equal(decoded, served)


def test_concurrent_requests_are_batched_identically_and_counted(embed_url, exports):
    """200 concurrent requests: no errors, each answer equals its texts embedded alone, requests
    were merged into shared model runs, and /metrics counted every one."""
    model = hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")
    rng = np.random.default_rng(0)
    words = "the a film plot never comes together gripping acted adapters fold dense weights".split()
    requests = [[" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(rng.integers(1, 4))]
                for _ in range(200)]
    before = metric_samples(embed_url)

    async def run_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=embed_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": texts}) for texts in requests))

    responses = asyncio.run(run_all())
    assert [r.status_code for r in responses] == [200] * 200
    for texts, response in zip(requests, responses, strict=True):
        served = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        np.testing.assert_array_equal(served, model.embed(texts))

    after = metric_samples(embed_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("hypermerge_requests_total", endpoint="/v1/embeddings", status="200") == 200
    assert delta("hypermerge_request_duration_seconds_count", endpoint="/v1/embeddings") == 200
    assert delta("hypermerge_batch_size_sum") == sum(map(len, requests))  # every text went through a batch
    assert delta("hypermerge_batch_requests_sum") == 200
    assert delta("hypermerge_batch_requests_count") < 200  # fewer model runs than requests: merged
    assert after[("hypermerge_requests_in_flight", ())] == 1  # the /metrics request itself


# --- classification --------------------------------------------------------------------------------

def test_classification_labels_and_scores(classify_url, exports):
    response = post(classify_url, "/v1/classify", {"input": TEXTS})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = hm.OnnxModel.load(exports["sequence-classification"], provider="cpu").classify(TEXTS)
    assert [d["index"] for d in data] == list(range(len(TEXTS)))
    for got, want in zip(data, expected, strict=True):
        assert got["label"] == want["label"] and set(got["scores"]) == {"negative", "neutral", "positive"}
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert got["score"] == max(got["scores"].values()) and sum(got["scores"].values()) == pytest.approx(1)


# --- completions -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(exports) -> hm.OnnxModel:
    return hm.OnnxModel.load(exports["causal-lm"], provider="cpu")


def test_completions_equal_greedy_generate(lm_url, lm):
    for prompt in PROMPTS:
        response = post(lm_url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        (choice,) = body["choices"]
        assert choice["text"] == lm.generate([prompt], max_new_tokens=12)[0]
        assert choice["finish_reason"] in ("stop", "length")
        prompt_tokens = len(lm.tokenizer(prompt)["input_ids"])
        usage = body["usage"]
        assert usage["prompt_tokens"] == prompt_tokens and 1 <= usage["completion_tokens"] <= 12
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == 12

    both = post(lm_url, "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == [lm.generate([p], max_new_tokens=12)[0] for p in PROMPTS]


def test_sampling_with_a_seed_is_reproducible_and_matches_generate(lm_url, lm):
    body = {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first, second = (post(lm_url, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    assert first == second == lm.generate([PROMPTS[0]], 10, temperature=0.9, top_p=0.9, seed=7)[0]


def test_streaming_yields_the_same_text(lm_url, lm):
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
        expected = post(lm_url, "/v1/completions", body).json()
        with httpx.stream("POST", f"{lm_url}/v1/completions", json={**body, "stream": True,
                          "stream_options": {"include_usage": True}}, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == expected["choices"][0]["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert usage["choices"] == [] and usage["usage"] == expected["usage"]


def test_stop_strings_cut_the_text(lm_url, lm):
    full = lm.generate([PROMPTS[0]], max_new_tokens=16, stop_at_eos=False)[0]
    words = full.split()
    assert len(words) >= 3, full  # the tiny random model babbles WordPiece tokens separated by spaces
    stop = " " + words[2]
    cut = full[:full.index(stop)]
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": [stop, "never-generated"]}
    choice = post(lm_url, "/v1/completions", body).json()["choices"][0]
    assert choice == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    with httpx.stream("POST", f"{lm_url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        events = sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut


# --- malformed requests ----------------------------------------------------------------------------

LONG_TEXT = "word " * 100  # > 64 tokens: the tiny models have 64 positions

ENCODER_CASES = {  # name -> (body, raw bytes instead of JSON, status, words the message must contain)
    "not JSON": (None, b'{"input": ["a"', 400, "not valid JSON"),
    "not an object": (["a"], None, 400, "JSON object"),
    "missing input": ({}, None, 400, "input"),
    "input of numbers": ({"input": [1, 2]}, None, 400, "input"),
    "input an object": ({"input": {"a": 1}}, None, 400, "input"),
    "empty list": ({"input": []}, None, 400, "must not be empty"),
    "empty string": ({"input": ""}, None, 400, "empty string"),
    "empty string in list": ({"input": ["a", ""]}, None, 400, "input[1]"),
    "too many texts": ({"input": ["a"] * 257}, None, 400, "at most 256"),
    "too many tokens": ({"input": ["ok", LONG_TEXT]}, None, 400, "at most 64"),
    "unknown field": ({"input": "a", "dimensions": 8}, None, 400, "dimensions"),
    "bad encoding_format": ({"input": "a", "encoding_format": "int8"}, None, 400, "encoding_format"),
    "body too large": (None, b'{"input": "' + b"a" * (9 << 20) + b'"}', 413, "at most 8388608"),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_malformed_encoder_requests_get_4xx(embed_url, case):
    body, raw, status, words = ENCODER_CASES[case]
    if raw is not None:
        response = httpx.post(f"{embed_url}/v1/embeddings", content=raw, timeout=60,
                              headers={"content-type": "application/json"})
    else:
        response = post(embed_url, "/v1/embeddings", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error


LM_CASES = {
    "max_tokens 0": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "negative temperature": ({"prompt": "a", "temperature": -1}, "temperature"),
    "top_p 0": ({"prompt": "a", "top_p": 0}, "top_p"),
    "n 2": ({"prompt": "a", "n": 2}, "n"),
    "five stops": ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    "logprobs": ({"prompt": "a", "logprobs": 2}, "logprobs"),
    "stream not bool": ({"prompt": "a", "stream": "maybe"}, "stream"),
    "empty prompt": ({"prompt": ""}, "empty"),
    "prompt too long": ({"prompt": LONG_TEXT}, "context of 64"),
    "prompt + max_tokens too long": ({"prompt": "a b c", "max_tokens": 62}, "context of 64"),
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_malformed_completion_requests_get_400(lm_url, case):
    body, words = LM_CASES[case]
    for stream in (False, True):
        response = post(lm_url, "/v1/completions", {**body, "stream": stream} if case != "stream not bool" else body)
        assert response.status_code == 400, response.text
        assert words in response.json()["error"]["message"]


def test_unsupported_endpoints_unknown_paths_and_methods(embed_url, classify_url, lm_url):
    for url, path, served in ((embed_url, "/v1/completions", "/v1/embeddings"),
                              (embed_url, "/v1/classify", "/v1/embeddings"),
                              (classify_url, "/v1/embeddings", "/v1/classify"),
                              (lm_url, "/v1/embeddings", "/v1/completions")):
        response = post(url, path, {"input": "a", "prompt": "a"})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "unsupported_endpoint" and served in error["message"], error
    assert httpx.get(f"{embed_url}/v1/nothing").status_code == 404
    assert httpx.get(f"{embed_url}/v1/embeddings").status_code == 405
    for url in (embed_url, classify_url, lm_url):  # none of the above hurt the servers
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_truncate_option_accepts_long_texts(embed_url, exports):
    response = post(embed_url, "/v1/embeddings", {"input": [LONG_TEXT], "truncate": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 64
    model = hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")
    np.testing.assert_array_equal(np.float32(response.json()["data"][0]["embedding"]),
                                  model.embed([LONG_TEXT], max_length=64)[0])


# --- health, models, metrics -----------------------------------------------------------------------

def test_health_models_and_metrics_format(servers):
    for task, server in servers.items():
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["task"] == task and health["provider"] == "CPUExecutionProvider"
        models = httpx.get(f"{server.url}/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == health["model"]
        response = httpx.get(f"{server.url}/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
        assert families["hypermerge_requests"] == "counter"
        assert families["hypermerge_request_errors"] == "counter"
        assert families["hypermerge_request_duration_seconds"] == "histogram"
        assert families["hypermerge_batch_size"] == "histogram"
        assert families["hypermerge_requests_in_flight"] == "gauge"


def test_chunked_body_over_the_limit_gets_413(embed_url):
    def chunks():  # no Content-Length: the limit is found as the bytes arrive
        yield b'{"input": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{embed_url}/v1/embeddings", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{embed_url}/health").status_code == 200


def test_json_is_read_whatever_the_content_type(embed_url):
    """`curl -d '{...}'` without a header sends application/x-www-form-urlencoded."""
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}, {}):
        response = httpx.post(f"{embed_url}/v1/embeddings", content=b'{"input": "a"}', headers=headers, timeout=60)
        assert response.status_code == 200, (headers, response.text)
