"""The routes of a served export: one ``APIRouter`` per task, mounted by :func:`routers`.

The info routes (health, models, metrics) are always there; of the task endpoints only the one the
export supports does work, the others answer 404 with the reason.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hypermerge.runtime.contract import CAUSAL_LM, FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION
from hypermerge.serve.errors import APIError
from hypermerge.serve.metrics import Metrics
from hypermerge.serve.routes import classify, completions, embeddings, info
from hypermerge.serve.service import TASK_ENDPOINTS, Service

TASK_ROUTERS = {FEATURE_EXTRACTION: embeddings.router, SEQUENCE_CLASSIFICATION: classify.router,
                CAUSAL_LM: completions.router}


def routers(service: Service, metrics: Metrics) -> list[APIRouter]:
    """The routers serving ``service``'s export: info, the 404s of other tasks, its task's endpoint.

    Args:
        service: what the endpoints run on.
        metrics: what ``/metrics`` renders.

    Returns:
        The routers, in the order to include them.
    """
    task = service.model.task
    return [info.router(service, metrics), unsupported_router(service), TASK_ROUTERS[task](service)]


def unsupported_router(service: Service) -> APIRouter:
    """404 with the reason on the endpoints of the tasks this export is not."""
    router = APIRouter()

    def unsupported(path: str, task: str):
        async def endpoint(request: Request) -> JSONResponse:
            served = service.model.task
            raise APIError(404, f"{path} needs a {task} export; this server serves {service.name}, a {served} "
                                f"export (its endpoint is {TASK_ENDPOINTS[served]})", code="unsupported_endpoint")
        return endpoint

    for task, path in TASK_ENDPOINTS.items():
        if task != service.model.task:
            router.add_api_route(path, unsupported(path, task), methods=["POST"], include_in_schema=False)
    return router
