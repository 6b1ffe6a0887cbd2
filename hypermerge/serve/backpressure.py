"""Backpressure: a bounded queue in front of the model, answered 429/503 rather than left to grow.

A request on the model's endpoint is *admitted* when its headers arrive (before its body is read,
so that a refusal costs microseconds) and *waits* until its computation starts: its micro-batch
begins running (encoders) or a generation slot frees up (completions: at most ``--max-batch``
sequences generate at once, their steps interleaved). While ``max_queue`` requests wait, a new one
is refused with ``429`` and ``Retry-After``; a draining server (SIGTERM received) refuses with
``503``. A request that waits longer than ``timeout`` seconds is answered ``503``: it is dropped
from the queue, not computed late. Accepted requests are never refused once they are running.

Everything here runs on the event loop thread: the counters need no lock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import signal
import threading
from collections.abc import Callable
from types import FrameType

QUEUE_FULL, DRAINING, TIMEOUT = "queue_full", "draining", "timeout"


class Rejected(Exception):
    """A request refused for lack of capacity: its status, reason and Retry-After seconds."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after = status, reason, message, retry_after


@dataclasses.dataclass(eq=False)
class Ticket:
    """One admitted request: waiting until :meth:`started`, done at :meth:`finished` (both idempotent)."""

    queue: RequestQueue
    arrived: float  # event loop time
    waiting: bool = True
    slot: bool = False  # holds a generation slot

    @property
    def deadline(self) -> float | None:
        """Event loop time by which the request must have started (None: no limit)."""
        return None if self.queue.timeout is None else self.arrived + self.queue.timeout

    def started(self) -> None:
        if self.waiting:
            self.waiting = False
            self.queue.count(-1)

    def finished(self) -> None:
        self.started()
        if self.slot:
            self.slot = False
            self.queue.slots.release()


class Slots:
    """At most ``size`` holders at once; the others wait first in, first out (an asyncio.Semaphore
    whose timeout and cancellation never lose a slot: a slot granted as its waiter gives up goes back)."""

    def __init__(self, size: int):
        self.free = size
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, deadline: float | None = None) -> None:
        """Take a slot, waiting at most until ``deadline`` (event loop time).

        Raises:
            TimeoutError: the deadline passed first.
        """
        if self.free > 0 and not any(not w.done() for w in self._waiters):
            self.free -= 1
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait([waiter], timeout=timeout)
            if not done:
                raise TimeoutError()
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we gave up: pass it on
            else:
                waiter.cancel()
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class RequestQueue:
    """Admission to the model: at most ``max_queue`` requests waiting, each at most ``timeout`` s.

    Args:
        max_queue: most admitted requests waiting to start at once.
        timeout: seconds a request may wait before it is answered 503 (None: no limit).
        slots: requests computing at once where the endpoint bounds it (generation); encoders leave
            that to the micro-batcher.
        on_waiting: called with the number of waiting requests whenever it changes (a gauge).
    """

    def __init__(self, max_queue: int, timeout: float | None, slots: int,
                 on_waiting: Callable[[int], None] | None = None):
        self.max_queue, self.timeout, self.on_waiting = max_queue, timeout, on_waiting
        self.waiting = 0
        self.draining = False
        self.slots = Slots(slots)
        self.retry_after = 1  # seconds; updated from how long requests really wait (``observe_wait``)

    def admit(self) -> Ticket:
        """A ticket for a new request.

        Raises:
            Rejected: 503 while draining, 429 when ``max_queue`` requests already wait.
        """
        if self.draining:
            raise Rejected(503, DRAINING, "this server is shutting down; retry on another replica",
                           self.retry_after)
        if self.waiting >= self.max_queue:
            raise Rejected(429, QUEUE_FULL, f"this server is at capacity ({self.waiting} requests are waiting, the "
                                            f"most it queues); retry after {self.retry_after} s", self.retry_after)
        self.count(+1)
        return Ticket(self, asyncio.get_running_loop().time())

    def count(self, change: int) -> None:
        self.waiting += change
        if self.on_waiting is not None:
            self.on_waiting(self.waiting)

    def timed_out(self) -> Rejected:
        return Rejected(503, TIMEOUT, f"the request waited over {self.timeout:g} s for the model (the server's "
                                      "--request-timeout) and was dropped; retry later", self.retry_after)

    async def take_slot(self, ticket: Ticket) -> None:
        """Wait for a slot for ``ticket`` (generation), then count it as started.

        Raises:
            Rejected: 503, the request's deadline passed first.
        """
        try:
            await self.slots.acquire(ticket.deadline)
        except TimeoutError:
            raise self.timed_out() from None
        ticket.slot = True
        self.observe_wait(ticket)
        ticket.started()

    def observe_wait(self, ticket: Ticket) -> None:
        """Retry-After follows the wait of the last request that started (whole seconds, 1 to 60)."""
        if ticket.waiting:
            waited = asyncio.get_running_loop().time() - ticket.arrived
            self.retry_after = min(60, max(1, math.ceil(waited)))


def drain_on_signals(queue: RequestQueue) -> Callable[[], None]:
    """From SIGTERM or SIGINT on, new requests get 503 (draining) while accepted ones finish.

    Chains to the handlers in place (uvicorn's, which begin the graceful shutdown). Signal handlers
    belong to the main thread: elsewhere (an app run in a test's thread) nothing changes.

    Returns:
        What puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        queue.draining = True
        chained = previous[signum]
        if callable(chained):
            chained(signum, frame)

    for sig, chained in previous.items():
        if callable(chained):  # only where someone (uvicorn) handles it: a default exit stays one
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, chained in previous.items():
            if callable(chained) and signal.getsignal(sig) is handler:
                signal.signal(sig, chained)

    return restore
