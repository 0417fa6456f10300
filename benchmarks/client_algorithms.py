"""Rounds to a target accuracy for FedAvg, FedProx and SCAFFOLD on Fashion-MNIST with
Dirichlet(alpha) label skew (issue 12).  On demand: about 1-2 minutes per run (algorithm x seed)
on a loaded 2-core machine, ~20 minutes for the default table; --seeds 0 --only fedavg scaffold
for a 3-minute look.

    .venv/bin/python benchmarks/client_algorithms.py                     # the table in docs/algorithms.md
    .venv/bin/python benchmarks/client_algorithms.py --rounds 5 --seeds 0  # smoke test

Every algorithm runs the same config (task, cohort, local steps, lr, server FedAvg with lr 1, seed)
and differs only in ``client.algorithm``.  Accuracy is the global model's, pooled over a fixed set of
evaluation clients' test data, measured after every round.  One torch thread, so runs compare like
with like on a shared machine; the load average before and after is printed with the table.
Writes benchmarks/out/client_algorithms.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flotilla.config import validate
from flotilla.core.aggregate import UpdateRejected
from flotilla.experiment.run import build
from flotilla.tasks import build_task

OUT = Path(__file__).resolve().parent / "out" / "client_algorithms.json"
ALGORITHMS = {
    "fedavg": None,
    "fedprox (mu=0.01)": {"name": "fedprox", "mu": 0.01},
    "fedprox (mu=0.1)": {"name": "fedprox", "mu": 0.1},
    "scaffold": {"name": "scaffold"},
}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def config(args, algorithm, seed: int) -> dict:
    return {
        "seed": seed,
        "rounds": args.rounds,
        "cohort": args.cohort,
        "threads": 1,
        "weighting": args.weighting,
        "task": {"name": "fashion-mnist", "partition": "dirichlet", "alpha": args.alpha, "num_clients": args.clients},
        "client": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            **({"algorithm": algorithm} if algorithm else {}),
        },
        "server": {"optimizer": "fedavg", "lr": 1.0},
        "eval": {"every": 1, "max_clients": args.eval_clients},
        "output": {"progress": False},
    }


def rounds_to(accuracy: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracy) if a >= target), None)


def train(cfg) -> tuple[list[float], int | None]:
    """Accuracy after every round, and the round at which training diverged (a non-finite client
    update or model; the runtime refuses it), if it did."""
    task = build_task(cfg.task, cfg.seed)
    algorithm, rounds, evaluate, _ = build(cfg, task)
    accuracy = []
    try:
        for r in range(rounds):
            try:
                algorithm.step()
            except UpdateRejected:
                return accuracy, r + 1
            if not bool(torch.isfinite(algorithm.weights).all()):
                return accuracy, r + 1
            accuracy.append(evaluate(algorithm.weights)["accuracy"])
    finally:
        algorithm.close()
    return accuracy, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--target", type=float, nargs="+", default=[0.6, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--cohort", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eval-clients", type=int, default=30)
    # uniform: the papers' average (every client here holds 600 images, so examples differs only in rounding)
    p.add_argument("--weighting", choices=["examples", "uniform"], default="uniform")
    p.add_argument("--only", nargs="*", help="run only these algorithms (names as in the table)")
    args = p.parse_args()

    torch.set_num_threads(1)
    load_before = load()
    rows = []
    for name, algorithm in ALGORITHMS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            t0 = time.perf_counter()
            acc, diverged = train(validate(config(args, algorithm, seed)))
            secs = time.perf_counter() - t0
            row = {
                "algorithm": name,
                "seed": seed,
                "seconds": round(secs, 1),
                "diverged_at": diverged,
                "final_accuracy": None if diverged else acc[-1],
                "best_accuracy": max(acc, default=0.0),
                "accuracy": acc,
                **{f"rounds_to_{t}": rounds_to(acc, t) for t in args.target},
            }
            rows.append(row)
            print(
                f"{name:20s} seed {seed}: "
                + ", ".join(f"{t:.0%} at round {row[f'rounds_to_{t}']}" for t in args.target)
                + (f"; DIVERGED at round {diverged}" if diverged else f"; final {acc[-1]:.3f}")
                + f", best {max(acc, default=0.0):.3f} ({secs:.0f} s)",
                flush=True,
            )
    load_after = load()

    def show(v):
        return "-" if v is None else str(v)

    print(
        f"\nFashion-MNIST, Dirichlet(alpha={args.alpha}) over {args.clients} clients, cohort {args.cohort}, "
        f"{args.steps} local steps of batch {args.batch_size}, client lr {args.lr}, server FedAvg lr 1, "
        f"weighting {args.weighting}, {args.rounds} rounds, seeds {args.seeds}; accuracy on {args.eval_clients} evaluation clients."
    )
    print("'-': not reached within the rounds; 'diverged at r': a non-finite update at round r ended the run.\n")
    head = " | ".join(f"rounds to {t:.0%}" for t in args.target)
    print(f"| algorithm | {head} | final accuracy | best accuracy | seconds per run |")
    print("|---|" + "---|" * (len(args.target) + 3))
    for name in ALGORITHMS:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        cells = [" / ".join(show(r[f"rounds_to_{t}"]) for r in mine) for t in args.target]
        final = " / ".join(
            f"diverged at {r['diverged_at']}" if r["diverged_at"] else f"{r['final_accuracy']:.3f}" for r in mine
        )
        best = " / ".join(f"{r['best_accuracy']:.3f}" for r in mine)
        secs = statistics.mean(r["seconds"] for r in mine)
        print(f"| {name} | " + " | ".join(cells) + f" | {final} | {best} | {secs:.0f} |")
    print(
        f"\nper seed (seeds {' / '.join(map(str, args.seeds))}); seconds: mean per run. "
        f"load average (1/5/15 min) before: {load_before}; after: {load_after}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "args": vars(args),
                "load_before": load_before,
                "load_after": load_after,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
