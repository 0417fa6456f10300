"""Benchmark: the fairness cost of tier-aware system optimisations under `random` vs `dirichlet`
device tiering (RF^2, Maeng et al., RecSys 2022).  See docs/fairness.md for what was run.

For each task, seed and tiering (random = client index mod 3; dirichlet = RF^2's data-correlated
assignment, alpha 0.005) one baseline run and one run per optimisation, all through
``flotilla.experiment.run.run_experiment`` (the same code as ``flotilla run``), each writing a run
directory (``flotilla report`` reads them).  Per run: the per-tier metrics of the last evaluation;
per optimisation: r_t = (with - without) / without per tier and MDAC = max |r_i - r_j|, against
the baseline of the same task, seed and tiering.

    nice -n 10 .venv/bin/python benchmarks/fairness.py --task fashion --seeds 0 1 2 --out docs/fairness
    nice -n 10 .venv/bin/python benchmarks/fairness.py --task movielens --seeds 0 1 2 --out docs/fairness
    .venv/bin/python benchmarks/fairness.py --summarize docs/fairness      # tables + plot from the JSONs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import flotilla.runs.plot as _plot
from flotilla.config import validate
from flotilla.experiment.run import run_experiment
from flotilla.fairness.mdac import mdac, relative_changes, tier_values
from flotilla.tasks import build_task

# The Runner draws plot.png at the end of every run (seconds each on a busy CPU); this benchmark draws its own.
_plot.plot_runs = lambda *a, **k: None

OPTIMISATIONS = {
    "exclude_low": {"exclude_low": True},
    "over_select_0.3": {"over_select": 0.3},
    "quantize_2/4/32": {"quantize_bits": {"low": 2, "mid": 4}},
    "prune_0.1/0.3/1": {"prune_keep": {"low": 0.1, "mid": 0.3}},
    "heterofl_0.25/0.5/1": {"heterofl_width": {"low": 0.25, "mid": 0.5}},
}
LAST = 3  # metrics = the mean of the last 3 evaluations (every EVAL_EVERY rounds)
EVAL_EVERY = 5
TIERINGS = {"random": {"assignment": "random"}, "dirichlet": {"assignment": "dirichlet", "alpha": 0.005}}


def fashion_config(seed: int, rounds: int) -> dict:
    """Fashion-MNIST: 100 clients, strong label skew (Dirichlet 0.1: a client holds ~2-3 classes),
    an MLP 784-64-10 (HeteroFL narrows its hidden layer), FedAvg, 10 clients a round."""
    return {
        "seed": seed,
        "task": {
            "name": "fashion-mnist",
            "num_clients": 100,
            "partition": "dirichlet",
            "alpha": 0.1,
            "examples_per_client": 60,
        },
        "rounds": rounds,
        "cohort": 10,
        "client": {"epochs": 1, "batch_size": 20, "lr": 0.05},
        "server": {"optimizer": "fedavg", "lr": 1.0},
        "eval": {"every": EVAL_EVERY},
        "threads": 1,
        "output": {"progress": False, "checkpoint_every": rounds},
    }


def fashion_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def movielens_config(seed: int, rounds: int, cohort: int = 50) -> dict:
    """RF^2's setup on MovieLens ml-latest-small (671 users): full-batch SGD lr 1.0, server Adagrad lr
    0.1 on the mean delta (examples/movielens.yaml), but 50 clients a round (RF^2: 100) and 20 rounds
    (the example: 300): 40 rounds of 100 took ~500 s a run on the shared CPU."""
    return {
        "seed": seed,
        "task": {"name": "movielens", "click_threshold": 4.0, "test_fraction": 0.1},
        "rounds": rounds,
        "cohort": cohort,
        "client": {"epochs": 1, "batch_size": 100000, "lr": 1.0},
        "server": {"optimizer": "fedadagrad", "lr": 0.1, "beta1": 0.0, "tau": 1e-10},
        "eval": {"every": EVAL_EVERY},
        "threads": 1,
        "output": {"progress": False, "checkpoint_every": rounds},
    }


TASKS = {
    "fashion": (fashion_config, fashion_model, ("accuracy", "loss")),
    "movielens": (movielens_config, None, ("auc", "ap", "loss")),
}


def run_one(task_name, cfg_dict, base_task, out: Path, name: str) -> dict:
    cfg = validate(cfg_dict)
    torch.manual_seed(cfg.seed)
    _, make_model, _ = TASKS[task_name]
    if make_model is not None:
        model = make_model()
    else:  # the task's own model, freshly initialised
        from flotilla.tasks.registry import model_for_task

        model = model_for_task(cfg.task.model_dump())
    task = dataclasses.replace(base_task, model=model)
    run_dir = Path("runs/fairness") / name  # run directories stay out of git; the JSONs hold the figures
    if (run_dir / "metrics.jsonl").exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.time()
    result = run_experiment(cfg, run_dir=run_dir, task=task)
    evals = [r for r in result.history if any(k.startswith("tier_") for k in r)][-LAST:]
    # the mean of the last LAST evaluations: one evaluation swings by several points from round to round
    keys = [k for k, v in evals[-1].items() if isinstance(v, float) and k != "wall_time_s"]
    final = {k: float(np.mean([r[k] for r in evals])) for k in keys}
    return {"name": name, "host_s": round(time.time() - t0, 1), "final": final, "rounds": [r["round"] for r in evals]}


def run_task(task_name: str, seeds: list[int], rounds: int, out: Path, only: list[str] | None) -> None:
    make_cfg, _, _ = TASKS[task_name]
    for seed in seeds:
        cfg0 = make_cfg(seed, rounds)
        base_task = build_task(validate(cfg0).task, seed)  # the data once per seed
        for tiering, tiers in TIERINGS.items():
            results = {}
            path = out / f"{task_name}_{tiering}_s{seed}.json"
            if path.exists():
                results = json.loads(path.read_text())
            for opt, keys in {"baseline": {}, **OPTIMISATIONS}.items():
                if only and opt not in only and opt != "baseline":
                    continue
                if opt in results:
                    continue
                cfg = dict(cfg0, tiers={**tiers, **keys})
                prefix = "" if out.name == "fairness" else f"{out.name}-"  # a variant's runs beside the main ones
                name = f"{prefix}{task_name}-{tiering}-{opt.replace('/', '-')}-s{seed}"
                r = run_one(task_name, cfg, base_task, out, name)
                print(
                    f"{name}: {r['host_s']} s  "
                    + " ".join(
                        f"{k}={v:.4f}" for k, v in r["final"].items() if k.startswith("tier_") and isinstance(v, float)
                    ),
                    flush=True,
                )
                results[opt] = r
                path.write_text(json.dumps(results, indent=1))


# --- summary -----------------------------------------------------------------------------
def summarize(out: Path) -> str:
    rows, per = [], {}
    for path in sorted(out.glob("*_s*.json")):
        task_name, tiering, seed = path.stem.rsplit("_", 2)
        results = json.loads(path.read_text())
        if "baseline" not in results:
            continue
        base = results["baseline"]["final"]
        for opt, r in results.items():
            if opt == "baseline":
                continue
            for metric in TASKS[task_name][2]:
                a, b = tier_values(r["final"], metric), tier_values(base, metric)
                if len(a) < 3 or len(b) < 3:
                    continue
                ch = relative_changes(a, b)
                overall = (r["final"][metric] - base[metric]) / base[metric]
                per.setdefault((task_name, opt, metric), {}).setdefault(tiering, []).append(
                    {"seed": seed, "mdac": mdac(ch), "r": ch, "overall": overall}
                )
    lines = [
        "| task | optimisation | metric | MDAC random (mean ± sd) | MDAC dirichlet (mean ± sd) | dirichlet / random | "
        "overall change random | overall change dirichlet | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task_name, opt, metric), by in sorted(per.items()):
        if "random" not in by or "dirichlet" not in by:
            continue
        mr = np.array([x["mdac"] for x in by["random"]])
        md = np.array([x["mdac"] for x in by["dirichlet"]])
        orr = np.array([x["overall"] for x in by["random"]])
        od = np.array([x["overall"] for x in by["dirichlet"]])
        ratio = md.mean() / mr.mean() if mr.mean() > 0 else float("inf")
        rows.append((task_name, opt, metric, mr, md, ratio, orr, od))
        lines.append(
            f"| {task_name} | {opt} | {metric} | {mr.mean():.4f} ± {mr.std():.4f} | {md.mean():.4f} ± {md.std():.4f} | "
            f"{ratio:.1f}x | {100 * orr.mean():+.2f}% | {100 * od.mean():+.2f}% | {min(len(mr), len(md))} |"
        )
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(
        json.dumps({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in per.items()}, indent=1, default=float)
    )
    _plot(rows, out / "mdac.png")
    return table


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r[0], r[2]) for r in rows})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (task_name, metric) in zip(axes[0], groups):
        sel = [r for r in rows if r[0] == task_name and r[2] == metric]
        x = np.arange(len(sel))
        for i, (label, idx, colour) in enumerate((("random", 3, "C0"), ("dirichlet", 4, "C3"))):
            means = [r[idx].mean() for r in sel]
            sds = [r[idx].std() for r in sel]
            ax.bar(x + (i - 0.5) * 0.4, means, 0.4, yerr=sds, label=label, color=colour, capsize=3)
        ax.set_xticks(x, [r[1] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{task_name}: MDAC of tier {metric}", ylabel="MDAC (max |r_i - r_j|)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--rounds", type=int, default=None, help="server rounds per run (default: fashion 40, movielens 20)"
    )
    ap.add_argument("--only", nargs="+", default=None, help="a subset of the optimisations")
    ap.add_argument(
        "--no-user-embedding", action="store_true", help="movielens: DLRM without the user-id embedding (as RF^2's)"
    )
    ap.add_argument("--out", type=Path, default=Path("docs/fairness"))
    ap.add_argument("--summarize", type=Path, default=None, help="only rebuild the tables and plot from a folder")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.summarize is not None:
        print(summarize(args.summarize))
        return
    if args.task is None:
        ap.error("--task is required (or --summarize)")
    rounds = args.rounds or {"fashion": 40, "movielens": 20}[args.task]
    if args.no_user_embedding:
        TASKS["movielens"] = (
            lambda seed, r: {
                **movielens_config(seed, r),
                "task": {**movielens_config(seed, r)["task"], "model": {"user_embedding": False}},
            },
            *TASKS["movielens"][1:],
        )
    args.out.mkdir(parents=True, exist_ok=True)
    run_task(args.task, args.seeds, rounds, args.out, args.only)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
