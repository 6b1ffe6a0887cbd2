"""Prometheus metrics of the server (``GET /metrics``), with prometheus_client.

One process: the metrics live in a registry of their own (several apps can share a process, as
tests do). Several uvicorn workers (``--workers K``): prometheus_client's multiprocess mode, each
worker writing its values to files under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` summing
them, so a scrape answered by any worker reports the whole server.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's metrics.

    - ``hypermerge_requests_total{endpoint, status}``: answered HTTP requests.
    - ``hypermerge_request_errors_total{endpoint, status}``: those answered with 4xx or 5xx.
    - ``hypermerge_request_duration_seconds{endpoint}``: until the last byte (a stream's end).
    - ``hypermerge_requests_in_flight``: requests being answered now.
    - ``hypermerge_batch_size``: texts per model run; ``hypermerge_batch_requests``: requests merged
      into one model run (micro-batching at work when > 1).
    - ``hypermerge_inference_duration_seconds{kind}``: one model run (encode batch, generation step).
    - ``hypermerge_tokens_total{kind}``: prompt (input) and completion (generated) tokens.
    - ``hypermerge_rejected_total{endpoint, reason}``: requests refused for capacity: ``queue_full``
      (429), ``draining`` (503, shutting down), ``timeout`` (503, waited over ``--request-timeout``).
    - ``hypermerge_cancelled_total{endpoint, stage}``: requests whose client disconnected before the
      answer: ``queued`` (dropped before any computation) or ``running`` (generation stopped).
    - ``hypermerge_queue_waiting``: admitted requests waiting for the model now.

    Args:
        multiprocess_dir: prometheus_client's multiprocess directory (several workers); None for one process.
    """

    def __init__(self, multiprocess_dir: str | None = None):
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        if multiprocess_dir is None:
            ProcessCollector(registry=self.registry)
        registry = self.registry
        self.requests = Counter("hypermerge_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=registry)
        self.errors = Counter("hypermerge_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
                              ["endpoint", "status"], registry=registry)
        self.latency = Histogram("hypermerge_request_duration_seconds",
                                 "Time from request to the last byte of the response (a stream's end).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("hypermerge_requests_in_flight", "Requests being answered now.",
                               multiprocess_mode="livesum", registry=registry)
        self.batch_size = Histogram("hypermerge_batch_size", "Texts per model run (encoder endpoints).",
                                    buckets=SIZE_BUCKETS, registry=registry)
        self.batch_requests = Histogram("hypermerge_batch_requests",
                                        "Requests merged into one model run (encoder endpoints).",
                                        buckets=SIZE_BUCKETS, registry=registry)
        self.inference = Histogram("hypermerge_inference_duration_seconds",
                                   "One model run: an encoder batch or one generation step.", ["kind"],
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("hypermerge_tokens", "Tokens processed: prompt (input) or completion (generated).",
                              ["kind"], registry=registry)
        self.rejected = Counter("hypermerge_rejected", "Requests refused for capacity (429 queue_full; 503 "
                                "draining or timeout).", ["endpoint", "reason"], registry=registry)
        self.cancelled = Counter("hypermerge_cancelled", "Requests whose client left before the answer: queued "
                                 "(never computed) or running (generation stopped).", ["endpoint", "stage"],
                                 registry=registry)
        self.waiting = Gauge("hypermerge_queue_waiting", "Admitted requests waiting for the model.",
                             multiprocess_mode="livesum", registry=registry)

    def observe_batch(self, items: int, requests: int) -> None:
        self.batch_size.observe(items)
        self.batch_requests.observe(requests)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def worker_exited(self) -> None:
        """Drop this worker's live gauges from the multiprocess sums."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request with its status and full duration.

    Pure ASGI (not Starlette's BaseHTTPMiddleware) so that a streamed response is timed to its last
    byte and nothing is buffered. Paths outside ``endpoints`` share the label "other", which keeps
    the label set bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500  # what the client gets if the app fails before answering
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # which worker process answered (with --workers K, for debugging and load checks)
                message = {**message, "headers": [*message.get("headers", []), (b"x-hypermerge-pid", self.pid)]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
