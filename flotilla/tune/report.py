"""What a finished study writes: the trial table (CSV and markdown), best-so-far vs budget, the chosen config.

The *chosen* configuration is what the tuner would pick: the lowest error it saw among trials
trained to the full budget (pruned ones never compete).  Its *true* error is what matters: the
best-so-far curve plots, against the rounds spent so far (trials in the order they finished),
the true error of the configuration the tuner would have chosen at that point.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import yaml

from flotilla.tune.space import Space

COLUMNS = ("trial", "state", "rounds", "tuner_error", "true_error", "wall_s", "params", "run_dir")


def rows(study) -> list[dict[str, Any]]:
    """One row per finished trial (complete or pruned), in the order they finished."""
    import optuna

    states = optuna.trial.TrialState
    done = [t for t in study.get_trials(deepcopy=False) if t.state in (states.COMPLETE, states.PRUNED)]
    done.sort(key=lambda t: (t.datetime_complete, t.number))
    out = []
    for t in done:
        a = t.user_attrs
        state = "pruned" if t.state == states.PRUNED else "diverged" if a.get("diverged") else "complete"
        out.append(
            dict(
                trial=t.number,
                state=state,
                rounds=a.get("rounds"),
                tuner_error=a.get("tuner_error"),
                true_error=a.get("true_error"),
                wall_s=a.get("wall_s"),
                params=dict(t.params),
                run_dir=a.get("run_dir"),
            )
        )
    return out


def best_so_far(table: list[dict[str, Any]]) -> list[tuple[int, float | None, int | None]]:
    """``(rounds spent, true error of the tuner's choice, chosen trial)`` after each finished trial."""
    spent, best, curve = 0, None, []
    for row in table:
        spent += int(row["rounds"] or 0)
        if row["state"] != "pruned" and (best is None or row["tuner_error"] < best["tuner_error"]):
            best = row
        curve.append((spent, best["true_error"] if best else None, best["trial"] if best else None))
    return curve


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "" if v is None else str(v)


def write_table(table: list[dict[str, Any]], folder: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = sorted({k for r in table for k in r["params"]})
    w.writerow([c for c in COLUMNS if c != "params"] + keys)
    for r in table:
        w.writerow([_fmt(r[c]) for c in COLUMNS if c != "params"] + [r["params"].get(k, "") for k in keys])
    _atomic(folder / "trials.csv", buf.getvalue())
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS[:-1]) + " |" for r in table]
    _atomic(folder / "trials.md", "\n".join(lines) + "\n")


def plot_curve(curve, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c[0] for c in curve if c[1] is not None]
    ys = [c[1] for c in curve if c[1] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step(xs, ys, where="post", marker="o")
    ax.set_xlabel("budget spent (server rounds, all trials)")
    ax.set_ylabel("true error of the tuner's choice")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def finish(study, space: Space, folder: Path, echo=print) -> dict[str, Any]:
    """Write the outputs; for proxy tuning, train the chosen config once on the target task first."""
    table = rows(study)
    write_table(table, folder)
    curve = best_so_far(table)
    if curve:
        plot_curve(curve, folder / "best_so_far.png", f"{space.cfg.method}, {len(table)} trials")
    chosen = next((r for r in table if r["trial"] == curve[-1][2]), None) if curve else None
    summary: dict[str, Any] = {"table": table, "curve": curve, "chosen": chosen, "target": None}
    if chosen is None:
        echo("no trial reached the full budget: no configuration chosen")
        return summary
    best = space.config(chosen["params"], target=True)
    best.pop("output", None)
    if space.proxy_base is not None:
        summary["target"] = _target_run(best, space, folder)
        echo(f"target: chosen config trained once on {best['task']['name']}: true error {summary['target']:.4f}")
    _atomic(folder / "best.yaml", yaml.safe_dump(best, sort_keys=False))
    echo(
        f"chosen: trial {chosen['trial']} (tuner error {chosen['tuner_error']:.4f}, true error "
        f"{chosen['true_error']:.4f}); config: {folder / 'best.yaml'}; table: {folder / 'trials.md'}"
    )
    return summary


def _target_run(best: dict[str, Any], space: Space, folder: Path) -> float:
    """Train the chosen configuration once on the target task (once per study, even with workers)."""
    from flotilla.config import validate
    from flotilla.experiment.run import run_experiment
    from flotilla.runs.rundir import RunDir

    rd = RunDir(folder / "target")
    cfg = validate(dict(best, output={"progress": False}))
    done = rd.state_meta().get("round", 0) if rd.has_state() else 0
    if done < cfg.rounds:  # not yet trained, or interrupted: continue it
        run_experiment(cfg, run_dir=rd.path, resume=rd.has_state())
    history = rd.read_metrics()
    acc = [r["accuracy"] for r in history if r.get("accuracy") is not None]
    return 1.0 - float(acc[-1])
