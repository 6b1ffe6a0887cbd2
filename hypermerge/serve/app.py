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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypermerge.errors import ConfigError, HypermergeError
from hypermerge.runtime.contract import CAUSAL_LM, FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION
from hypermerge.runtime.model import OnnxModel, StreamStep
from hypermerge.serve.auth import ApiKeyMiddleware, key_problems
from hypermerge.serve.backpressure import Rejected, RequestQueue, Ticket, drain_on_signals
from hypermerge.serve.batching import MicroBatcher, QueueTimeout, length_groups
from hypermerge.serve.disconnect import ClientGone, unless_disconnected
from hypermerge.serve.metrics import Metrics, MetricsMiddleware
from hypermerge.serve.schemas import ClassifyRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("hypermerge.serve")

# the endpoint each task serves; the other two answer 404 with a reason
TASK_ENDPOINTS = {FEATURE_EXTRACTION: "/v1/embeddings", SEQUENCE_CLASSIFICATION: "/v1/classify",
                  CAUSAL_LM: "/v1/completions"}
CPU_RUN_COST = 16.0
QUEUE_BATCHES = 8  # the default --max-queue, in --max-batch units
_ARRIVING = "hypermerge.arriving"  # scope key: this request still counts in Service.arriving
_TICKET = "hypermerge.ticket"  # scope key: the request's place in the queue (backpressure.Ticket)
ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", *TASK_ENDPOINTS.values()})
T = TypeVar("T")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How ``hypermerge serve`` serves a directory (the CLI options).

    Args:
        host: address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
        port: TCP port (0: any free port, printed at start).
        provider: onnxruntime provider: auto, cpu, cuda or tensorrt.
        max_batch: most texts in one model run (1 turns micro-batching off).
        max_wait_ms: how long a batch may wait for more requests, from its oldest request's arrival.
        workers: uvicorn worker processes, each with its own copy of the model.
        threads: onnxruntime intra-op threads per worker (None: the cores divided among the workers).
        max_inputs: most texts (or prompts) in one request.
        max_body_bytes: largest request body (413 above).
        name: the model name reported to clients (None: the directory's name).
        graceful_timeout: seconds SIGTERM waits for in-flight requests before cancelling them.
        quiet: no access log.
        adapters: adapter name -> adapter directory (``--adapter NAME=DIR``): what requests may
            choose with ``"adapter": NAME`` (exports with ``--adapter-inputs`` only).
        api_keys: the keys ``/v1/*`` accepts as ``Authorization: Bearer KEY`` (empty: no auth).
            Never shown in the settings' repr.
        open_metrics: ``/metrics`` without a key even when keys are set (for a scraper on a private network).
        max_queue: most requests waiting for the model per worker before new ones get 429 (None:
            ``QUEUE_BATCHES`` × ``max_batch``, see :attr:`queue_limit`).
        request_timeout: seconds a request may wait for the model before it is answered 503 (None: no limit).
        model_file: the model in the directory: model.onnx, or model.int8.onnx / model.int4.onnx.

    Raises:
        ConfigError: every invalid value, in one message.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 2.0
    workers: int = 1
    threads: int | None = None
    max_inputs: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    name: str | None = None
    graceful_timeout: float = 30.0
    quiet: bool = False
    adapters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    api_keys: Sequence[str] = dataclasses.field(default=(), repr=False)
    open_metrics: bool = False
    max_queue: int | None = None
    request_timeout: float | None = None
    model_file: str = "model.onnx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))  # JSON (worker settings) gives a list
        problems = key_problems(self.api_keys)
        for name in self.adapters:
            if not ADAPTER_NAME.fullmatch(name):
                problems.append(f"--adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                                "(starting with a letter or digit)")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535 (got {self.port})")
        for field, least in (("max_batch", 1), ("workers", 1), ("max_inputs", 1), ("max_body_bytes", 1)):
            if getattr(self, field) < least:
                problems.append(f"--{field.replace('_', '-')} must be at least {least} (got {getattr(self, field)})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be at least 1 (got {self.threads})")
        if self.max_wait_ms < 0:
            problems.append(f"--max-wait-ms must be non-negative (got {self.max_wait_ms})")
        if self.graceful_timeout < 0:
            problems.append(f"--graceful-timeout must be non-negative (got {self.graceful_timeout})")
        if self.max_queue is not None and self.max_queue < 1:
            problems.append(f"--max-queue must be at least 1 (got {self.max_queue})")
        if self.request_timeout is not None and not self.request_timeout > 0:  # not: NaN fails too
            problems.append(f"--request-timeout must be a positive number of seconds (got {self.request_timeout})")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def queue_limit(self) -> int:
        """``max_queue``, or by default room for ``QUEUE_BATCHES`` full batches of one-text requests:
        the last one queued waits about that many model runs."""
        return self.max_queue if self.max_queue is not None else QUEUE_BATCHES * self.max_batch


class APIError(Exception):
    """An error answered to the client (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def token_limit(model: OnnxModel) -> int | None:
    """Most tokens the model takes in one sequence: its position table, or the tokenizer's limit."""
    limits = [model.config.get(key) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    tokenizer_limit = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # "no limit" is a huge int
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


class Service:
    """The state behind the endpoints: the model, its inference thread, the batcher, the limits."""

    def __init__(self, model: OnnxModel, settings: ServeSettings, metrics: Metrics):
        if model.tokenizer is None:
            raise ConfigError("the exported directory has no tokenizer files, so it cannot serve text",
                              hint="export from a model directory that has its tokenizer")
        self.model, self.settings, self.metrics = model, settings, metrics
        self.name = settings.name or model.path.name
        self.created = int(time.time())
        self.limit = token_limit(model)
        self.adapters = load_adapters(model, settings.adapters)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypermerge-model")
        # fixed cost of one more model run, in padded-token slots: ~16 measured for MiniLM on CPU
        # (benchmarks/RESULTS.md); on a GPU padding is cheap next to a launch, so one run per batch
        self.run_cost = CPU_RUN_COST if model.provider == "CPUExecutionProvider" else float("inf")
        self.batcher: MicroBatcher | None = None
        if model.task in (FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION):
            self.batcher = MicroBatcher(self._run_batch, max_batch=settings.max_batch,
                                        max_wait=settings.max_wait_ms / 1000, executor=self.executor,
                                        on_batch=metrics.observe_batch, more_coming=lambda: self.arriving > 0)
        # encoder requests received (by _RequestGate) but not yet handed to the batcher: the ones a
        # batch may wait for. Touched on the event loop thread only.
        self.arriving = 0
        # admission: at most queue_limit requests waiting; generation runs max_batch sequences at once
        self.queue = RequestQueue(settings.queue_limit, settings.request_timeout, slots=settings.max_batch,
                                  on_waiting=metrics.waiting.set)

    # --- encoders -------------------------------------------------------------------------------
    def _run_batch(self, key: Hashable, encoded: list[dict]) -> list:
        """A micro-batch of requests' texts through the model (on the inference thread).

        On CPU the batch runs as a few runs of similar lengths rather than one padded to its longest
        text: the compute of a CPU run grows with its padded size (``length_groups``). Padding
        changes no result: each text's output equals its output alone.
        """
        results: list = [None] * len(encoded)
        adapter = None if key is None else self.adapters[key]
        for group in length_groups([len(e["input_ids"]) for e in encoded], self.run_cost):
            start = time.perf_counter()
            feeds = self.model.pad_batch([encoded[i] for i in group])
            if self.model.task == FEATURE_EXTRACTION:
                outputs: Sequence = list(self.model.embed_feeds(feeds, adapter=adapter))
            else:
                outputs = self.model.classify_feeds(feeds, adapter=adapter)
            self.metrics.inference.labels(self.model.task).observe(time.perf_counter() - start)
            for i, output in zip(group, outputs, strict=True):
                results[i] = output
        return results

    def adapter_path(self, name: str | None) -> Path | None:
        """The directory of the adapter a request named (None: the base model).

        Raises:
            APIError: the server was not started with that adapter.
        """
        if name is None:
            return None
        path = self.adapters.get(name)
        if path is None:
            known = ", ".join(sorted(self.adapters))
            served = (f"this server serves the adapters {known}" if known else
                      "this server serves no adapters (start it with --adapter NAME=DIR)")
            raise APIError(400, f"unknown adapter {name!r}; {served}", param="adapter", code="unknown_adapter")
        return path

    def check_count(self, count: int, field: str) -> None:
        if count > self.settings.max_inputs:
            raise APIError(400, f"{field} has {count} items; this server takes at most {self.settings.max_inputs} "
                                f"per request (split it, or start the server with a larger --max-inputs)", param=field)

    def tokenize(self, texts: list[str], truncate: bool) -> list[dict]:
        """Token ids per text, unpadded; refuses texts over the model's limit unless ``truncate``.

        Raises:
            APIError: a text is too long.
        """
        tokenizer = self.model.tokenizer
        if truncate and self.limit:
            batch = tokenizer(texts, truncation=True, max_length=self.limit)
        else:
            batch = tokenizer(texts)
        encoded = [{key: batch[key][i] for key in ("input_ids", "token_type_ids") if key in batch}
                   for i in range(len(texts))]
        for i, item in enumerate(encoded):
            if self.limit and len(item["input_ids"]) > self.limit:
                where = f"input[{i}]" if len(texts) > 1 else "input"
                raise APIError(400, f"{where} has {len(item['input_ids'])} tokens; this model takes at most "
                                    f"{self.limit} (send shorter text, or \"truncate\": true)", param="input",
                               code="context_length_exceeded")
        return encoded

    def arrived(self, scope: Scope) -> None:
        """An encoder request came in: batches may wait for it until :meth:`submitted`."""
        self.arriving += 1
        scope[_ARRIVING] = [True]  # a shared cell: Starlette may hand the endpoint a copy of the scope

    def submitted(self, scope: Scope) -> None:
        """The request reached the batcher, or ended before it (idempotent)."""
        cell = scope.get(_ARRIVING)
        if cell and cell[0]:
            cell[0] = False
            self.arriving -= 1

    async def encode(self, texts: list[str], truncate: bool, key: Hashable, scope: Scope) -> tuple[list, int]:
        """Results per text (through the batcher) and the number of prompt tokens."""
        self.check_count(len(texts), "input")
        self.adapter_path(key)  # an unknown name fails here, before any work
        encoded = await run_in_threadpool(self.tokenize, texts, truncate)
        tokens = sum(len(item["input_ids"]) for item in encoded)
        self.metrics.tokens.labels("prompt").inc(tokens)
        assert self.batcher is not None
        self.submitted(scope)
        ticket: Ticket | None = scope.get(_TICKET)
        if ticket is None:  # not admitted by _RequestGate (an app mounted without it)
            return await self.batcher.submit(encoded, key), tokens
        deadline = ticket.deadline
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise self.queue.timed_out()  # already waited too long (a slow body, a slow tokenizer queue)

        def started() -> None:
            self.queue.observe_wait(ticket)
            ticket.started()

        try:
            return await self.batcher.submit(encoded, key, deadline=deadline, on_start=started), tokens
        except QueueTimeout:
            raise self.queue.timed_out() from None

    async def watched(self, request: Request, work: Awaitable[T]) -> T:
        """``work``'s result, or cancelled work and a 499 if the client disconnects first (counted as
        ``queued`` when nothing of it had started, ``running`` otherwise)."""
        try:
            return await unless_disconnected(request.receive, work)
        except ClientGone:
            ticket: Ticket | None = request.scope.get(_TICKET)
            stage = "queued" if ticket is not None and ticket.waiting else "running"
            self.metrics.cancelled.labels(request.url.path, stage).inc()
            raise APIError(499, "the client closed the request", code="client_closed_request") from None

    def rejection(self, exc: Rejected, endpoint: str) -> JSONResponse:
        """The 429/503 answer to a request refused for capacity, counted."""
        self.metrics.rejected.labels(endpoint, exc.reason).inc()
        response = _error(exc.status, exc.message, code=exc.reason, kind="server_overloaded")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    # --- generation -----------------------------------------------------------------------------
    def tokenize_prompts(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        """Token ids per prompt; refuses prompt + max_tokens over the model's context.

        Raises:
            APIError: a prompt is too long.
        """
        ids = self.model.tokenizer(prompts)["input_ids"]
        for i, prompt_ids in enumerate(ids):
            if self.limit and len(prompt_ids) + max_tokens > self.limit:
                where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
                raise APIError(400, f"{where} has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: "
                                    f"{len(prompt_ids) + max_tokens} tokens, over this model's context of {self.limit} "
                                    "(shorten the prompt or lower max_tokens)", param="prompt",
                               code="context_length_exceeded")
        return ids

    def _next_step(self, steps) -> StreamStep | None:
        start = time.perf_counter()
        step = next(steps, None)
        self.metrics.inference.labels(CAUSAL_LM).observe(time.perf_counter() - start)
        return step

    async def start_generation(self, scope: Scope) -> None:
        """Wait for one of the ``max_batch`` generation slots (held until the request ends).

        Raises:
            Rejected: 503, the request's ``--request-timeout`` passed first.
        """
        ticket: Ticket | None = scope.get(_TICKET)
        if ticket is not None:
            await self.queue.take_slot(ticket)

    async def steps(self, prompt_ids: list[int], body: CompletionRequest) -> AsyncIterator[StreamStep]:
        """Generation steps, each one forward pass queued on the inference thread (streams interleave)."""
        steps = self.model.stream(prompt_ids, body.max_tokens, body.temperature, body.top_p, seed=body.seed,
                                  stop=body.stops(), adapter=self.adapter_path(body.adapter))
        loop = asyncio.get_running_loop()
        while True:
            step = await loop.run_in_executor(self.executor, self._next_step, steps)
            if step is None:
                return
            self.metrics.tokens.labels("completion").inc()
            yield step
            if step.finish_reason is not None:
                return

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=True)
        self.metrics.worker_exited()


def load_adapters(model: OnnxModel, adapters: Mapping[str, str]) -> dict[str, Path]:
    """Name -> absolute directory of each ``--adapter NAME=DIR``, each loaded once to check it fits.

    Raises:
        ConfigError: adapters for an export without adapter inputs, or an adapter they cannot carry.
        HypermergeError: an adapter directory is missing or damaged, or made for another base model
            (the message names the adapter).
    """
    if not adapters:
        return {}
    if not model.accepts_adapters:
        raise ConfigError(f"--adapter {', '.join(adapters)}: this export takes no adapters per request (it was "
                          "exported without --adapter-inputs)", path=model.path,
                          hint="export with --adapter-inputs, or fold the adapter into a copy with hypermerge patch "
                               "and serve that")
    cache = model.adapter_scales
    cache.size = max(cache.size, len(adapters))  # every served adapter stays resolved
    out = {}
    for name, directory in adapters.items():
        path = Path(directory).absolute()
        try:
            cache.get(path)
        except HypermergeError as exc:
            exc.what = f"--adapter {name}: {exc.what}"
            exc.args = (exc.one_line(),)
            raise
        out[name] = path
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.batcher is not None:
            service.batcher.start()
        restore = drain_on_signals(service.queue)
        yield
        restore()
        await service.close()  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="hypermerge serve", version=_version(), lifespan=lifespan,
                  description=f"Serving {service.name} ({model.task}) on onnxruntime.")
    app.state.service = service
    app.add_middleware(_RequestGate, limit=settings.max_body_bytes, service=service)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open_metrics=settings.open_metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)  # outermost: counts everything

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> JSONResponse:
        return service.rejection(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and what this server serves."""
        return {"status": "ok", "model": service.name, "task": model.task, "provider": model.provider,
                "endpoint": TASK_ENDPOINTS[model.task], "adapters": sorted(service.adapters), "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        """The served model, in OpenAI's list shape, with the adapters requests may name."""
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "hypermerge", "task": model.task,
                                            "adapters": sorted(service.adapters)}]}

    def unsupported(path: str, task: str):
        async def endpoint(request: Request) -> JSONResponse:
            raise APIError(404, f"{path} needs a {task} export; this server serves {service.name}, a {model.task} "
                                f"export (its endpoint is {TASK_ENDPOINTS[model.task]})", code="unsupported_endpoint")
        return endpoint

    for task, path in TASK_ENDPOINTS.items():
        if task != model.task:
            app.add_api_route(path, unsupported(path, task), methods=["POST"], include_in_schema=False)

    if model.task == FEATURE_EXTRACTION:
        @app.post("/v1/embeddings")
        async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
            """Sentence embeddings (OpenAI's shape)."""
            vectors, tokens = await service.watched(request, service.encode(body.texts(), body.truncate,
                                                                            body.batch_key(), request.scope))
            data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
                    for i, v in enumerate(vectors)]
            return JSONResponse({"object": "list", "data": data, "model": service.name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    if model.task == SEQUENCE_CLASSIFICATION:
        @app.post("/v1/classify")
        async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
            """Label, score and every label's probability per text (label names from the config)."""
            results, tokens = await service.watched(request, service.encode(body.texts(), body.truncate,
                                                                            body.batch_key(), request.scope))
            data = [{"index": i, **result} for i, result in enumerate(results)]
            return JSONResponse({"object": "list", "data": data, "model": service.name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    if model.task == CAUSAL_LM:
        @app.post("/v1/completions", response_model=None)
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
                return StreamingResponse(_events(service, encoded, body, head), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            choices, completion_tokens = await service.watched(request, _complete(service, encoded, body))
            prompt_tokens = sum(map(len, encoded))
            return JSONResponse({**head, "choices": choices, "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})

    return app


class _TooLarge(Exception):
    pass


class _RequestGate:
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
        return _error(413, f"the request body {told}; this server takes at most {self.limit}",
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
            scope[_TICKET] = ticket
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


async def _complete(service: Service, encoded: list[list[int]], body: CompletionRequest) -> tuple[list[dict], int]:
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


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the OpenAI Python client asks for by default
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _events(service: Service, encoded: list[list[int]], body: CompletionRequest, head: dict) -> AsyncIterator[bytes]:
    """OpenAI's completion stream: one chunk per piece of text, the last with its finish_reason,
    optionally a usage chunk, then ``data: [DONE]``. A failure mid-stream sends an error event."""
    completion_tokens = 0
    try:
        for index, prompt_ids in enumerate(encoded):
            async for step in service.steps(prompt_ids, body):
                if step.text or step.finish_reason is not None:
                    yield _sse({**head, "choices": [{"index": index, "text": step.text, "logprobs": None,
                                                     "finish_reason": step.finish_reason}]})
                if step.finish_reason is not None:
                    completion_tokens += step.tokens
        if body.stream_options is not None and body.stream_options.include_usage:
            prompt_tokens = sum(map(len, encoded))
            yield _sse({**head, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
    except asyncio.CancelledError:  # the client disconnected (Starlette cancels the iterator): stop generating
        service.metrics.cancelled.labels("/v1/completions", "running").inc()
        raise
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, keep serving
        log.exception("streaming completion failed")
        yield _sse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                              "param": None, "code": None}})
    yield _sse("[DONE]")


def _version() -> str:
    from hypermerge._version import __version__

    return __version__
