"""Backpressure: a bounded queue answered 429 (503 while draining) with Retry-After, counted in
/metrics; --request-timeout answers 503 rather than computing late; accepted requests complete."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import hypermerge as hm
from hypermerge.serve.app import ServeSettings
from hypermerge.serve.backpressure import Rejected, RequestQueue, Slots, drain_on_signals
from hypermerge.serve.batching import MicroBatcher, QueueTimeout
from tests.helpers.serving import ThreadServer, metric, open_request, wait_until

# --- the queue on its own --------------------------------------------------------------------------

def test_queue_admits_up_to_its_limit_then_refuses():
    async def body():
        counts: list[int] = []
        queue = RequestQueue(max_queue=2, timeout=None, slots=1, on_waiting=counts.append)
        first, second = queue.admit(), queue.admit()
        with pytest.raises(Rejected) as full:
            queue.admit()
        assert (full.value.status, full.value.reason) == (429, "queue_full") and full.value.retry_after >= 1
        first.started()
        first.started()  # idempotent
        third = queue.admit()  # the first left the queue: room for one
        for ticket in (first, second, third):
            ticket.finished()
            ticket.finished()
        assert queue.waiting == 0 and counts == [1, 2, 1, 2, 1, 0]
        queue.draining = True
        with pytest.raises(Rejected) as draining:
            queue.admit()
        assert (draining.value.status, draining.value.reason) == (503, "draining")

    asyncio.run(body())


def test_slots_time_out_and_never_lose_a_slot():
    async def body():
        loop = asyncio.get_running_loop()
        slots = Slots(1)
        await slots.acquire()
        with pytest.raises(TimeoutError):
            await slots.acquire(loop.time() + 0.01)
        waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0.01)
        waiters[0].cancel()  # a client that left while waiting
        slots.release()  # goes to the next waiter still there, first come first served
        await asyncio.sleep(0.01)
        assert [w.done() and not w.cancelled() for w in waiters] == [False, True, False]
        slots.release()
        await waiters[2]
        slots.release()
        assert slots.free == 1

    asyncio.run(body())


def test_timeout_for_generation_slots_is_a_503():
    async def body():
        queue = RequestQueue(max_queue=4, timeout=0.01, slots=1)
        holder, late = queue.admit(), queue.admit()
        await queue.take_slot(holder)
        with pytest.raises(Rejected) as timed_out:
            await queue.take_slot(late)
        assert (timed_out.value.status, timed_out.value.reason) == (503, "timeout")
        late.finished()
        holder.finished()  # frees the slot
        again = queue.admit()
        await queue.take_slot(again)
        assert not again.waiting and queue.waiting == 0

    asyncio.run(body())


def test_batcher_drops_a_request_still_queued_at_its_deadline():
    """A request behind a long batch, its deadline passing while it waits: QueueTimeout, and the
    model never sees its items; the running request completes."""
    gate, runs = threading.Event(), []

    def run(key, items):
        gate.wait(timeout=30)
        runs.append(list(items))
        return items

    async def body():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(run, max_batch=1, max_wait=0, executor=executor)
            batcher.start()
            started: list[str] = []
            first = asyncio.ensure_future(batcher.submit([1], on_start=lambda: started.append("first")))
            while not started:
                await asyncio.sleep(0.001)
            with pytest.raises(QueueTimeout):
                await batcher.submit([2], deadline=loop.time() + 0.02, on_start=lambda: started.append("late"))
            gate.set()
            assert await first == [1]
            assert await batcher.submit([3], deadline=loop.time() + 30) == [3]
            await batcher.close()
        assert runs == [[1], [3]] and started == ["first"]

    asyncio.run(body())


def test_signals_start_draining_and_chain_to_the_previous_handler():
    async def body():
        queue = RequestQueue(max_queue=1, timeout=None, slots=1)
        received: list[int] = []
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        try:
            restore = drain_on_signals(queue)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)  # the handler runs on the main thread between bytecodes
            assert queue.draining and received == [signal.SIGTERM]
            restore()
            assert signal.getsignal(signal.SIGTERM) is not None and queue.draining
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert received == [signal.SIGTERM, signal.SIGTERM]  # the previous handler is back
        finally:
            signal.signal(signal.SIGTERM, previous)

    asyncio.run(body())


# --- over HTTP -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(exports) -> hm.OnnxModel:
    return hm.OnnxModel.load(exports["feature-extraction"], provider="cpu")


def test_full_queue_gets_429_with_retry_after_and_accepted_requests_complete(embedder):
    """Two requests waiting (their bodies held back: admitted, not yet computed) fill --max-queue 2:
    the next one is refused at once with 429 and Retry-After, counted; the two complete correctly."""
    with ThreadServer(embedder, ServeSettings(max_queue=2)) as server:
        held = [open_request(server.url, "/v1/embeddings", {"input": text}, held_back=3) for text in ("one", "two")]
        wait_until(lambda: metric(server.url, "hypermerge_queue_waiting") == 2, "two requests waiting")
        refused = httpx.post(f"{server.url}/v1/embeddings", json={"input": "three"}, timeout=30)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_overloaded"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # not queued: still answers
        for text, request in zip(("one", "two"), held, strict=True):
            status, _, body = request.finish()
            assert status == 200
            np.testing.assert_array_equal(np.float32(body["data"][0]["embedding"]), embedder.embed([text])[0])
        again = httpx.post(f"{server.url}/v1/embeddings", json={"input": "three"}, timeout=30)
        assert again.status_code == 200
        assert metric(server.url, "hypermerge_rejected_total", endpoint="/v1/embeddings", reason="queue_full") == 1
        assert metric(server.url, "hypermerge_requests_total", endpoint="/v1/embeddings", status="429") == 1
        assert metric(server.url, "hypermerge_queue_waiting") == 0


def test_request_waiting_past_the_timeout_gets_503(embedder):
    """A request whose body completes after --request-timeout has waited too long: 503 with
    Retry-After, never computed; a prompt one is served."""
    with ThreadServer(embedder, ServeSettings(request_timeout=0.2)) as server:
        runs = metric(server.url, "hypermerge_batch_size_count")
        late = open_request(server.url, "/v1/embeddings", {"input": "late"}, held_back=2)
        wait_until(lambda: metric(server.url, "hypermerge_queue_waiting") == 1, "the request admitted")
        time.sleep(0.4)  # longer than the timeout: the request is stale when its body completes
        status, headers, body = late.finish()
        assert status == 503 and body["error"]["code"] == "timeout" and int(headers["retry-after"]) >= 1
        assert metric(server.url, "hypermerge_batch_size_count") == runs  # it never reached the model
        assert httpx.post(f"{server.url}/v1/embeddings", json={"input": "prompt"}, timeout=30).status_code == 200
        assert metric(server.url, "hypermerge_rejected_total", endpoint="/v1/embeddings", reason="timeout") == 1


def test_draining_server_answers_503(embedder):
    with ThreadServer(embedder) as server:
        server.service.queue.draining = True  # what SIGTERM sets (test_signals_start_draining...)
        response = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
        assert "retry-after" in response.headers
        assert metric(server.url, "hypermerge_rejected_total", endpoint="/v1/embeddings", reason="draining") == 1
