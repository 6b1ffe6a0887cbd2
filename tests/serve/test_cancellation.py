"""Cancellation: a client that disconnects stops costing compute. A cut stream or completion stops
after the decode step in progress; a request whose client left while it was queued is never
computed; both are counted in /metrics.

The model's steps are gated: each one waits for a permit from the test, so "how far did it get"
is decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import hypermerge as hm
from hypermerge.serve.app import ServeSettings
from tests.helpers.serving import ThreadServer, metric, open_request, wait_until

PROMPT = "once upon a time"


class Gate:
    """Permits for model calls: each call takes one (waiting for it), and is counted."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.calls = 0
        self.opened = 0  # generations begun

    def pass_through(self) -> None:
        self.calls += 1
        assert self.permits.acquire(timeout=60), "the test never let this model call run"

    def open(self) -> None:
        self.permits.release(10_000)


def gate_generation(model: hm.OnnxModel, gate: Gate) -> None:
    """Every decode step of ``model.stream`` waits at ``gate``."""
    real = model.stream

    def stream(*args, **kwargs):
        gate.opened += 1
        steps = real(*args, **kwargs)

        def gated():
            while True:
                gate.pass_through()
                step = next(steps, None)
                if step is None:
                    return
                yield step

        return gated()

    model.stream = stream


def flush(server: ThreadServer) -> None:
    """Wait until every model call queued so far has run (the model runs on one thread, in order)."""
    server.service.executor.submit(lambda: None).result(timeout=60)


def release_until(gate: Gate, done: threading.Event) -> threading.Thread:
    """Let model calls through one at a time until ``done`` is set (then the next call waits)."""
    def feed():
        fed = 0
        while not done.is_set():
            if gate.calls > fed:  # a call waits for its permit
                gate.permits.release()
                fed += 1
            done.wait(0.005)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def gated_lm(exports):
    gate = Gate()
    model = hm.OnnxModel.load(exports["causal-lm"], provider="cpu")
    gate_generation(model, gate)
    return model, gate


def _stopped_within_one_step(server: ThreadServer, gate: Gate, endpoint: str) -> None:
    """Once the cancellation is counted, no new decode step begins; the one in progress is discarded."""
    wait_until(lambda: metric(server.url, "hypermerge_cancelled_total", endpoint=endpoint, stage="running") == 1,
               "the cancellation to be counted")
    calls, tokens = gate.calls, metric(server.url, "hypermerge_tokens_total", kind="completion")
    gate.open()  # whatever still wants to run may now
    flush(server)
    assert gate.calls == calls, "a decode step began after the client left"
    assert metric(server.url, "hypermerge_tokens_total", kind="completion") == tokens  # the counter stopped
    assert tokens < 40


def test_cut_stream_stops_within_one_decode_step(gated_lm):
    model, gate = gated_lm
    with ThreadServer(model) as server:
        got_text = threading.Event()
        feeder = release_until(gate, got_text)
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    got_text.set()  # one piece of text arrived: hang up mid-generation
                    break
        feeder.join()
        _stopped_within_one_step(server, gate, "/v1/completions")
        assert metric(server.url, "hypermerge_requests_in_flight") == 1  # the /metrics request only


def test_cut_non_streamed_completion_stops_within_one_decode_step(gated_lm):
    model, gate = gated_lm
    with ThreadServer(model) as server:
        request = open_request(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 40, "temperature": 0})
        for _ in range(3):  # three steps run (the prefill and two tokens); the fourth waits
            gate.permits.release()
        wait_until(lambda: gate.calls == 4, "three decode steps")
        request.hang_up()
        _stopped_within_one_step(server, gate, "/v1/completions")


def test_generation_queued_for_a_slot_is_dropped_when_its_client_leaves(gated_lm):
    """--max-batch 1: one generation holds the only slot; a second request waits for it, then its
    client leaves: it is counted as cancelled while queued and never generates."""
    model, gate = gated_lm
    with ThreadServer(model, ServeSettings(max_batch=1)) as server:
        holder = open_request(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        wait_until(lambda: gate.calls == 1, "the first generation to start")
        queued = open_request(server.url, "/v1/completions", {"prompt": "a second prompt", "max_tokens": 4})
        wait_until(lambda: metric(server.url, "hypermerge_queue_waiting") == 1, "the second request to queue")
        queued.hang_up()
        wait_until(lambda: metric(server.url, "hypermerge_cancelled_total", endpoint="/v1/completions",
                                  stage="queued") == 1, "the queued cancellation to be counted")
        assert metric(server.url, "hypermerge_queue_waiting") == 0
        gate.open()
        status, _, body = holder.finish()
        assert status == 200 and body["choices"][0]["text"] == model.generate([PROMPT], max_new_tokens=4)[0]
        flush(server)
        assert gate.opened == 1  # the holder's generation only: never the departed request's


def test_encoder_request_queued_behind_a_batch_is_not_computed_when_its_client_leaves(exports):
    model = hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")
    gate, real, batches = Gate(), model.embed_feeds, []

    def embed_feeds(feeds, **kwargs):
        gate.pass_through()
        batches.append(feeds["input_ids"].shape[0])
        return real(feeds, **kwargs)

    model.embed_feeds = embed_feeds
    with ThreadServer(model, ServeSettings(max_batch=1)) as server, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{server.url}/v1/embeddings", json={"input": "first"}, timeout=60)
        wait_until(lambda: gate.calls == 1, "the first batch to run")
        queued = open_request(server.url, "/v1/embeddings", {"input": "left before its batch"})
        wait_until(lambda: metric(server.url, "hypermerge_queue_waiting") == 1, "the second request to queue")
        queued.hang_up()
        wait_until(lambda: metric(server.url, "hypermerge_cancelled_total", endpoint="/v1/embeddings",
                                  stage="queued") == 1, "the queued cancellation to be counted")
        gate.open()
        assert first.result().status_code == 200
        flush(server)
        assert gate.calls == 1 and batches == [1]  # one model run: the departed request was dropped
        assert metric(server.url, "hypermerge_batch_requests_sum") == 1
