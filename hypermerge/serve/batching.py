"""Micro-batching: concurrent requests merged into one model run.

Requests queue up while the model is busy; when it frees up, the batcher takes what is queued (up
to ``max_batch`` items, oldest first) and runs it as one batch. While the batch is not full and
more requests are known to be on their way (``more_coming``: received by the server but still
being read or tokenized), it waits for them, at most ``max_wait`` seconds counted from the arrival
of the oldest queued request: Triton's ``max_queue_delay_microseconds`` rule, minus the wait when
nobody else is coming. So a lone request never waits, and under load batches form from what piled
up during the previous run.

Only items with the same key are batched together: the key is the request's adapter name (None for
the base model), so one model run never mixes adapters.

A batch that fails is retried request by request, so one bad request fails alone. A request
whose caller went away (its :meth:`MicroBatcher.submit` cancelled) is dropped from the queue
without being computed; one that is still queued at its ``deadline`` gets :class:`QueueTimeout`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger("hypermerge.serve")


class QueueTimeout(Exception):
    """A request was still queued at its deadline: it was dropped, not computed."""


@dataclasses.dataclass(eq=False)
class _Entry(Generic[Item, Result]):
    items: Sequence[Item]
    key: Hashable
    future: asyncio.Future
    arrived: float
    start: asyncio.Future  # resolved when a batch holding these items starts running
    on_start: Callable[[], None] | None = None


class MicroBatcher(Generic[Item, Result]):
    """Groups items from concurrent :meth:`submit` calls into batches for ``run``.

    Args:
        run: ``run(key, items) -> results`` (one result per item, in order); called in ``executor``.
        max_batch: most items in one call of ``run`` (1: no batching across requests).
        max_wait: seconds a batch may wait for more items, from its oldest item's arrival.
        executor: where ``run`` executes (one thread: model runs never overlap).
        on_batch: called with (items, requests) after every successful batch (metrics).
        more_coming: whether requests that will submit soon exist (None: assume so, wait the full
            ``max_wait`` for a batch that is not full).
    """

    def __init__(self, run: Callable[[Hashable, list[Item]], Sequence[Result]], *, max_batch: int,
                 max_wait: float, executor: Executor, on_batch: Callable[[int, int], None] | None = None,
                 more_coming: Callable[[], bool] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must be non-negative")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.executor, self.on_batch, self.more_coming = executor, on_batch, more_coming
        self._pending: collections.deque[_Entry] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="hypermerge-batcher")

    async def close(self) -> None:
        """Finish every queued request, then stop the loop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def submit(self, items: Sequence[Item], key: Hashable = None, *, deadline: float | None = None,
                     on_start: Callable[[], None] | None = None) -> list[Result]:
        """Queue ``items`` and wait for their results (in order).

        More than ``max_batch`` items are split into several batches.

        Args:
            items: what to run.
            key: only items of the same key share a batch.
            deadline: event loop time by which the first batch of these items must have started.
            on_start: called when a batch holding these items starts running (once per batch of them).

        Raises:
            RuntimeError: the batcher is closed or was never started.
            QueueTimeout: still queued at ``deadline`` (nothing of it was computed).
            Exception: whatever ``run`` raised for these items.
        """
        if self._closing or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        entries = [_Entry(items[i:i + self.max_batch], key, loop.create_future(), loop.time(), loop.create_future(),
                          on_start) for i in range(0, len(items), self.max_batch)]
        self._pending.extend(entries)
        self._wake.set()
        results: list[Result] = []
        try:
            if deadline is not None:
                await _started_by(entries[0], deadline)
            for entry in entries:
                results.extend(await entry.future)
        finally:
            for entry in entries:  # after a failure or a cancellation, the rest is not wanted
                entry.future.cancel()
        return results

    def _queued(self, key: Hashable) -> int:
        return sum(len(e.items) for e in self._pending if e.key == key and not e.future.done())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].future.done():  # the caller went away
                self._pending.popleft()
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            oldest = self._pending[0]
            # wait for company while the batch is not full, company is coming and the oldest may still wait
            while not self._closing and self._queued(oldest.key) < self.max_batch:
                remaining = oldest.arrived + self.max_wait - loop.time()
                if remaining <= 0 or (self.more_coming is not None and not self.more_coming()):
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before 3.11
                    break
            batch = self._take(oldest.key)
            if batch:
                await self._run(batch)

    def _take(self, key: Hashable) -> list[_Entry]:
        """Oldest-first entries with ``key`` that fit in one batch; the others keep their place."""
        batch, size, kept = [], 0, collections.deque()
        while self._pending:
            entry = self._pending.popleft()
            if entry.future.done():
                continue
            if entry.key == key and size + len(entry.items) <= self.max_batch:
                batch.append(entry)
                size += len(entry.items)
            else:
                kept.append(entry)
                if entry.key == key:  # first in, first served: nothing overtakes a request that did not fit
                    break
        kept.extend(self._pending)
        self._pending = kept
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for entry in batch for item in entry.items]
        for entry in batch:
            if not entry.start.done():  # a retry after a failed batch starts nothing new
                entry.start.set_result(None)
                if entry.on_start is not None:
                    entry.on_start()
        try:
            results = await loop.run_in_executor(self.executor, self.run, batch[0].key, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch run returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) == 1:
                _resolve(batch[0].future, exc=exc)
            else:
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), exc)
                for entry in batch:
                    await self._run([entry])
            return
        if self.on_batch is not None:
            self.on_batch(len(items), len(batch))
        start = 0
        for entry in batch:
            _resolve(entry.future, result=list(results[start:start + len(entry.items)]))
            start += len(entry.items)


def length_groups(lengths: Sequence[int], run_cost: float) -> list[list[int]]:
    """Split a batch into runs of similar length: indices grouped so that the padded tokens of all
    runs plus ``run_cost`` per run is smallest (an exact dynamic programme over the sorted lengths).

    A padded batch costs about (rows × longest row) token slots; one run more costs ``run_cost``
    slots of fixed overhead. ``run_cost`` = inf keeps one run.

    Returns:
        Lists of indices into ``lengths``, shortest texts first.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    if n == 0 or run_cost == float("inf"):
        return [order] if n else []
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the j shortest
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last run holds the sorted items i..j-1, padded to sorted_lengths[j-1]
            cost = best[i] + run_cost + (j - i) * sorted_lengths[j - 1]
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]


async def _started_by(entry: _Entry, deadline: float) -> None:
    """Wait until ``entry``'s batch starts (or it is done), at most until ``deadline``.

    Raises:
        QueueTimeout: still queued at the deadline.
    """
    remaining = deadline - asyncio.get_running_loop().time()
    await asyncio.wait([entry.start, entry.future], timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED)
    if not entry.start.done() and not entry.future.done():
        raise QueueTimeout()


def _resolve(future: asyncio.Future, *, result=None, exc: BaseException | None = None) -> None:
    if future.done():  # cancelled by a caller that went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
