"""Benchmark: `hypermerge fold` vs PEFT's merge vs `cp -r`, wall time and peak RSS.

    python benchmarks/fold.py --layers 16 --workdir /tmp/hm-bench     # ~270M parameters, ~1.1 GB
    python benchmarks/fold.py --layers 32 --workdir /tmp/hm-bench     # ~540M parameters, ~2.1 GB

The model is a randomly initialised Llama (hidden 1024, intermediate 2816, vocab 32000, float32,
200 MB shards); the adapter is a PEFT LoRA r=16 on every linear layer of the blocks, made by PEFT
with random (as if trained) values. Three commands produce a model directory from it:

* ``hypermerge``: ``python -m hypermerge fold --adapter A --base B --out O -q``
* ``peft``: load the base (``AutoModelForCausalLM.from_pretrained``), ``PeftModel.from_pretrained``,
  ``merge_and_unload``, ``save_pretrained(max_shard_size="200MB")`` (this file's ``peft-merge``)
* ``cp``: ``cp -r B O``

Each command runs as its own process, ``--runs`` times, interleaved (hypermerge, peft, cp,
hypermerge, ...) after one warm-up round that fills the page cache; before each run the previous
output is deleted and ``sync`` flushes dirty pages, neither timed. Wall time is a monotonic clock
around the process; peak RSS is the kernel's ``ru_maxrss`` of the finished process (``wait4``).
The driver never imports torch, so the children's peak cannot inherit its resident set.
Medians are reported. Files are created under ``--workdir`` and deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 1024, 2816, 32000, 16
SHARD = "200MB"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(workdir: Path, layers: int) -> tuple[Path, Path]:
    """Create (once) the random base model and the PEFT LoRA adapter for ``layers`` layers."""
    base, adapter = workdir / f"base-{layers}", workdir / f"adapter-{layers}"
    if not (base / "config.json").exists() or not (adapter / "adapter_config.json").exists():
        subprocess.run([sys.executable, __file__, "make", "--layers", str(layers), "--workdir", str(workdir)],
                       check=True)
    return base, adapter


def _make_child(workdir: Path, layers: int) -> None:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float()
    base = workdir / f"base-{layers}"
    model.save_pretrained(base, max_shard_size=SHARD)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give it values as training would
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    lora.save_pretrained(workdir / f"adapter-{layers}")
    params = sum(p.numel() for p in model.parameters())
    print(f"made {layers}-layer Llama: {params / 1e6:.0f}M parameters, {_size(base) / 1e9:.2f} GB")


def _peft_merge_child(base: str, adapter: str, out: str) -> None:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, max_shard_size=SHARD)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def commands(base: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    return {
        "hypermerge": [sys.executable, "-m", "hypermerge", "fold", "--adapter", str(adapter), "--base", str(base),
                       "--out", str(out), "-q"],
        "peft": [sys.executable, __file__, "peft-merge", str(base), str(adapter), str(out)],
        "cp": ["cp", "-r", str(base), str(out)],
    }


def run_once(command: list[str], out: Path) -> tuple[float, int]:
    """One timed run: (wall seconds, peak RSS bytes) of the process."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({process.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def benchmark(workdir: Path, layers: int, runs: int) -> dict:
    base, adapter = make(workdir, layers)
    out = workdir / "out"
    table = commands(base, adapter, out)
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in table}
    for round_ in range(runs + 1):  # round 0 warms the page cache and is not counted
        for name, command in table.items():
            result = run_once(command, out)
            if round_:
                samples[name].append(result)
    shutil.rmtree(out, ignore_errors=True)
    summary = {"layers": layers, "base_bytes": _size(base), "runs": runs}
    for name, values in samples.items():
        walls, peaks = [v[0] for v in values], [v[1] for v in values]
        summary[name] = {"wall_s": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
                         "peak_rss_bytes": statistics.median(peaks)}
    hm, peft, cp = summary["hypermerge"], summary["peft"], summary["cp"]
    summary["ratios"] = {"time_vs_peft": hm["wall_s"] / peft["wall_s"],
                         "rss_vs_peft": hm["peak_rss_bytes"] / peft["peak_rss_bytes"],
                         "time_vs_cp": hm["wall_s"] / cp["wall_s"]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "make", "peft-merge"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--layers", type=int, nargs="+", default=[16])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-bench"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the models in --workdir")
    options = parser.parse_args()
    if options.mode == "make":
        options.workdir.mkdir(parents=True, exist_ok=True)
        _make_child(options.workdir, options.layers[0])
        return
    if options.mode == "peft-merge":
        _peft_merge_child(*options.args)
        return
    options.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for layers in options.layers:
            summary = benchmark(options.workdir, layers, options.runs)
            results.append(summary)
            print(json.dumps(summary, indent=2), flush=True)
    finally:
        if not options.keep:
            shutil.rmtree(options.workdir, ignore_errors=True)
    print("\n| layers | base size | command | wall (median, min-max) | peak RSS |")
    print("|---|---|---|---|---|")
    for summary in results:
        for name in ("hypermerge", "peft", "cp"):
            row = summary[name]
            print(f"| {summary['layers']} | {summary['base_bytes'] / 1e9:.2f} GB | {name} | {row['wall_s']:.2f} s "
                  f"({row['wall_min']:.2f}-{row['wall_max']:.2f}) | {row['peak_rss_bytes'] / 1e6:.0f} MB |")
    for summary in results:
        ratios = summary["ratios"]
        print(f"\n{summary['layers']} layers: hypermerge/peft time {ratios['time_vs_peft']:.2f}x, "
              f"peak RSS {ratios['rss_vs_peft']:.2f}x; hypermerge/cp time {ratios['time_vs_cp']:.2f}x")


if __name__ == "__main__":
    main()
