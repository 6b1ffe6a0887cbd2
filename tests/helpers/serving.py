"""A `hypermerge serve` subprocess for the tests, the app in a thread of the test process, and raw
HTTP requests whose bodies can be held back or whose clients hang up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.helpers.common import subprocess_env


class Server:
    """``hypermerge serve`` in a subprocess, on 127.0.0.1 and a port the system picks (--port 0)."""

    def __init__(self, export_dir: Path, *options: str, env: dict[str, str] | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hm-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hypermerge", "serve", str(export_dir), "--host", "127.0.0.1", "--port", "0",
             *options], env=subprocess_env(**(env or {})), stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = ""

    def wait_ready(self, timeout: float = 120.0) -> Server:
        """Read the announced address, then wait until /health answers."""
        line = self.process.stdout.readline()  # the first line names the address; EOF if start-up failed
        if "http://" not in line:
            self.process.wait(timeout=30)
            raise AssertionError(f"server did not start: {line!r}\n{self.stderr()}")
        self.url = line.split("on http://", 1)[1].split()[0]
        self.url = f"http://{self.url}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:  # open with or without keys
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.stderr()}")
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def signal(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (killed after ``timeout``); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()
        os.unlink(self.log.name)
        return self.process.returncode


class ThreadServer:
    """``create_app(model, settings)`` under uvicorn in a thread of the test process, on a free
    loopback port: the tests can reach into the app (``service``) and replace parts of the model.

    Use as a context manager; leaving it stops the server (in-flight requests finish first).
    """

    def __init__(self, model, settings=None):
        import uvicorn

        from hypermerge.serve.app import ServeSettings, create_app
        from hypermerge.serve.server import bind

        settings = settings or ServeSettings()
        self.app = create_app(model, settings)
        self.service = self.app.state.service
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def metric(url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """One sample of /metrics (0 if absent), parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout`` s (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def open_request(url: str, path: str, body: dict, *, held_back: int = 0, headers: dict | None = None) -> RawRequest:
    """A POST on its own connection, its last ``held_back`` body bytes not sent yet."""
    return RawRequest(url, path, json.dumps(body).encode(), held_back, headers or {})


class RawRequest:
    """An HTTP/1.1 request over a plain socket: hold back the end of its body, or hang up early."""

    def __init__(self, url: str, path: str, body: bytes, held_back: int, headers: dict):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        cut = len(body) - held_back
        self.sock.sendall(head + body[:cut])
        self.rest = body[cut:]

    def finish(self) -> tuple[int, dict[str, str], dict]:
        """Send the rest of the body; the status, headers and JSON body of the answer."""
        self.sock.sendall(self.rest)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection without answering"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            body += self.sock.recv(65536)
        self.sock.close()
        return int(lines[0].split()[1]), headers, json.loads(body)

    def hang_up(self) -> None:
        self.sock.close()
