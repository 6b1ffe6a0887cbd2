"""Tables and plots for the HyperAdaLoRA-vs-AdaLoRA convergence runs of ``convergence.py`` (issue 14).

    python benchmarks/analyze_convergence.py benchmarks/results/conv_minilm_*.json --task minilm \\
        --plot benchmarks/convergence_minilm.png

* sweep: per method and learning rate (seed 0), final eval loss on the curve subset, area under the
  eval-loss curve, final smoothed training loss; the best rate per method = the lowest final
  eval loss on the curve subset (validation data, never the final test set);
* seeds at each method's best rate, paired by seed: the steps HyperAdaLoRA needs for its smoothed
  training loss (trailing mean over ``--window`` steps) to reach AdaLoRA's final smoothed training
  loss, as a ratio of AdaLoRA's steps; the training seconds to that point over AdaLoRA's total
  (wall-time ratio); the median step-time ratio; eval-loss AUC; final loss and accuracy on the
  held-out set with 95% intervals and the paired per-example loss difference with its interval;
* ablations (``label`` other than the two methods): the same figures against seed 0;
* mask churn: components pruned and restored over all allocations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

METHODS = ("adalora", "hyperadalora")


def load(paths: list[Path], task: str) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in paths]
    return [r for r in runs if r.get("task") == task and "final" in r]


def smoothed(losses: list[float], window: int) -> list[float | None]:
    """Trailing mean over ``window`` steps; None before the window fills. Index i = step i + 1."""
    out, total = [], 0.0
    for i, x in enumerate(losses):
        total += x - (losses[i - window] if i >= window else 0.0)
        out.append(total / window if i + 1 >= window else None)
    return out


def auc(evals: list[dict]) -> float:
    """Area under the eval-loss curve (trapezoids), divided by the steps: a mean eval loss."""
    area = sum((b["step"] - a["step"]) * (a["loss"] + b["loss"]) / 2 for a, b in zip(evals, evals[1:], strict=False))
    return area / (evals[-1]["step"] - evals[0]["step"])


def reach(run: dict, target: float, window: int) -> int | None:
    for i, value in enumerate(smoothed(run["train_loss"], window)):
        if value is not None and value <= target:
            return i + 1
    return None


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """Mean per-example loss difference b - a on the final set and its 95% half-width."""
    diffs = [y - x for x, y in zip(a["final_per_example"]["loss"], b["final_per_example"]["loss"], strict=True)]
    mean = statistics.fmean(diffs)
    return mean, 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def best_lrs(runs: list[dict]) -> dict[str, float]:
    best = {}
    for method in METHODS:
        sweep = [r for r in runs if r["label"] == method and r["seed"] == 0]
        if sweep:
            best[method] = min(sweep, key=lambda r: r["evals"][-1]["loss"])["lr"]
    return best


def sweep_table(runs: list[dict], window: int) -> str:
    lines = ["| method | lr | final eval loss (curve subset) | eval-loss AUC | final smoothed train loss | "
             "held-out loss [95% CI] | held-out accuracy [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in runs if r["label"] in METHODS and r["seed"] == 0), key=lambda r: (r["label"], r["lr"])):
        final = r["final"]
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['evals'][-1]['loss']:.4f} | {auc(r['evals']):.4f} | "
                     f"{smoothed(r['train_loss'], window)[-1]:.4f} | {final['loss']:.4f} "
                     f"[{final['loss_ci'][0]:.4f}, {final['loss_ci'][1]:.4f}] | {final['accuracy']:.3f} "
                     f"[{final['accuracy_ci'][0]:.3f}, {final['accuracy_ci'][1]:.3f}] |")
    return "\n".join(lines)


def compare(base: dict, other: dict, window: int) -> dict:
    target = smoothed(base["train_loss"], window)[-1]
    steps = len(base["train_loss"])
    reached = reach(other, target, window)
    row = {"target": target, "steps": reached, "step_ratio": reached / steps if reached else None,
           "time_ratio": (sum(other["step_seconds"][:reached]) / sum(base["step_seconds"])) if reached else None,
           "step_time_ratio": statistics.median(other["step_seconds"]) / statistics.median(base["step_seconds"]),
           "auc": (auc(base["evals"]), auc(other["evals"])), "difference": paired_difference(base, other)}
    eval_target = base["evals"][-1]["loss"]
    row["base_steps"] = reach(base, target, window)  # AdaLoRA's own first step at it (noise: may be < its last)
    row["eval_steps"] = next((p["step"] for p in other["evals"] if p["step"] > 0 and p["loss"] <= eval_target), None)
    return row


def fmt_final(run: dict) -> str:
    f = run["final"]
    return (f"{f['loss']:.4f} [{f['loss_ci'][0]:.3f}, {f['loss_ci'][1]:.3f}] / {f['accuracy']:.3f} "
            f"[{f['accuracy_ci'][0]:.3f}, {f['accuracy_ci'][1]:.3f}]")


def seed_table(runs: list[dict], best: dict[str, float], window: int) -> tuple[str, list[dict]]:
    lines = ["| seed | AdaLoRA final smoothed train loss | HyperAdaLoRA steps to reach it (ratio) | wall-time ratio "
             "to that point | step-time ratio | eval-loss AUC A / H | held-out loss / acc, AdaLoRA | "
             "held-out loss / acc, HyperAdaLoRA | paired loss difference H - A [95% CI] | "
             "HyperAdaLoRA eval steps to AdaLoRA's final eval loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    by_seed = {}
    for r in runs:
        if r["label"] in METHODS and r["lr"] == best.get(r["label"]):
            by_seed.setdefault(r["seed"], {})[r["label"]] = r
    for seed, pair in sorted(by_seed.items()):
        if len(pair) < 2:
            continue
        row = compare(pair["adalora"], pair["hyperadalora"], window) | {"seed": seed}
        rows.append(row)
        reached = (f"{row['steps']} / {len(pair['adalora']['train_loss'])} ({row['step_ratio']:.2f}); "
                   f"AdaLoRA first at {row['base_steps']}" if row["steps"] else "not reached")
        time_ratio = f"{row['time_ratio']:.2f}" if row["time_ratio"] else "–"
        mean, half = row["difference"]
        lines.append(f"| {seed} | {row['target']:.4f} | {reached} | {time_ratio} | {row['step_time_ratio']:.2f} | "
                     f"{row['auc'][0]:.4f} / {row['auc'][1]:.4f} | {fmt_final(pair['adalora'])} | "
                     f"{fmt_final(pair['hyperadalora'])} | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] | "
                     f"{row['eval_steps'] or 'not reached'} |")
    return "\n".join(lines), rows


def ablation_table(runs: list[dict], best: dict[str, float], window: int) -> str:
    adalora = next((r for r in runs if r["label"] == "adalora" and r["seed"] == 0 and r["lr"] == best.get("adalora")),
                   None)
    lines = ["| variant (seed 0) | lr | trainable | final eval loss (curve subset) | eval-loss AUC | held-out loss / acc "
             "| steps to AdaLoRA's final smoothed train loss | pruned / restored over all allocations |",
             "|---|---|---|---|---|---|---|---|"]
    variants = [r for r in runs if r["seed"] == 0 and (r["label"] not in METHODS or r["label"] == "hyperadalora")]
    for r in sorted(variants, key=lambda r: (r["label"] != "hyperadalora", r["label"], r["lr"])):
        if r["label"] == "hyperadalora" and not any(v["lr"] == r["lr"] for v in variants if v["label"] != "hyperadalora"):
            continue
        steps = reach(r, smoothed(adalora["train_loss"], window)[-1], window) if adalora else None
        churn = (sum(c["pruned"] for c in r["churn"]), sum(c["restored"] for c in r["churn"]))
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['trainable_parameters']:,} | {r['evals'][-1]['loss']:.4f} | "
                     f"{auc(r['evals']):.4f} | {fmt_final(r)} | {steps or 'not reached'} | {churn[0]} / {churn[1]} |")
    return "\n".join(lines)


def churn_table(runs: list[dict]) -> str:
    lines = ["| run | allocations that changed the mask | pruned | restored (came back) |", "|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["label"], r["lr"], r["seed"])):
        if r["label"] in METHODS:
            lines.append(f"| {r['label']} lr {r['lr']:g} seed {r['seed']} | {len(r['churn'])} | "
                         f"{sum(c['pruned'] for c in r['churn'])} | {sum(c['restored'] for c in r['churn'])} |")
    return "\n".join(lines)


def plot(runs: list[dict], best: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, method in zip(("tab:blue", "tab:red"), METHODS, strict=True):
        curves = [r for r in runs if r["label"] == method and r["lr"] == best.get(method)]
        if not curves:
            continue
        steps = [p["step"] for p in curves[0]["evals"]]
        values = [[r["evals"][i]["loss"] for r in curves] for i in range(len(steps))]
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        ax.plot(steps, [statistics.fmean(v) for v in values], color=color, lw=2,
                label=f"{method} lr {best[method]:g} (mean, band = min-max of {len(curves)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval cross-entropy (curve subset)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--task", required=True)
    parser.add_argument("--window", type=int, default=25, help="steps in the trailing mean of the training loss")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--title", default=None)
    parser.add_argument("--lrs", default=None,
                        help="the rates of the seeded comparison, e.g. adalora=1e-2,hyperadalora=4e-3 (default: the best)")
    args = parser.parse_args()
    runs = load(args.runs, args.task)
    best = best_lrs(runs)
    print(f"## {args.task}: best learning rates of the sweep {best}", end="")
    if args.lrs:
        best = {k: float(v) for k, v in (item.split("=") for item in args.lrs.split(","))}
        print(f"; seeded comparison at {best}", end="")
    print(f"\n\n### Sweep (seed 0)\n\n{sweep_table(runs, args.window)}")
    table, rows = seed_table(runs, best, args.window)
    print(f"\n### Seeds, paired, at {best}\n\n{table}")
    ratios = [r["step_ratio"] for r in rows if r["step_ratio"]]
    print(f"\nreached in {len(ratios)} of {len(rows)} seeds; step ratios {[round(x, 2) for x in ratios]}")
    print(f"\n### Ablations and design changes\n\n{ablation_table(runs, best, args.window)}")
    print(f"\n### Mask churn\n\n{churn_table(runs)}")
    if args.plot:
        plot(runs, best, args.plot, args.title or f"{args.task}: eval loss, AdaLoRA vs HyperAdaLoRA at their best rates")


if __name__ == "__main__":
    main()
