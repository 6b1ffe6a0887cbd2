"""``ServeSettings``: how ``hypermerge serve`` serves a directory (the CLI options), validated at once."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from hypermerge.errors import ConfigError
from hypermerge.serve.auth import key_problems

QUEUE_BATCHES = 8  # the default --max-queue, in --max-batch units
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
        model_file: the model in the directory: model.onnx, or model.int8.onnx / model.int4.onnx /
            model.fp16.onnx.

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
