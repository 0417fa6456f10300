"""Federated tuning under noisy evaluation on Fashion-MNIST or Shakespeare (after Kuo et al., MLSys 2023).

    nice -n 10 .venv/bin/python benchmarks/tuning.py [--task fmnist|shakespeare] [--seeds 0 1] [--trials 8] [--out DIR]

Every study is a real ``flotilla tune`` study (flotilla.tune.tune) over Kuo et al.'s space (server
Adam lr, beta1, beta2; client lr; batch size), FedAdam server, client SGD with momentum 0.9.
Methods: random search (RS), Hyperband (HB), TPE, BOHB-style (TPE + Hyperband).  Noise on what
the tuner sees (the true error on all 20 evaluation clients is logged beside it):

    clean       all 20 evaluation clients, uniform average of their errors
    sub1        1 evaluation client answers (5%; Kuo et al.: ~1%), the partition's heterogeneity
    sub1-iid    1 client answers, evaluation examples re-dealt IID first (heterogeneity removed)
    bias        3 clients answer, P(answer) ~ (1.0001 - error)^b with b = 5
    dp          all clients, Laplace DP with epsilon = 10 (scale N / (20 x 10), N = trials x evaluations)
    proxy       one-shot proxy RS: RS on the proxy task (public: clean evaluation), the chosen config
                trained once on the target task

Tasks (``--task``): ``fmnist`` (target Fashion-MNIST, proxy MNIST 5k; 9 rounds) and ``shakespeare``
(next-character prediction; target: roles of the 27 non-history plays, proxy: roles of the 11
history plays (``plays: target`` / ``proxy``); 60 roles each, 64 training windows per role, a
CharLSTM with 64 hidden units; 8 rounds).

Reported per study: the true target error of the configuration the tuner chose (at full budget),
and the rounds spent.  Budgets are tiny (8-9 rounds, 8 trials) to fit a shared CPU; a sketch of
the paper's setting (405 rounds, 16 trials), not a reproduction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROUNDS = 9
BASE = {
    "threads": 1,
    "task": {
        "name": "fashion-mnist",
        "partition": "dirichlet",
        "alpha": 0.5,
        "num_clients": 200,
        "examples_per_client": 15,
    },
    "rounds": ROUNDS,
    "cohort": 10,
    "client": {"batch_size": 16, "momentum": 0.9},
    "server": {"optimizer": "fedadam"},
    "eval": {"every": 3, "max_clients": 20},
}
SPACE = {
    "server.lr": {"log_uniform": [1e-4, 1e-1]},
    "server.beta1": {"uniform": [0.0, 0.9]},
    "server.beta2": {"uniform": [0.0, 0.999]},
    "client.lr": {"log_uniform": [1e-4, 1.0]},
    "client.batch_size": {"choice": [8, 16]},
}
NOISE = {
    "clean": {},
    "sub1": {"clients": 1},
    "sub1-iid": {"clients": 1, "shuffle_fraction": 1.0},
    "bias": {"clients": 3, "bias": 5.0},
    "dp": {"epsilon": 10.0},
}
PLAN = [(m, n) for m in ("random", "hyperband", "tpe", "bohb") for n in ("clean", "sub1", "dp")]
PLAN += [(m, n) for m in ("random", "tpe") for n in ("sub1-iid", "bias")]
PLAN += [("random", "proxy")]
PROXY_TASK = {"name": "mnist-5k", "partition": "dirichlet", "alpha": 0.5, "num_clients": 200}

# Shakespeare: one client per (play, role); few short windows per role and 5% of each role's text
# held out (evaluation is most of a trial's cost), so that a trial takes ~2 CPU seconds.
SHAKESPEARE = {
    "name": "shakespeare",
    "plays": "target",
    "max_clients": 60,
    "max_train_samples_per_client": 64,
    "seq_len": 40,
    "test_fraction": 0.05,
    "min_chars": 1000,
    "model": {"hidden": 64},
}
# per task: the base config, the proxy task, hyperband's smallest budget, the default output
TASKS = {
    "fmnist": (BASE, PROXY_TASK, 3, "benchmarks/out/tuning"),
    "shakespeare": (
        dict(BASE, task=SHAKESPEARE, rounds=8, cohort=5, eval={"every": 2, "max_clients": 20}),
        dict(SHAKESPEARE, plays="proxy"),
        2,
        "benchmarks/out/tuning-shakespeare",
    ),
}


def space_file(folder: Path, method: str, noise: str, seed: int, trials: int, task: str = "fmnist") -> Path:
    base, proxy_task, min_rounds, _ = TASKS[task]
    spec = {
        "base": dict(base, seed=seed),
        "method": method,
        "trials": trials,
        "seed": seed,
        "startup_trials": 3,
        "hyperband": {"eta": 3, "min_rounds": min_rounds},
        "space": SPACE,
        "noise": NOISE.get(noise, {}),
    }
    if noise == "proxy":
        spec["proxy_task"] = proxy_task
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--task", choices=sorted(TASKS), default="fmnist")
    ap.add_argument("--out", default=None, help="default: benchmarks/out/tuning (fmnist), tuning-shakespeare")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD/NOISE", help="run only these studies")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="summarise the results of these outs (and write them to --out if given)")  # fmt: skip
    ap.add_argument("--signal", nargs="+", default=None, metavar="DIR",
                    help="how well what the tuner saw ranks random search's configurations, per noise")  # fmt: skip
    args = ap.parse_args()
    if args.signal:
        print(signal(args.signal))
        return
    if args.merge:  # e.g. seeds run as separate processes with their own --out
        merged = {}
        for d in args.merge:
            merged.update(json.loads((Path(d) / "results.json").read_text()))
        if args.out:  # keep the merged results beside the per-seed ones
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps(merged, indent=1))
            (Path(args.out) / "results.md").write_text(summary(merged, args.seeds))
        print(summary(merged, args.seeds))
        return
    import torch

    torch.set_num_threads(1)
    from flotilla.tune import tune

    out = Path(args.out or TASKS[args.task][3])
    rounds = TASKS[args.task][0]["rounds"]
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:
        for method, noise in PLAN:
            key = f"{method}/{noise}/seed{seed}"
            if key in results or (args.only and f"{method}/{noise}" not in args.only):
                continue
            folder = out / "studies" / f"{method}-{noise}-seed{seed}"
            path = space_file(folder, method, noise, seed, args.trials, args.task)
            resume = (folder / "study" / "study.db").exists()
            t = time.time()
            s = tune(path, out=folder / "study", resume=resume, echo=lambda *_: None)
            table = s["table"]
            chosen = s["chosen"]
            results[key] = {
                "chosen_true_error": s["target"] if s["target"] is not None else chosen["true_error"],
                "chosen_tuner_error": chosen["tuner_error"],
                "best_true_error_seen": min(r["true_error"] for r in table if r["state"] != "pruned"),
                "rounds_spent": sum(r["rounds"] for r in table) + (rounds if s["target"] is not None else 0),
                "trials": len(table),
                "pruned": sum(r["state"] == "pruned" for r in table),
                "wall_s": time.time() - t,
            }
            print(key, json.dumps(results[key]), flush=True)
            results_file.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(summary(results, args.seeds))
    print(summary(results, args.seeds))


def signal(outs: list[str]) -> str:
    """Per noise, over the random-search studies (the same 8 configurations for a seed, all trained to
    R): the spread of their true errors, the tuner's error minus the truth (its std), the rank
    correlation of the two, and the regret (true error of the tuner's choice - the best of the 8)."""
    import csv

    import numpy as np

    def ranks(x):
        return np.argsort(np.argsort(x))

    lines = [
        "| noise | studies | std of true error over configs | std of tuner - true | rank corr. (Spearman) | regret |",
        "|---|---|---|---|---|---|",
    ]
    for noise in NOISE:
        stats = []
        for d in outs:
            for f in sorted(Path(d).glob(f"studies/random-{noise}-seed*/study/trials.csv")):
                rows = [r for r in csv.DictReader(f.open()) if r["state"] != "pruned"]
                tuner = np.array([float(r["tuner_error"]) for r in rows])
                true = np.array([float(r["true_error"]) for r in rows])
                corr = np.corrcoef(ranks(tuner), ranks(true))[0, 1]
                stats.append((true.std(), (tuner - true).std(), corr, true[tuner.argmin()] - true.min()))
        if stats:
            m = np.mean(stats, axis=0)
            lines.append(f"| {noise} | {len(stats)} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.2f} | {m[3]:.3f} |")
    return "\n".join(lines) + "\n"


def summary(results: dict, seeds: list[int]) -> str:
    import numpy as np

    lines = [
        "| method | noise | true error of the chosen config (mean over seeds) | per seed | rounds spent | pruned |",
        "|---|---|---|---|---|---|",
    ]
    for method, noise in PLAN:
        rows = [results.get(f"{method}/{noise}/seed{s}") for s in seeds]
        rows = [r for r in rows if r is not None]
        if not rows:
            continue
        errs = [r["chosen_true_error"] for r in rows]
        lines.append(
            f"| {method} | {noise} | {np.mean(errs):.3f} | {' '.join(f'{e:.3f}' for e in errs)} | "
            f"{np.mean([r['rounds_spent'] for r in rows]):.0f} | {np.mean([r['pruned'] for r in rows]):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
