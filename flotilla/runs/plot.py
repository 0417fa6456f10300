"""Plots of metrics.jsonl: one run's accuracy/loss, or several runs overlaid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: dict[str, list[dict[str, Any]]], out: Path, x: str = "round") -> None:
    """Accuracy (left) and loss (right) against ``x`` for each named run, in one figure."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        ax_acc.plot(*_series(records, x, "accuracy"), marker=".", label=name)
        ax_loss.plot(*_series(records, x, "loss"), marker=".", label=f"{name} (eval)")
        tx, ty = _series(records, x, "train_loss")
        if tx:
            ax_loss.plot(tx, ty, alpha=0.4, linestyle="--", label=f"{name} (train)")
    xlabel = {"round": "round", "sim_time_s": "simulated time (s)", "wall_time_s": "host wall time (s)"}.get(x, x)
    ax_acc.set(xlabel=xlabel, ylabel="test accuracy", title="accuracy")
    ax_loss.set(xlabel=xlabel, ylabel="loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
