"""Plots of metrics.jsonl: one run's accuracy/loss, or several runs overlaid.

Each run keeps one colour in every panel (accuracy, loss, per-tier curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

TIERS = ("low", "mid", "high")


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_colours(names: list[str]) -> dict[str, str]:
    """One matplotlib colour per run, in order (C0, C1, ...), used in every panel."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def tier_metric(runs: dict[str, list[dict[str, Any]]]) -> str | None:
    """The per-tier metric to plot: auc when the runs report it (movielens), else accuracy; None without tiers."""
    keys = {k for recs in runs.values() for r in recs for k in r if k.startswith("tier_")}
    for metric in ("auc", "accuracy"):
        if any(f"tier_{t}_{metric}" in keys for t in TIERS):
            return metric
    return None


def plot_runs(runs: dict[str, list[dict[str, Any]]], out: Path, x: str = "round") -> None:
    """Accuracy (left) and loss (right) against ``x`` for each named run, in one figure; with device
    tiers a second row shows each tier's metric."""
    fig = figure_runs(runs, x)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def figure_runs(runs: dict[str, list[dict[str, Any]]], x: str = "round"):
    """The figure :func:`plot_runs` saves (the caller closes it)."""
    colours = run_colours(list(runs))
    metric = tier_metric(runs)
    rows = 2 if metric else 1
    fig, axes = plt.subplots(rows, 3 if metric else 2, figsize=(15 if metric else 11, 4 * rows), squeeze=False)
    ax_acc, ax_loss = axes[0][0], axes[0][1]
    if metric:
        axes[0][2].axis("off")
    for name, records in runs.items():
        c = colours[name]
        ax_acc.plot(*_series(records, x, "accuracy"), marker=".", color=c, label=name)
        ax_loss.plot(*_series(records, x, "loss"), marker=".", color=c, label=f"{name} (eval)")
        tx, ty = _series(records, x, "train_loss")
        if tx:
            ax_loss.plot(tx, ty, alpha=0.4, linestyle="--", color=c, label=f"{name} (train)")
        if metric:
            for ax, t in zip(axes[1], TIERS):
                ax.plot(*_series(records, x, f"tier_{t}_{metric}"), marker=".", color=c, label=name)
    xlabel = {"round": "round", "sim_time_s": "simulated time (s)", "wall_time_s": "host wall time (s)"}.get(x, x)
    ax_acc.set(xlabel=xlabel, ylabel="test accuracy", title="accuracy")
    ax_loss.set(xlabel=xlabel, ylabel="loss", title="loss")
    used = [ax_acc, ax_loss]
    if metric:
        for ax, t in zip(axes[1], TIERS):
            ax.set(xlabel=xlabel, ylabel=f"test {metric}", title=f"{t} tier: {metric}")
            used.append(ax)
    for ax in used:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
