"""Benchmark (b): peak memory of FedBuff on a large fleet with a ~1M-parameter model.

Population 10^7 devices, 1,000 clients in flight, an MLP of ~1.07M parameters (784-1024-256-10)
on Fashion-MNIST, real local training.  Clients in flight hold no model copy: the simulator
keeps one snapshot per model version that still has trips in flight (and, with
``--max-staleness``, none older than that), so memory is bounded by versions, not by
concurrency x model (1,000 x 4.3 MB = 4.3 GB).

    .venv/bin/python benchmarks/fleet_memory.py [--steps 150] [--max-staleness 100]

Prints the peak RSS of the process (``ru_maxrss``), the most model snapshots held at once,
and the number of distinct versions that were in flight (what an unbounded store would hold).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.client import ClientSpec
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.core.staleness import polynomial
from flotilla.data import fashion_mnist_federated
from flotilla.fleet import make_fleet
from flotilla.sim.fleet import AsyncFleetSim


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=float, default=1e7)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--steps", type=int, default=150, help="server steps (K=10 client updates each)")
    p.add_argument("--max-staleness", type=int, default=100, help="-1: no bound")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = rss_mb()
    data = fashion_mnist_federated(partition="dirichlet", num_clients=1000, alpha=0.5, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    numel = sum(p.numel() for p in model.parameters())
    fleet = make_fleet(
        population=int(args.population),
        seed=0,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=numel * 4,
        steps=1,
        batch_size=20,
        speed={"dist": "lognormal", "median": 5, "sigma": 1.0},
        bandwidth_down_mbps={"dist": "lognormal", "median": 20, "sigma": 0.5},
        bandwidth_up_mbps={"dist": "lognormal", "median": 5, "sigma": 0.5},
    )
    max_s = None if args.max_staleness < 0 else args.max_staleness
    alg = AsyncFleetSim(
        model,
        data,
        F.cross_entropy,
        fleet=fleet,
        concurrency=args.concurrency,
        buffer_size=10,
        staleness=polynomial(0.5),
        max_staleness=max_s,
        client=ClientSpec(steps=1, batch_size=20, lr=0.05),
        server=ServerOptimizerSpec("fedavgm", lr=1.0, momentum=0.9),
    )
    after_setup = rss_mb()
    t0 = time.perf_counter()
    max_versions_in_flight = 0
    for _ in range(args.steps):
        m = alg.step()
        max_versions_in_flight = max(max_versions_in_flight, len(alg.sched.refs))
    host = time.perf_counter() - t0
    out = {
        "population": int(args.population),
        "concurrency": args.concurrency,
        "params": numel,
        "model_mb": numel * 4 / 2**20,
        "max_staleness": max_s,
        "server_steps": m["round"],
        "uploads": m["uploads"],
        "stale_discarded": m["stale_discarded"],
        "sim_time_s": m["sim_time_s"],
        "host_s": host,
        "peak_snapshots": alg.peak_snapshots,
        "max_distinct_versions_in_flight": max_versions_in_flight,
        "rss_start_mb": base,
        "rss_after_setup_mb": after_setup,
        "peak_rss_mb": rss_mb(),
        "naive_copies_mb": args.concurrency * numel * 4 / 2**20,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
