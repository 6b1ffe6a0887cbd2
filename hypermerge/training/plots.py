"""The run's plots: loss curves, and for rank-allocating methods the final ranks and the budget.

Drawn with matplotlib's object API on the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"^(?:.*?\.)?(\d+)\.(.+?)(?:\.weight)?$")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    figure.savefig(tmp)
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def loss_plot(log_history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss per logged step, evaluation loss (and accuracy, right axis) per evaluation.

    Args:
        log_history: the Trainer's ``state.log_history``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    accuracy = [(e["step"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if accuracy:
        right = axes.twinx()
        right.plot(*zip(*accuracy, strict=True), "s--", label="eval accuracy", color="tab:green")
        right.set_ylabel("accuracy")
        right.set_ylim(0, 1)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        axes.legend(handles, labels, loc="upper right")
    axes.set_title(title or "loss")
    return _save(figure, path)


def split_weight_name(name: str) -> tuple[str, str]:
    """``encoder.layer.3.attention.self.query.weight`` -> (``"3"``, ``"attention.self.query"``)."""
    match = _LAYER.match(name)
    if match is None:
        return "-", name.removesuffix(".weight")
    return match.group(1), match.group(2)


def ranks_plot(rank_pattern: Mapping[str, int], budget: Sequence[Sequence[int]], path: Path,
               title: str = "") -> Path:
    """Final rank of every adapted matrix (layer x module heat map) and the total rank budget per step.

    Args:
        rank_pattern: base weight name -> kept rank (``hm.rank_pattern(model)``).
        budget: ``(step, total rank)`` pairs recorded after each rank allocation.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    cells = {split_weight_name(name): rank for name, rank in rank_pattern.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    modules = sorted({module for _, module in cells})
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), rank in cells.items():
        grid[layers.index(layer), modules.index(module)] = rank

    figure = _figure(12, max(3.5, 0.35 * len(layers) + 2))
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    if cells:
        image = left.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        left.set_xticks(range(len(modules)), [m.rsplit(".", 1)[-1] if len(modules) > 6 else m for m in modules],
                        rotation=45, ha="right")
        left.set_yticks(range(len(layers)), layers)
        figure.colorbar(image, ax=left, label="rank")
        if grid.size <= 400:
            for i in range(len(layers)):
                for j in range(len(modules)):
                    if not np.isnan(grid[i, j]):
                        left.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", color="white", fontsize=7)
    left.set_xlabel("module")
    left.set_ylabel("layer")
    left.set_title("final rank per matrix")
    if budget:
        steps, totals = zip(*budget, strict=True)
        right.plot(steps, totals, color="tab:purple")
    right.set_xlabel("optimizer step")
    right.set_ylabel("total rank (sum over matrices)")
    right.set_title("rank budget")
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save(figure, path)
