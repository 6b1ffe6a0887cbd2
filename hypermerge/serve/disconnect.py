"""Cancellation: work for a client that disconnected stops.

uvicorn does not cancel a request's handler when its client goes away; it only answers the next
``receive()`` with ``http.disconnect``. :func:`unless_disconnected` watches for that while the work
runs and cancels the work when it comes: a request still queued leaves the queue without being
computed, a generation stops after the step in progress. (Streamed responses need no watcher:
Starlette's ``StreamingResponse`` already cancels its iterator on ``http.disconnect``.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":  # the body is read already: only the end comes
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """The result of ``work``, unless the client disconnects first.

    Call it once the request's body has been read (``receive`` then waits for the disconnect).

    Raises:
        ClientGone: the client left; ``work`` was cancelled (and has finished cancelling).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # we were cancelled ourselves
            task.cancel()
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # how it ended matters no more
        await task
    raise ClientGone()
