"""``POST /v1/classify`` (sequence-classification exports): label, score and all scores per text."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hypermerge.serve.schemas import ClassifyRequest
from hypermerge.serve.service import Service


def router(service: Service) -> APIRouter:
    """The classify route of ``service``."""
    routes = APIRouter()

    @routes.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        """Label, score and every label's probability per text (label names from the config)."""
        results, tokens = await service.watched(request, service.encode(body.texts(), body.truncate,
                                                                        body.batch_key(), request.scope))
        data = [{"index": i, **result} for i, result in enumerate(results)]
        return JSONResponse({"object": "list", "data": data, "model": service.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return routes
