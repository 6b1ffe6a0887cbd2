"""``hypermerge serve``: load an exported directory, bind the port, run uvicorn.

Everything that can fail at start-up (not an exported directory, no tokenizer, the provider
missing from this onnxruntime, the port taken) fails before uvicorn starts, as one HypermergeError
line. The socket is bound here and handed to uvicorn, so "port in use" is ours to report and
``--port 0`` can print the port the system picked.

With ``--workers K > 1`` uvicorn's supervisor starts K processes sharing the socket; each loads the
model itself (:func:`app_from_env`, from settings passed in the environment) and metrics are summed
across them through prometheus_client's multiprocess directory.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, lets in-flight requests finish (streams
included, up to ``graceful_timeout`` seconds), then the app drains its batch queue and exits 0.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from hypermerge.errors import HypermergeError
from hypermerge.runtime.model import OnnxModel
from hypermerge.serve.app import create_app
from hypermerge.serve.auth import exposure_warning
from hypermerge.serve.metrics import MULTIPROC_ENV, Metrics
from hypermerge.serve.settings import ServeSettings

NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
SETTINGS_ENV = "HYPERMERGE_SERVE_SETTINGS"  # JSON {"path": ..., **ServeSettings} for worker processes

log = logging.getLogger("hypermerge.serve")


def load_model(path: str | Path, settings: ServeSettings) -> OnnxModel:
    """Load the exported directory with the settings' provider and thread count.

    Raises:
        CheckpointError: the directory does not exist.
        ExportError: no loadable model.onnx in it.
        BackendUnavailableError: the provider is not in this onnxruntime.
    """
    threads = settings.threads
    if threads is None and settings.workers > 1:  # workers share the cores rather than oversubscribe them
        threads = max(1, (os.cpu_count() or 1) // settings.workers)
    # No spinning: between model runs the worker's other threads (event loop, tokenizer) need the
    # cores that onnxruntime's idle threads would otherwise keep busy-waiting on (benchmarks/RESULTS.md).
    return OnnxModel.load(path, provider=settings.provider, threads=threads, session_config=NO_SPINNING,
                          model_file=settings.model_file)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (what uvicorn would bind), or a one-line error.

    Raises:
        HypermergeError: the address is in use, not available here, or not allowed.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections whose socket
    # says TCP; without it, Nagle's algorithm and delayed ACKs added ~40 ms to each response
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise HypermergeError(f"port {port} on {host} is already in use",
                                  hint="stop what listens there, or pass another --port (0 picks a free one)") from None
        raise HypermergeError(f"cannot listen on {host}:{port} ({exc.strerror})",
                              hint="check --host and --port") from None
    sock.set_inheritable(True)  # worker processes inherit it
    return sock


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _uvicorn_config(app, settings: ServeSettings, **extra) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, workers=settings.workers,
                          log_level="warning" if settings.quiet else "info", access_log=not settings.quiet,
                          timeout_graceful_shutdown=settings.graceful_timeout, lifespan="on", **extra)


def serve(path: str | Path, settings: ServeSettings | None = None, *,
          announce: Callable[[str], None] = print, warn: Callable[[str], None] = _print_stderr) -> None:
    """Serve an exported directory until SIGTERM or Ctrl-C.

    Args:
        path: a directory written by ``hypermerge export``.
        settings: host, port, provider, batching, workers, API keys...
        announce: gets the one line saying what is served where (printed by default).
        warn: gets the one-line warning for a server open to the network without an API key
            (stderr by default).

    Raises:
        HypermergeError: a start-up failure (see the module docstring).
    """
    settings = settings or ServeSettings()
    sock = bind(settings.host, settings.port)  # first: a taken port is known before a long model load
    try:
        # in the parent even with several workers: start-up errors surface here, as one line
        model = load_model(path, settings)
        app = create_app(model, settings)
    except BaseException:
        sock.close()
        raise
    announce(announcement(model, settings, sock))
    warning = exposure_warning(settings.host, settings.api_keys)
    if warning is not None:
        warn(warning)
    settings = dataclasses.replace(settings, port=sock.getsockname()[1])
    if settings.workers == 1:
        _run_one(app, settings, sock)
    else:
        del model, app  # each worker loads its own
        _run_workers(path, settings, sock)


def announcement(model: OnnxModel, settings: ServeSettings, sock: socket.socket) -> str:
    """The one line saying what is served where, and how (the number of API keys, never which)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return (f"serving {model.path} ({model.task}, {model.provider}) on http://{shown}:{port} "
            f"with {settings.workers} worker{'s' if settings.workers > 1 else ''}, "
            f"max batch {settings.max_batch}, max wait {settings.max_wait_ms:g} ms, max queue {settings.queue_limit}"
            + (f", request timeout {settings.request_timeout:g} s" if settings.request_timeout else "")
            + (f", adapters {', '.join(sorted(settings.adapters))}" if settings.adapters else "")
            + (f", {len(settings.api_keys)} API key{'s' if len(settings.api_keys) > 1 else ''}"
               if settings.api_keys else ""))


def _run_one(app, settings: ServeSettings, sock: socket.socket) -> None:
    """Serve ``app`` in this process until SIGTERM or Ctrl-C."""
    server = uvicorn.Server(_uvicorn_config(app, settings))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with this
    # handler in place that ends in a normal return (exit 0), not a death by SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _run_workers(path: str | Path, settings: ServeSettings, sock: socket.socket) -> None:
    """Serve with ``settings.workers`` processes sharing ``sock``, each loading the model itself."""
    metrics_dir = tempfile.mkdtemp(prefix="hypermerge-metrics-")
    # adapter directories made absolute: what the parent checked is what the workers load
    settings = dataclasses.replace(settings, adapters={name: str(Path(d).absolute()) for name, d in
                                                       settings.adapters.items()})
    os.environ[SETTINGS_ENV] = json.dumps({"path": str(Path(path).absolute()), **dataclasses.asdict(settings)})
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in each worker
    try:
        config = _uvicorn_config("hypermerge.serve.server:app_from_env", settings, factory=True)
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def app_from_env():
    """The app of one worker process (uvicorn calls this factory in each worker)."""
    values = json.loads(os.environ[SETTINGS_ENV])
    path = values.pop("path")
    settings = ServeSettings(**values)
    return create_app(load_model(path, settings), settings, metrics=Metrics(os.environ.get(MULTIPROC_ENV)))
