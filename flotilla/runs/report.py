"""`flotilla report`: a summary table of several runs and one overlaid plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flotilla.runs.plot import plot_runs
from flotilla.runs.rundir import RunDir


def summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    evals = [r for r in records if r.get("accuracy") is not None]
    last = records[-1] if records else {}
    return {
        "task": config.get("task", {}).get("name", "?"),
        "algorithm": _algorithm(config),
        "rounds": last.get("round", 0),
        "final_acc": evals[-1]["accuracy"] if evals else None,
        "best_acc": max(r["accuracy"] for r in evals) if evals else None,
        "final_loss": evals[-1]["loss"] if evals else None,
        "wall_s": last.get("wall_time_s"),
        "sim_s": last.get("sim_time_s"),
        "trips": last.get("trips"),
    }


def _algorithm(config: dict[str, Any]) -> str:
    """sync/fedavgm, sync-fleet/fedavgm, async/fedbuff+fedavg, async/fedasync."""
    opt = config.get("server", {}).get("optimizer", "?")
    if config.get("mode") == "async":
        algo = (config.get("async") or {}).get("algorithm", "fedbuff")
        return f"async/{algo}" if algo == "fedasync" else f"async/{algo}+{opt}"
    return ("sync-fleet/" if config.get("fleet") else "sync/") + opt


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def report(run_dirs: list[str | Path], out: Path, x: str = "round") -> str:
    """Return the summary table as text and write the overlay plot to ``out``."""
    runs, rows = {}, []
    for d in run_dirs:
        rd = RunDir(d)
        records = rd.read_metrics()
        if not records:
            raise ValueError(f"{d}: no metrics.jsonl records (is it a run directory?)")
        name = rd.path.name
        runs[name] = records
        rows.append({"run": name, **summarize(records, rd.read_config())})
    if x == "sim_time_s" and not any(r.get("sim_time_s") is not None for recs in runs.values() for r in recs):
        raise ValueError("--x sim_time_s: none of these runs recorded simulated time")
    plot_runs(runs, out, x=x)
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
