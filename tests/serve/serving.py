"""A `hypermerge serve` subprocess for the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import subprocess_env


class Server:
    """``hypermerge serve`` in a subprocess, on 127.0.0.1 and a port the system picks (--port 0)."""

    def __init__(self, export_dir: Path, *options: str):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hm-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hypermerge", "serve", str(export_dir), "--host", "127.0.0.1", "--port", "0",
             *options], env=subprocess_env(), stdout=subprocess.PIPE, stderr=self.log, text=True)
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
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
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
