"""Start-up errors as one line, several worker processes with summed metrics, and SIGTERM letting
in-flight requests finish."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from common import subprocess_env
from prometheus_client.parser import text_string_to_metric_families
from serving import Server

import hypermerge as hm
from hypermerge.cli import cli
from hypermerge.serve.app import ServeSettings
from hypermerge.serve.server import bind

TEXTS = ["first in flight", "second one, a little longer than the first", "third", "fourth text", "fifth"]


def counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_sigterm_finishes_in_flight_requests_and_workers_share_metrics(exports):
    """Two workers; a 3 s batching wait keeps requests in flight; SIGTERM arrives while they wait:
    every one still gets its right answer, new connections are refused, and the server exits 0."""
    export = exports["feature-extraction"]
    server = Server(export, "--workers", "2", "--max-wait-ms", "3000", "--max-batch", "64", "-q").wait_ready()
    try:
        # both workers answer (the kernel spreads connections), and /metrics sums them
        pids = set()
        for _ in range(200):  # bounded: stops as soon as both workers have answered
            pids.add(httpx.get(f"{server.url}/health", timeout=30).json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2
        health_total = counter(server.url, "hypermerge_requests_total", endpoint="/health", status="200")
        assert health_total >= 2  # from both processes (each served at least one)

        results: dict[int, httpx.Response | BaseException] = {}

        def request(i: int) -> None:
            try:
                results[i] = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[i]}, timeout=60)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                results[i] = exc

        threads = [threading.Thread(target=request, args=(i,)) for i in range(len(TEXTS))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        # wait until all are in flight: the gauge counts them (plus the /metrics request itself)
        while counter(server.url, "hypermerge_requests_in_flight") < len(TEXTS) + 1:
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.05)
        server.signal()
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0, server.stderr()
        assert "server stopped" in server.process.stdout.read()
    finally:
        server.terminate()
    model = hm.OnnxModel.load(export, provider="cpu")
    for i, text in enumerate(TEXTS):
        response = results[i]
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        np.testing.assert_array_equal(np.float32(response.json()["data"][0]["embedding"]), model.embed([text])[0])
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=5)


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
