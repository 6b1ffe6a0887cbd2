"""The HTTP app (FastAPI): an exported directory's ``hm.OnnxModel`` behind OpenAI-style endpoints.

    GET  /health            liveness and what is served
    GET  /v1/models         the one model and its adapters (OpenAI's list shape)
    POST /v1/embeddings     feature-extraction exports: mean-pooled, L2-normalised embeddings
    POST /v1/classify       sequence-classification exports: label, score, all scores
    POST /v1/completions    causal-lm exports: text, or server-sent events with "stream": true
    GET  /metrics           Prometheus text

An endpoint the exported task does not support answers 404 with the reason. On an export made with
``--adapter-inputs``, ``hypermerge serve --adapter NAME=DIR`` (repeatable) names adapters that
requests choose with ``"adapter": NAME``; each is loaded (and checked) at start-up, clients never
pass paths, and the batcher only merges requests of the same adapter. Encoder requests are
micro-batched (:mod:`hypermerge.serve.batching`); generation requests are not, but their steps
interleave, one forward pass at a time, on the same inference thread. All model runs of a worker
go through one thread: onnxruntime already spreads a run over the cores, and two runs at once
would only compete for them. Tokenization runs in a thread pool, off the event loop.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed
or out-of-limit request, 401 without a valid API key (:mod:`hypermerge.serve.auth`), 404 for an
unsupported endpoint, 413 for a body over the size limit, 429 when the queue is full and 503 while
draining or after ``--request-timeout`` (both with ``Retry-After``; :mod:`hypermerge.serve.backpressure`),
500 if the model fails (the server goes on). A client that disconnects stops costing compute
(:mod:`hypermerge.serve.disconnect`).

The parts: :mod:`~hypermerge.serve.settings` (the options), :mod:`~hypermerge.serve.errors` (the error
shape), :mod:`~hypermerge.serve.service` (the model's state and limits), :mod:`~hypermerge.serve.gate`
(the middleware before the app), :mod:`~hypermerge.serve.sse` (streams) and
:mod:`~hypermerge.serve.routes` (one router per task); :func:`create_app` mounts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from hypermerge._version import __version__
from hypermerge.runtime.model import OnnxModel
from hypermerge.serve.auth import ApiKeyMiddleware
from hypermerge.serve.backpressure import drain_on_signals
from hypermerge.serve.errors import APIError, add_error_handlers, error_response
from hypermerge.serve.gate import RequestGate
from hypermerge.serve.metrics import Metrics, MetricsMiddleware
from hypermerge.serve.routes import routers
from hypermerge.serve.service import CPU_RUN_COST, TASK_ENDPOINTS, Service, load_adapters, token_limit
from hypermerge.serve.settings import QUEUE_BATCHES, ServeSettings

ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", *TASK_ENDPOINTS.values()})

__all__ = ["APIError", "CPU_RUN_COST", "ENDPOINTS", "QUEUE_BATCHES", "TASK_ENDPOINTS", "Service", "ServeSettings",
           "create_app", "error_response", "load_adapters", "token_limit"]


def create_app(model: OnnxModel, settings: ServeSettings | None = None, *, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app serving ``model``.

    Args:
        model: a loaded exported directory.
        settings: batching and limits (the host, port and workers fields are not used here).
        metrics: where to count (None: a fresh registry for this app).

    Returns:
        An ASGI app; run it with uvicorn (``hypermerge serve`` does).

    Raises:
        ConfigError: the export has no tokenizer.
    """
    settings = settings or ServeSettings()
    metrics = metrics or Metrics()
    service = Service(model, settings, metrics)
    app = FastAPI(title="hypermerge serve", version=__version__, lifespan=_lifespan(service),
                  description=f"Serving {service.name} ({model.task}) on onnxruntime.")
    app.state.service = service
    app.add_middleware(RequestGate, limit=settings.max_body_bytes, service=service)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open_metrics=settings.open_metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)  # outermost: counts everything
    add_error_handlers(app, service.rejection)
    for router in routers(service, metrics):
        app.include_router(router)
    return app


def _lifespan(service: Service):
    """Start the batcher and the drain-on-SIGTERM hook with the app; close the service after it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.batcher is not None:
            service.batcher.start()
        restore = drain_on_signals(service.queue)
        yield
        restore()
        await service.close()  # after uvicorn has let in-flight requests finish

    return lifespan
