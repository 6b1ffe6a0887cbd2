"""Server-sent events: OpenAI's completion stream (``"stream": true``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from hypermerge.serve.schemas import CompletionRequest
from hypermerge.serve.service import Service

log = logging.getLogger("hypermerge.serve")


def sse_event(data: dict | str) -> bytes:
    """One server-sent event: ``data: JSON`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def completion_events(service: Service, encoded: list[list[int]], body: CompletionRequest,
                            head: dict) -> AsyncIterator[bytes]:
    """OpenAI's completion stream: one chunk per piece of text, the last with its finish_reason,
    optionally a usage chunk, then ``data: [DONE]``. A failure mid-stream sends an error event."""
    completion_tokens = 0
    try:
        for index, prompt_ids in enumerate(encoded):
            async for step in service.steps(prompt_ids, body):
                if step.text or step.finish_reason is not None:
                    yield sse_event({**head, "choices": [{"index": index, "text": step.text, "logprobs": None,
                                                          "finish_reason": step.finish_reason}]})
                if step.finish_reason is not None:
                    completion_tokens += step.tokens
        if body.stream_options is not None and body.stream_options.include_usage:
            prompt_tokens = sum(map(len, encoded))
            yield sse_event({**head, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
    except asyncio.CancelledError:  # the client disconnected (Starlette cancels the iterator): stop generating
        service.metrics.cancelled.labels("/v1/completions", "running").inc()
        raise
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, keep serving
        log.exception("streaming completion failed")
        yield sse_event({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                   "type": "server_error", "param": None, "code": None}})
    yield sse_event("[DONE]")
