"""The middleware every request passes before the app: body size limit, JSON bodies, admission to the model."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypermerge.serve.backpressure import Rejected
from hypermerge.serve.errors import error_response
from hypermerge.serve.service import TASK_ENDPOINTS, TICKET_KEY, Service


class _TooLarge(Exception):
    pass


class RequestGate:
    """What happens to a request before the app sees it.

    - 413 in the API's error shape for a body over the limit: at once for a declared Content-Length,
      as the bytes arrive for a chunked body (whatever the app made of the interrupted read, the
      client gets the 413).
    - Every POST body is read as JSON, whatever its Content-Type: the API takes nothing else, and
      ``curl -d '{...}'`` labels its JSON form-encoded.
    - Admission to the model's endpoint (:class:`~hypermerge.serve.backpressure.RequestQueue`):
      429/503 with ``Retry-After`` when the queue is full or the server drains.
    """

    def __init__(self, app: ASGIApp, limit: int, service: Service):
        self.app, self.limit, self.service = app, limit, service

    def _response(self, size: int | None) -> JSONResponse:
        told = f"has {size} bytes" if size is not None else "is larger than that"
        return error_response(413, f"the request body {told}; this server takes at most {self.limit}",
                              code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._response(int(declared))(scope, receive, send)
            return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and not content_type.endswith(b"json"):
            scope = {**scope, "headers": [*((k, v) for k, v in scope["headers"] if k.lower() != b"content-type"),
                                          (b"content-type", b"application/json")]}
        received, too_large, replaced = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        async def checked_send(message: Message) -> None:
            nonlocal replaced
            if too_large:  # the app answered the broken read somehow: answer 413 instead
                if message["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await self._response(None)(scope, receive, send)
                return
            await send(message)

        ticket = None
        if scope["method"] == "POST" and scope["path"] == TASK_ENDPOINTS[self.service.model.task]:
            try:  # before the body is read: a refusal costs microseconds
                ticket = self.service.queue.admit()
            except Rejected as exc:
                await self.service.rejection(exc, scope["path"])(scope, receive, send)
                return
            scope[TICKET_KEY] = ticket
            if self.service.batcher is not None:
                self.service.arrived(scope)
        try:
            await self.app(scope, limited_receive, checked_send)
        except _TooLarge:
            if not replaced:
                await self._response(None)(scope, receive, send)
        finally:
            self.service.submitted(scope)  # a request that failed before the batcher
            if ticket is not None:
                ticket.finished()  # out of the queue, its generation slot (if any) freed
