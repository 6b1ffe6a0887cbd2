"""``POST /v1/completions`` (causal-lm exports): text, or server-sent events with ``"stream": true``."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hypermerge.serve.schemas import CompletionRequest
from hypermerge.serve.service import Service
from hypermerge.serve.sse import completion_events


def router(service: Service) -> APIRouter:
    """The completions route of ``service``."""
    routes = APIRouter()

    @routes.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        """Text completion (OpenAI's legacy shape); server-sent events with ``"stream": true``."""
        prompts = body.prompts()
        service.check_count(len(prompts), "prompt")
        service.adapter_path(body.adapter)  # an unknown name fails here, before any work
        encoded = await run_in_threadpool(service.tokenize_prompts, prompts, body.max_tokens)
        service.metrics.tokens.labels("prompt").inc(sum(map(len, encoded)))
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": request_id, "object": "text_completion", "created": created, "model": service.name}
        await service.watched(request, service.start_generation(request.scope))
        if body.stream:  # Starlette stops the iterator when the client disconnects
            return StreamingResponse(completion_events(service, encoded, body, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices, completion_tokens = await service.watched(request, complete(service, encoded, body))
        prompt_tokens = sum(map(len, encoded))
        return JSONResponse({**head, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})

    return routes


async def complete(service: Service, encoded: list[list[int]], body: CompletionRequest) -> tuple[list[dict], int]:
    """Each prompt's completion (non-streamed) and the number of tokens generated."""
    choices, completion_tokens = [], 0
    for index, prompt_ids in enumerate(encoded):
        text, step = [], None
        async for step in service.steps(prompt_ids, body):
            text.append(step.text)
        choices.append({"index": index, "text": "".join(text), "logprobs": None,
                        "finish_reason": step.finish_reason if step else "length"})
        completion_tokens += step.tokens if step else 0
    return choices, completion_tokens
