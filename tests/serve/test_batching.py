"""The micro-batcher on its own: grouping, splitting, keys, failure isolation, cancellation, drain."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hypermerge.serve.batching import MicroBatcher, length_groups


class Recorder:
    """A stand-in model run: doubles each item, records the batches; fails on items < 0.

    ``gate`` holds the first run until released, so requests pile up behind it deterministically.
    """

    def __init__(self, hold_first: bool = False):
        self.batches: list[tuple[object, list[int]]] = []
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, key, items: list[int]) -> list[int]:
        self.gate.wait(timeout=30)
        self.batches.append((key, list(items)))
        if any(item < 0 for item in items):
            raise ValueError(f"bad item in {items}")
        return [2 * item for item in items]


async def _with_batcher(recorder: Recorder, body, *, max_batch: int = 8, max_wait: float = 0.0):
    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(recorder, max_batch=max_batch, max_wait=max_wait, executor=executor,
                               on_batch=lambda items, requests: sizes.append((items, requests)))
        sizes: list[tuple[int, int]] = []
        batcher.start()
        try:
            return await body(batcher), sizes
        finally:
            await batcher.close()


async def _blocked_then_released(batcher: MicroBatcher, recorder: Recorder, requests: list[tuple[list[int], object]]):
    """Occupy the model with a first request, queue ``requests`` behind it, then let everything run."""
    first = asyncio.ensure_future(batcher.submit([100]))
    await asyncio.sleep(0.05)  # the first batch is now running (held at the gate)
    tasks = [asyncio.ensure_future(batcher.submit(items, key)) for items, key in requests]
    await asyncio.sleep(0.05)  # all queued
    recorder.gate.set()
    return await first, await asyncio.gather(*tasks, return_exceptions=True)


def test_queued_requests_share_batches_and_get_their_own_results():
    recorder = Recorder(hold_first=True)
    requests = [([i, i + 1], None) for i in range(0, 12, 2)]  # 6 requests of 2 items

    async def body(batcher):
        return await _blocked_then_released(batcher, recorder, requests)

    (first, results), sizes = asyncio.run(_with_batcher(recorder, body, max_batch=8))
    assert first == [200]
    assert results == [[2 * i, 2 * i + 2] for i in range(0, 12, 2)]
    # behind the held batch: 4 requests (8 items) fill a batch, the other 2 form the next
    assert [items for _, items in recorder.batches] == [[100], list(range(8)), list(range(8, 12))]
    assert sizes == [(1, 1), (8, 4), (4, 2)]


def test_max_batch_1_runs_every_item_alone_and_large_requests_are_split():
    async def body(batcher):
        return await batcher.submit(list(range(5)))

    recorder = Recorder()
    results, sizes = asyncio.run(_with_batcher(recorder, body, max_batch=1))
    assert results == [0, 2, 4, 6, 8] and [items for _, items in recorder.batches] == [[0], [1], [2], [3], [4]]
    recorder = Recorder()
    results, _ = asyncio.run(_with_batcher(recorder, body, max_batch=2))
    assert results == [0, 2, 4, 6, 8] and [items for _, items in recorder.batches] == [[0, 1], [2, 3], [4]]


def test_requests_with_different_keys_never_share_a_batch():
    recorder = Recorder(hold_first=True)
    requests = [([1], "a"), ([2], "b"), ([3], "a"), ([4], "b"), ([5], None)]

    async def body(batcher):
        return await _blocked_then_released(batcher, recorder, requests)

    (_, results), _ = asyncio.run(_with_batcher(recorder, body))
    assert results == [[2], [4], [6], [8], [10]]
    assert recorder.batches[1:] == [("a", [1, 3]), ("b", [2, 4]), (None, [5])]


def test_a_failing_request_fails_alone():
    recorder = Recorder(hold_first=True)
    requests = [([1], None), ([-1], None), ([3, 4], None)]

    async def body(batcher):
        return await _blocked_then_released(batcher, recorder, requests)

    (_, results), sizes = asyncio.run(_with_batcher(recorder, body))
    assert results[0] == [2] and results[2] == [6, 8]
    assert isinstance(results[1], ValueError)
    # the merged batch failed, then each request ran alone
    assert [items for _, items in recorder.batches][1:] == [[1, -1, 3, 4], [1], [-1], [3, 4]]


def test_a_cancelled_request_is_dropped_before_it_runs():
    recorder = Recorder(hold_first=True)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit([100]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit([7]))
        kept = asyncio.ensure_future(batcher.submit([8]))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away while queued
        recorder.gate.set()
        return await first, await kept

    (first, kept), _ = asyncio.run(_with_batcher(recorder, body))
    assert (first, kept) == ([200], [16])
    assert [items for _, items in recorder.batches] == [[100], [8]]


def test_a_lone_request_runs_after_max_wait_and_close_drains_the_queue():
    recorder = Recorder()

    async def body(batcher):
        alone = await batcher.submit([1])  # nobody joins: runs once max_wait has passed
        queued = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0)
        await batcher.close()  # does not drop what is queued
        return alone, await queued

    (alone, queued), _ = asyncio.run(_with_batcher(recorder, body, max_wait=0.05))
    assert (alone, queued) == ([2], [4])

    async def after_close(batcher):
        await batcher.close()
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit([1])

    asyncio.run(_with_batcher(Recorder(), after_close))


@pytest.mark.parametrize("lengths", [[], [5], [3, 15, 9, 15, 3, 14, 13, 9], list(range(1, 40)), [7] * 10])
def test_length_groups_cover_every_item_and_beat_one_padded_run(lengths):
    groups = length_groups(lengths, 16.0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(gs):
        return sum(16.0 + len(g) * max(lengths[i] for i in g) for g in gs)

    if lengths:
        assert cost(groups) <= cost([list(range(len(lengths)))])
        # every group holds a contiguous range of the sorted lengths
        ordered = [lengths[i] for g in groups for i in g]
        assert ordered == sorted(lengths)
    assert length_groups(lengths, float("inf")) == ([sorted(range(len(lengths)), key=lambda i: lengths[i])]
                                                    if lengths else [])
    assert length_groups([3, 3, 20, 20], 1.0) == [[0, 1], [2, 3]]  # cheap runs: split by length
    assert length_groups([3, 3, 20, 20], 1000.0) == [[0, 1, 2, 3]]  # costly runs: pad instead


def test_a_batch_waits_only_while_more_requests_are_coming():
    """max_wait is long here: with nobody coming the lone request runs at once; with someone coming,
    the batch waits for them and both share one run."""
    coming = {"value": False}

    async def run_with(batcher_body):
        recorder = Recorder()
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(recorder, max_batch=2, max_wait=30.0, executor=executor,
                                   more_coming=lambda: coming["value"])
            batcher.start()
            try:
                return await asyncio.wait_for(batcher_body(batcher), timeout=10), recorder.batches
            finally:
                await batcher.close()

    async def lone(batcher):
        return await batcher.submit([1])

    result, batches = asyncio.run(run_with(lone))
    assert result == [2] and batches == [(None, [1])]

    async def pair(batcher):
        coming["value"] = True  # the second request has reached the server but not the batcher yet
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit([2]))  # fills the batch: it runs
        return await first, await second

    results, batches = asyncio.run(run_with(pair))
    assert results == ([2], [4]) and batches == [(None, [1, 2])]
