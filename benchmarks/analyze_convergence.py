"""Steps (and training seconds) for a method to reach the baseline's final eval loss, per seed; loss curves.

    python benchmarks/analyze_convergence.py runs/conv/*.json --baseline adalora --method hyperadalora \\
        --plot benchmarks/convergence_minilm.png

For each seed: target = the baseline's eval loss at its last step; the method's first eval step whose
loss is <= target, divided by the baseline's step count (the ratio the paper's claim is about), and
the method's training seconds up to that step divided by the baseline's total. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(paths: list[Path]) -> dict[tuple[str, int], dict]:
    runs = {}
    for path in paths:
        record = json.loads(path.read_text())
        runs[(record.get("label") or record["method"], record["seed"])] = record
    return runs


def first_reach(evals: list[dict], target: float) -> dict | None:
    for point in evals:
        if point["step"] > 0 and point["loss"] <= target:
            return point
    return None


def analyze(runs: dict, baseline: str, method: str) -> tuple[list[dict], dict]:
    rows = []
    for (name, seed), base in sorted(runs.items()):
        if name != baseline or (method, seed) not in runs:
            continue
        other = runs[(method, seed)]
        target = base["evals"][-1]["loss"]
        reached = first_reach(other["evals"], target)
        row = {"seed": seed, "target": target, "baseline_steps": base["evals"][-1]["step"],
               "baseline_seconds": base["train_seconds"], "method_final": other["evals"][-1]["loss"],
               "baseline_acc": base["evals"][-1]["accuracy"], "method_acc": other["evals"][-1]["accuracy"]}
        if reached is not None:
            row |= {"steps": reached["step"], "seconds": reached["seconds"],
                    "step_ratio": reached["step"] / row["baseline_steps"],
                    "time_ratio": reached["seconds"] / row["baseline_seconds"]}
        rows.append(row)
    ratios = [r["step_ratio"] for r in rows if "step_ratio" in r]
    times = [r["time_ratio"] for r in rows if "time_ratio" in r]
    summary = {"seeds": len(rows), "reached": len(ratios)}
    if ratios:
        summary |= {"step_ratio_mean": statistics.fmean(ratios), "step_ratio_min": min(ratios),
                    "step_ratio_max": max(ratios), "time_ratio_mean": statistics.fmean(times),
                    "time_ratio_min": min(times), "time_ratio_max": max(times)}
    return rows, summary


def markdown(rows: list[dict], summary: dict, baseline: str, method: str) -> str:
    lines = [f"| seed | {baseline} final eval loss (acc) | {method} final eval loss (acc) | steps to reach | "
             "step ratio | train-time ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        reach = (f"{r['steps']} / {r['baseline_steps']} | {r['step_ratio']:.2f} | {r['time_ratio']:.2f}"
                 if "steps" in r else "not reached | – | –")
        lines.append(f"| {r['seed']} | {r['target']:.4f} ({r['baseline_acc']:.3f}) | "
                     f"{r['method_final']:.4f} ({r['method_acc']:.3f}) | {reach} |")
    if summary.get("reached"):
        lines.append(f"\nstep ratio mean {summary['step_ratio_mean']:.2f} (min {summary['step_ratio_min']:.2f}, "
                     f"max {summary['step_ratio_max']:.2f}) over {summary['reached']} of {summary['seeds']} seeds; "
                     f"train-time ratio mean {summary['time_ratio_mean']:.2f} "
                     f"(min {summary['time_ratio_min']:.2f}, max {summary['time_ratio_max']:.2f})")
    else:
        lines.append(f"\n{method} reached {baseline}'s final eval loss in none of {summary['seeds']} seeds")
    return "\n".join(lines)


def plot(runs: dict, methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    for color, method in zip(colors, methods, strict=False):
        curves = [r for (name, _), r in sorted(runs.items()) if name == method]
        for record in curves:
            steps = [p["step"] for p in record["evals"]]
            ax.plot(steps, [p["loss"] for p in record["evals"]], color=color, alpha=0.3, lw=1)
        if curves:
            steps = [p["step"] for p in curves[0]["evals"]]
            mean = [statistics.fmean(r["evals"][i]["loss"] for r in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=color, lw=2.2, label=f"{method} (mean of {len(curves)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baseline", default="adalora")
    parser.add_argument("--method", default="hyperadalora")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--thresholds", default="0.6,0.5", help="also report the first step at or below these losses")
    parser.add_argument("--title", default="all-MiniLM-L6-v2, movie-review sentiment")
    args = parser.parse_args()
    runs = load(args.runs)
    rows, summary = analyze(runs, args.baseline, args.method)
    print(markdown(rows, summary, args.baseline, args.method))
    print("\n| seed | " + " | ".join(f"steps to eval loss <= {t} ({args.baseline} / {args.method})"
                                    for t in args.thresholds.split(",")) + " |")
    print("|---|" + "---|" * len(args.thresholds.split(",")))
    for (name, seed), record in sorted(runs.items()):
        if name != args.baseline or (args.method, seed) not in runs:
            continue
        cells = []
        for threshold in (float(t) for t in args.thresholds.split(",")):
            reach = [first_reach(r["evals"], threshold) for r in (record, runs[(args.method, seed)])]
            cells.append(" / ".join(str(p["step"]) if p else "–" for p in reach))
        print(f"| {seed} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(runs, sorted({name for name, _ in runs}, key=lambda m: (m != args.baseline, m)), args.plot, args.title)


if __name__ == "__main__":
    main()
