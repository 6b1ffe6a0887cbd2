"""``/health``, ``/v1/models`` and ``/metrics``: what is served, and how it is going."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import Response

from hypermerge.serve.metrics import Metrics
from hypermerge.serve.service import TASK_ENDPOINTS, Service


def router(service: Service, metrics: Metrics) -> APIRouter:
    """The info routes of ``service``; ``/metrics`` renders ``metrics``."""
    model = service.model
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> dict:
        """Liveness, and what this server serves."""
        return {"status": "ok", "model": service.name, "task": model.task, "provider": model.provider,
                "endpoint": TASK_ENDPOINTS[model.task], "adapters": sorted(service.adapters), "pid": os.getpid()}

    @routes.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @routes.get("/v1/models")
    async def models() -> dict:
        """The served model, in OpenAI's list shape, with the adapters requests may name."""
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "hypermerge", "task": model.task,
                                            "adapters": sorted(service.adapters)}]}

    return routes
