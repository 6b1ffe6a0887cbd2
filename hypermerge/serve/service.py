"""The state behind the endpoints: the model, its inference thread, the micro-batcher, the queue, the limits.

All model runs of a worker go through one thread: onnxruntime already spreads a run over the cores,
and two runs at once would only compete for them. Tokenization runs in a thread pool, off the event
loop. Encoder requests are micro-batched (:mod:`hypermerge.serve.batching`); generation requests are
not, but their steps interleave, one forward pass at a time, on the same inference thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from hypermerge.errors import ConfigError, HypermergeError
from hypermerge.runtime.contract import CAUSAL_LM, FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION
from hypermerge.runtime.model import OnnxModel, StreamStep
from hypermerge.serve.backpressure import Rejected, RequestQueue, Ticket
from hypermerge.serve.batching import MicroBatcher, QueueTimeout, length_groups
from hypermerge.serve.disconnect import ClientGone, unless_disconnected
from hypermerge.serve.errors import APIError, error_response
from hypermerge.serve.metrics import Metrics
from hypermerge.serve.schemas import CompletionRequest
from hypermerge.serve.settings import ServeSettings

# the endpoint each task serves; the other two answer 404 with a reason
TASK_ENDPOINTS = {FEATURE_EXTRACTION: "/v1/embeddings", SEQUENCE_CLASSIFICATION: "/v1/classify",
                  CAUSAL_LM: "/v1/completions"}
CPU_RUN_COST = 16.0
_ARRIVING = "hypermerge.arriving"  # scope key: this request still counts in Service.arriving
TICKET_KEY = "hypermerge.ticket"  # scope key: the request's place in the queue (backpressure.Ticket)
T = TypeVar("T")


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
        # encoder requests received (by RequestGate) but not yet handed to the batcher: the ones a
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
        ticket: Ticket | None = scope.get(TICKET_KEY)
        if ticket is None:  # not admitted by RequestGate (an app mounted without it)
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
            ticket: Ticket | None = request.scope.get(TICKET_KEY)
            stage = "queued" if ticket is not None and ticket.waiting else "running"
            self.metrics.cancelled.labels(request.url.path, stage).inc()
            raise APIError(499, "the client closed the request", code="client_closed_request") from None

    def rejection(self, exc: Rejected, endpoint: str) -> JSONResponse:
        """The 429/503 answer to a request refused for capacity, counted."""
        self.metrics.rejected.labels(endpoint, exc.reason).inc()
        response = error_response(exc.status, exc.message, code=exc.reason, kind="server_overloaded")
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
        ticket: Ticket | None = scope.get(TICKET_KEY)
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
