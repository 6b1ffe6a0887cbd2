"""Where a decode step's time goes: onnxruntime's profiler on ours (int4; int4 on the --optimize
graph too when decode_peer.py --optimize wrote it) and onnxruntime-genai's int4 graph, both fed the same 16-token prompt then N single-token steps with plain onnxruntime
(same threads), time summed by operator type. Run after benchmarks/decode_peer.py (its --work).

    python benchmarks/decode_profile.py [--work DIR] [--steps 16] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypermerge.packaged import cache_dir  # noqa: E402


def profile(path: Path, feeds_for, steps: int, threads: int) -> dict[str, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    past, wall = None, 0.0
    for step in range(steps + 1):
        feeds = feeds_for(step, past)
        start = time.perf_counter()
        result = session.run(None, feeds)
        wall += (time.perf_counter() - start) * (step > 0)
        past = dict(zip(outputs, result, strict=True))
    trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3
    total = sum(by_op.values())
    return {op: round(ms / total, 4) for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])} | {
        "_kernel_ms_per_step": round(total / (steps + 1), 2), "_run_ms_per_decode_step": round(wall * 1e3 / steps, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-decode-peer")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    prompt = np.arange(100, 116, dtype=np.int64)[None]
    layers, kv_heads, head = 30, 3, 64

    def ours_feeds(step, past):
        ids = prompt if step == 0 else np.array([[200 + step]], np.int64)
        total = prompt.shape[1] + step
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(total - ids.shape[1], total, dtype=np.int64)[None]}
        for i in range(layers):
            for kind in ("key", "value"):
                feeds[f"past_{kind}_{i}"] = (np.zeros((1, kv_heads, 0, head), np.float32) if past is None
                                             else past[f"present_{kind}_{i}"])
        return feeds

    def peer_feeds(step, past):
        ids = prompt if step == 0 else np.array([[200 + step]], np.int64)
        total = prompt.shape[1] + step
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
        for i in range(layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = (np.zeros((1, kv_heads, 0, head), np.float32) if past is None
                                                        else past[f"present.{i}.{kind}"])
        return feeds

    results = {"ours int4": profile(args.work / "ours" / "model.int4.onnx", ours_feeds, args.steps,
                                    args.threads)}
    optimized = args.work / "ours" / "model.optimized.int4.onnx"  # decode_peer.py --optimize
    if optimized.exists():
        results["ours int4 optimized"] = profile(optimized, ours_feeds, args.steps, args.threads)
    results |= {"peer int4": profile(args.work / "peer-int4" / "model.onnx", peer_feeds, args.steps,
                                    args.threads)}
    for name, shares in results.items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:8] if not op.startswith("_"))
        print(f"{name}: {shares['_kernel_ms_per_step']} ms of kernels per step, session.run "
              f"{shares['_run_ms_per_decode_step']} ms per decode step; {top}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
