"""Start-up errors as one line, several worker processes with summed metrics, and SIGTERM letting
in-flight requests finish."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.serve.app import ServeSettings
from hypermerge.serve.server import bind
from tests.helpers.common import subprocess_env
from tests.helpers.serving import Server

TEXTS = ["first in flight", "second one, a little longer than the first", "third", "fourth text", "fifth"]


def counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_workers_share_the_socket_and_metrics(exports):
    """Two worker processes: both answer (the kernel spreads connections) and /metrics, whichever
    worker answers it, reports the sum over both."""
    export = exports["feature-extraction"]
    server = Server(export, "--workers", "2", "-q").wait_ready()
    try:
        pids, answered = set(), 0
        for _ in range(200):  # bounded: stops as soon as both workers have answered
            response = httpx.post(f"{server.url}/v1/embeddings", json={"input": "both workers"}, timeout=30)
            assert response.status_code == 200
            answered += 1
            pids.add(response.headers["x-hypermerge-pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2
        for _ in range(3):  # several scrapes, whichever worker answers: the same total
            assert counter(server.url, "hypermerge_requests_total", endpoint="/v1/embeddings",
                           status="200") == answered
    finally:
        assert server.terminate() == 0


def _send_partial(url: str, text: str) -> tuple[socket.socket, bytes]:
    """Start an embeddings request and hold back the end of its body: the request is in flight."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"input": text}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    return sock, body[5:]


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_sigterm_finishes_in_flight_requests(exports):
    """Requests in flight (their bodies half sent) when SIGTERM arrives: the server stops listening,
    still answers each one correctly once its body is complete, and exits 0."""
    export = exports["feature-extraction"]
    server = Server(export, "-q").wait_ready()
    port = int(server.url.rsplit(":", 1)[1])
    try:
        partial = [_send_partial(server.url, text) for text in TEXTS]
        deadline = time.monotonic() + 60
        # all of them are inside the app (plus the /metrics request itself)
        while counter(server.url, "hypermerge_requests_in_flight") < len(TEXTS) + 1:
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.05)
        server.signal()
        while True:  # shutdown has begun once the listening socket is closed
            assert time.monotonic() < deadline, "the server kept listening after SIGTERM"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        answers = []
        for sock, rest in partial:
            sock.sendall(rest)
            answers.append(_read_response(sock))
            sock.close()
        assert server.process.wait(timeout=60) == 0, server.stderr()
        assert "server stopped" in server.process.stdout.read()
    finally:
        server.terminate()
    model = hm.OnnxModel.load(export, provider="cpu")
    for text, (status, body) in zip(TEXTS, answers, strict=True):
        assert status == 200, body
        np.testing.assert_array_equal(np.float32(body["data"][0]["embedding"]), model.embed([text])[0])


def test_port_in_use_is_one_line(exports):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "hypermerge", "serve", str(exports["causal-lm"]),
                                 "--port", str(port)], env=subprocess_env(), capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"hypermerge: error: port {port} on 127.0.0.1 is already in use: stop what "
                                     "listens there, or pass another --port (0 picks a free one).")


@pytest.mark.parametrize("case", ["missing dir", "not an export", "no tokenizer", "no onnxruntime provider",
                                  "bad settings"])
def test_start_up_errors_are_one_line(exports, tmp_path, case):
    export = exports["sequence-classification"]
    bare = tmp_path / "bare"  # an export without its tokenizer files
    bare.mkdir()
    for name in ("model.onnx", "config.json"):
        shutil.copy(export / name, bare / name)
    args = {"missing dir": [str(tmp_path / "nope")], "no tokenizer": [str(bare)],
            "not an export": [str(tmp_path)],
            "no onnxruntime provider": [str(export), "--provider", "tensorrt"],
            "bad settings": [str(export), "--max-batch", "0", "--workers", "0"]}[case]
    result = CliRunner().invoke(cli, ["serve", *args, "--port", "0"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypermerge: error: "), result.output
    expected = {"missing dir": "not found", "not an export": "ONNX model not found", "no tokenizer": "no tokenizer",
                "no onnxruntime provider": "TensorrtExecutionProvider",
                "bad settings": "--max-batch must be at least 1 (got 0); --workers must be at least 1"}[case]
    assert expected in lines[0]


def test_bind_reports_the_port_picked():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
        with pytest.raises(hm.HypermergeError, match="already in use"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    with pytest.raises(hm.ConfigError, match="max-wait-ms"):
        ServeSettings(max_wait_ms=-1)
