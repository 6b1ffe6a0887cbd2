"""Errors as the client sees them: OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` is what the service raises for a request it refuses; :func:`add_error_handlers`
turns it, pydantic's validation errors, Starlette's HTTP errors, capacity refusals and any other
exception (500, logged, the server goes on) into that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hypermerge.serve.backpressure import Rejected

log = logging.getLogger("hypermerge.serve")


class APIError(Exception):
    """An error answered to the client (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """An error answer in OpenAI's shape.

    Args:
        status: the HTTP status.
        message: one readable line.
        param: the request field at fault, if any.
        code: a machine-readable reason (``context_length_exceeded``...), if any.
        kind: the error's ``type``.

    Returns:
        The JSON response.
    """
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))})")
            continue
        field = ".".join(loc)
        if not loc and error.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("the body must be a JSON object")
            continue
        param = param or (loc[0] if loc else None)
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts) or "invalid request", param


def add_error_handlers(app: FastAPI, rejection: Callable[[Rejected, str], JSONResponse]) -> None:
    """Answer every failure of a request in the API's error shape.

    Args:
        app: the app to handle errors for.
        rejection: the (counted) 429/503 answer to a request refused for capacity, given the endpoint.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        return rejection(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
