"""Benchmark (a): the fleet timing layer alone, with a null client (no training).

Counts client trip ends (completions + dropouts) processed per second of host time, for the
asynchronous scheduler driven by the FedBuff algorithm (``AsyncFleetSim(null_client=True)``:
staleness, buffer counting, version bookkeeping, metrics per server step), for the raw
scheduler loop, and for synchronous rounds, at several population sizes.

    .venv/bin/python benchmarks/fleet_timing.py [--events 1000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.dataset import FederatedDataset
from flotilla.fleet import AsyncScheduler, make_fleet
from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim

DIURNAL = [0.1] * 7 + [0.3] * 5 + [0.5] * 6 + [0.9] * 6


def tiny_dataset(num_clients: int) -> FederatedDataset:
    """Clients with 2 examples each: the null client never trains on them."""
    x, y = torch.zeros(2 * num_clients, 2), torch.zeros(2 * num_clients, dtype=torch.long)
    return FederatedDataset(
        "null", lambda i: (x[i], y[i]), [torch.arange(2 * c, 2 * c + 2) for c in range(num_clients)]
    )


def build_fleet(population: int, data, variant: str):
    kw = dict(
        population=population,
        seed=0,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=4_000_000,
        speed={"dist": "lognormal", "median": 20, "sigma": 1.0},
        bandwidth_down_mbps={"dist": "lognormal", "median": 20, "sigma": 0.5},
        bandwidth_up_mbps={"dist": "lognormal", "median": 5, "sigma": 0.5},
    )
    if variant == "realistic":
        kw.update(
            dropout=0.05,
            diurnal=DIURNAL,
            timezone_spread_h=3,
            session_s={"dist": "exponential", "mean": 1800},
            trip_extra_s={"dist": "half-normal", "sd": 1.0},
        )
    return make_fleet(**kw)


def bench_fedbuff(population, concurrency, events, data, variant):
    alg = AsyncFleetSim(
        nn.Linear(2, 2),
        data,
        F.cross_entropy,
        fleet=build_fleet(population, data, variant),
        concurrency=concurrency,
        buffer_size=10,
        null_client=True,
    )
    t0 = time.perf_counter()
    m = {}
    while True:
        m = alg.step()
        if m["uploads"] + m["dropouts"] >= events:
            break
    dt = time.perf_counter() - t0
    n = m["uploads"] + m["dropouts"]
    return {
        "kind": "fedbuff-null",
        "population": population,
        "concurrency": concurrency,
        "variant": variant,
        "trip_ends": n,
        "host_s": dt,
        "per_s": n / dt,
        "sim_time_s": m["sim_time_s"],
        "server_steps": m["round"],
    }


def bench_scheduler(population, concurrency, events, data, variant):
    s = AsyncScheduler(build_fleet(population, data, variant), concurrency)
    s.fill()
    t0 = time.perf_counter()
    for _ in range(events):
        s.pop()
        s.fill()
    dt = time.perf_counter() - t0
    return {
        "kind": "scheduler",
        "population": population,
        "concurrency": concurrency,
        "variant": variant,
        "trip_ends": events,
        "host_s": dt,
        "per_s": events / dt,
        "sim_time_s": s.now,
    }


def bench_sync(population, concurrency, events, data, variant):
    cohort = int(concurrency / 1.3)
    alg = SyncFleetSim(
        nn.Linear(2, 2),
        data,
        F.cross_entropy,
        fleet=build_fleet(population, data, variant),
        cohort=cohort,
        over_selection=1.3,
        null_client=True,
    )
    t0 = time.perf_counter()
    m = {}
    while True:
        m = alg.step()
        if m["trips"] >= events:
            break
    dt = time.perf_counter() - t0
    return {
        "kind": "sync-null",
        "population": population,
        "concurrency": alg.select,
        "variant": variant,
        "trip_ends": m["trips"],
        "host_s": dt,
        "per_s": m["trips"] / dt,
        "sim_time_s": m["sim_time_s"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="trip ends per measurement")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = tiny_dataset(1000)
    rows = []
    for variant in ("plain", "realistic"):
        for pop in (10**3, 10**6, 10**8):
            for conc in (10, 1000):
                # Starting a trip samples devices until an idle one comes up: N / (N - C) tries.
                # Concurrency = population is the worst case (one idle device): measured briefly.
                n = args.events if conc * 10 <= pop else max(args.events // 50, 1000)
                rows.append(bench_fedbuff(pop, conc, n, data, variant))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(bench_scheduler(10**8, 1000, args.events, data, variant))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(bench_sync(10**8, 1000, args.events, data, variant))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    print(f"\nload average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'kind':14} {'variant':10} {'population':>11} {'conc':>5} {'trip ends/s':>12}")
    for r in rows:
        print(f"{r['kind']:14} {r['variant']:10} {r['population']:>11.0e} {r['concurrency']:>5} {r['per_s']:>12,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loadavg": load}, f, indent=1)


if __name__ == "__main__":
    main()
