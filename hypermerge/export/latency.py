"""Latency: PyTorch eager against the exported backend on the same inputs with the same threads.

Runs are interleaved in short blocks (torch ×5, backend ×5, torch ×5, ...) so that a noisy neighbour
or a change of clock speed hits both sides alike; the report gives p50 / p90 / p99 in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from hypermerge.export.onnx_export import call_wrapper, example_inputs
from hypermerge.export.parity import Case, causal_feeds
from hypermerge.export.report import LatencySection, ShapeTimings, Timing
from hypermerge.export.runtime import Runner
from hypermerge.export.tasks import CAUSAL_LM, IOContract
from hypermerge.fold.threads import torch_threads


def percentiles(times_s: list[float]) -> Timing:
    """p50 / p90 / p99 / mean in milliseconds."""
    ms = np.asarray(times_s) * 1e3
    return Timing(float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                  float(ms.mean()), int(ms.size))


def interleaved(functions: dict[str, Callable[[], object]], *, warmup: int = 3, iters: int = 30,
                block: int = 5) -> dict[str, Timing]:
    """Time each function ``iters`` times, alternating between them in blocks; percentiles per function.

    Each block starts with one untimed run: onnxruntime's worker threads keep spinning for a while
    after a run, and a torch call started inside that window loses its cores to them (measured:
    MiniLM b1×s16 on 2 threads, torch 9 ms alone, 22 ms when run right after onnxruntime).
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    while len(next(iter(times.values()))) < iters:
        runs = min(block, iters - len(next(iter(times.values()))))
        for name, fn in functions.items():
            fn()  # the switch-over run, untimed
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: percentiles(values) for name, values in times.items()}


def measure(backends: dict[str, Runner], wrapper: torch.nn.Module, contract: IOContract, vocab: int, *,
            batch: int, seq: int, threads: int | None, warmup: int = 3, iters: int = 30) -> LatencySection:
    """The ``latency`` section: one forward at (batch, seq) on PyTorch and on each backend.

    For causal LMs that forward is a prefill (past 0); a ``decode_step`` entry adds one new token on
    top of a cache of ``seq`` tokens, which is what generation spends its time on.

    Args:
        backends: label (``onnxruntime``, ``tensorrt``, ...) -> runner; runners carry their own threads.
        threads: torch's intra-op threads during the measurement (match the backends' sessions).

    Returns:
        The section; its ``to_dict`` is ``{"batch", "seq", "threads", "iterations", "torch": {...},
        <backend>: {...}, "ratio": {...}}`` (and ``decode_step`` for causal LMs).
    """
    timings: dict[str, ShapeTimings] = {}
    shapes = {"forward": Case(batch, seq)}
    if contract.task == CAUSAL_LM:
        shapes["decode_step"] = Case(batch, 1, past=seq)
    with torch_threads(threads):
        for label, case in shapes.items():
            if contract.task == CAUSAL_LM:
                feeds, _ = causal_feeds(wrapper, contract, vocab, case, seed=7)
            else:
                feeds = example_inputs(contract, vocab, batch=batch, seq=seq, seed=7)
            arrays = {name: tensor.numpy() for name, tensor in feeds.items()}
            functions: dict[str, Callable[[], object]] = {"torch": lambda f=feeds: call_wrapper(wrapper, contract, f)}
            for name, run in backends.items():
                functions[name] = lambda r=run, a=arrays: r(a)
            stats = interleaved(functions, warmup=warmup, iters=iters)
            ratio = {name: stats[name].p50_ms / stats["torch"].p50_ms for name in backends}
            timings[label] = ShapeTimings(stats, ratio)
    return LatencySection(batch, seq, threads or torch.get_num_threads(), iters, timings["forward"],
                          timings.get("decode_step"))
