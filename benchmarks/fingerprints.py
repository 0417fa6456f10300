"""Final-model fingerprints of a few small runs, to check that a refactor changes no behaviour.

    python benchmarks/fingerprints.py > before.txt     # on the old code
    python benchmarks/fingerprints.py > after.txt      # on the new code; diff the two

Each line: run name, sha256 of the final flat weights (bit-level), and the last train loss.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile

import torch

from flotilla.api import run_experiment
from flotilla.config import validate

FMNIST = {"name": "fashion-mnist", "partition": "dirichlet", "num_clients": 40, "alpha": 0.5, "examples_per_client": 30}
BASE = {
    "seed": 3,
    "task": FMNIST,
    "rounds": 3,
    "cohort": 6,
    "threads": 1,
    "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
    "eval": {"every": 3, "max_clients": 10},
    "output": {"progress": False},
}
RUNS = {
    "sync-fedadam": {"server": {"optimizer": "fedadam", "lr": 0.01}},
    "fleet-fedbuff": {
        "mode": "async",
        "rounds": 4,
        "fleet": {"population": 1000},
        "async": {"concurrency": 8, "buffer_size": 3},
    },
    "dp-fedavg": {"privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": 0.8}}},
    "dp-sgd": {"privacy": {"sample_level": {"noise_multiplier": 0.7, "max_grad_norm": 1.0}}},
    "secagg-plus": {"secure_aggregation": {"degree": "auto", "dropout": {"mask": 0.2, "unmask": 0.2}}},
    "dp-fedbuff": {
        "mode": "async",
        "rounds": 4,
        "fleet": {"population": 1000},
        "async": {"concurrency": 8, "buffer_size": 3},
        "privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": 0.8}},
    },
    "secure-fedbuff": {
        "mode": "async",
        "rounds": 4,
        "fleet": {"population": 1000},
        "async": {"concurrency": 8, "buffer_size": 3},
        "secure_aggregation": {},
    },
    "dp-secagg": {"privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": 0.8}}, "secure_aggregation": {}},
    "fleet-sync": {"fleet": {"population": 1000, "over_selection": 1.5, "deadline_s": 30}},
}


def main(names: list[str]) -> None:
    for name in names or RUNS:
        cfg = validate({**BASE, **RUNS[name]})
        with tempfile.TemporaryDirectory() as d:
            res = run_experiment(cfg, run_dir=f"{d}/run")
        digest = hashlib.sha256(res.weights.to(torch.float32).numpy().tobytes()).hexdigest()[:16]
        print(f"{name:14s} {digest} train_loss={res.history[-1].get('train_loss')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
