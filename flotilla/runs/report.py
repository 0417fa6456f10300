"""`flotilla report`: a summary table of several runs and one overlaid plot; with device tiers, the
per-tier metrics and RF^2's MDAC of each optimised run against its baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flotilla.fairness.mdac import mdac, relative_changes, tier_values
from flotilla.runs.plot import plot_runs
from flotilla.runs.rundir import RunDir

TIER_METRICS = ("accuracy", "loss", "auc", "ap")
_OPTIMISATIONS = ("exclude_low", "over_select", "quantize_bits", "prune_keep", "heterofl_width")


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


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


# --- device tiers ---------------------------------------------------------------------------
def optimisations(config: dict[str, Any]) -> str:
    """The tier optimisations a run's config switched on, as text ('' for a baseline)."""
    t = config.get("tiers") or {}
    on = []
    for k in _OPTIMISATIONS:
        v = t.get(k)
        if v and v is not False:
            on.append(k if v is True else f"{k}={_short(v)}")
    return " ".join(on)


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return "/".join(f"{k}:{x:g}" for k, x in v.items())
    return _fmt(v)


def _tiering(config: dict[str, Any]) -> tuple:
    """What must match between a run and its baseline: task, seed, rounds and the tier assignment."""
    t = config.get("tiers") or {}
    return (
        repr(config.get("task")),
        config.get("seed"),
        config.get("rounds"),
        t.get("assignment"),
        t.get("alpha"),
        t.get("items"),
    )


def _last_eval(records: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [r for r in records if any(k.startswith("tier_") for k in r)]
    return evals[-1] if evals else {}


def mdac_rows(runs: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (optimised run, metric): r_low, r_mid, r_high and MDAC against the baseline run
    (same task, seed, rounds and tier assignment, no optimisation) found among ``runs``."""
    baselines = {}
    for name, (_, config) in runs.items():
        if config.get("tiers") and not optimisations(config):
            baselines.setdefault(_tiering(config), name)
    rows = []
    for name, (records, config) in runs.items():
        opts = optimisations(config) if config.get("tiers") else ""
        base = baselines.get(_tiering(config))
        if not opts or base is None:
            continue
        mine, theirs = _last_eval(records), _last_eval(runs[base][0])
        for metric in TIER_METRICS:
            a, b = tier_values(mine, metric), tier_values(theirs, metric)
            if len(a) < 2 or len(b) < 2:
                continue
            r = relative_changes(a, b)
            rows.append(
                {
                    "run": name,
                    "baseline": base,
                    "assignment": (config.get("tiers") or {}).get("assignment"),
                    "optimisation": opts,
                    "metric": metric,
                    **{f"r_{t}": r.get(t) for t in ("low", "mid", "high")},
                    "MDAC": mdac(r),
                }
            )
    return rows


def tier_rows(runs: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, (records, _config) in runs.items():
        last = _last_eval(records)
        if not last:
            continue
        metric = "auc" if "tier_low_auc" in last else "accuracy"
        rows.append(
            {"run": name, "metric": metric, **{t: last.get(f"tier_{t}_{metric}") for t in ("low", "mid", "high")}}
        )
    return rows


def report(run_dirs: list[str | Path], out: Path, x: str = "round") -> str:
    """Return the summary table (and, with device tiers, the per-tier and MDAC tables) as text and
    write the overlay plot to ``out``."""
    runs, rows, full = {}, [], {}
    for d in run_dirs:
        rd = RunDir(d)
        records = rd.read_metrics()
        if not records:
            raise ValueError(f"{d}: no metrics.jsonl records (is it a run directory?)")
        name = rd.path.name
        config = rd.read_config()
        runs[name] = records
        full[name] = (records, config)
        rows.append({"run": name, **summarize(records, config)})
    if x == "sim_time_s" and not any(r.get("sim_time_s") is not None for recs in runs.values() for r in recs):
        raise ValueError("--x sim_time_s: none of these runs recorded simulated time")
    plot_runs(runs, out, x=x)
    text = _table(rows)
    tiers = tier_rows(full)
    if tiers:
        text += "\n\nper tier (last evaluation)\n" + _table(tiers)
        fair = mdac_rows(full)
        if fair:
            text += "\n\nfairness: r_t = (with - without) / without per tier, MDAC = max |r_i - r_j|\n" + _table(fair)
    return text
