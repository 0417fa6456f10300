"""Cost of secure aggregation per round: client and server compute, sync (complete graph and
SecAgg+) and async (secure buffer), against the plaintext weighted mean.

    .venv/bin/python benchmarks/secagg_bench.py                       # 100 and 1,000 clients, 1M parameters
    .venv/bin/python benchmarks/secagg_bench.py --clients 20 --numel 100000   # quick look
    .venv/bin/python benchmarks/secagg_bench.py --ring-accuracy --rounds 10   # channels.upload quantize in the ring

All parties run in this process, one after another, so "client s" is the sum over all clients of
their protocol compute (encode, key agreement, Shamir, masking, unmasking) and "server s" is the
server's (relaying, summing, reconstructing secrets, removing masks).  Local training is not
included.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from flotilla.core.aggregate import WeightedMean
from flotilla.secure import DropoutSim, SecureAggregator, SecureBuffer, default_degree, seal_update


def deltas(numel: int, pool: int = 4) -> list[torch.Tensor]:
    # Cost does not depend on the values: cycle a few random deltas instead of making n of them.
    g = torch.Generator().manual_seed(0)
    return [torch.randn(numel, generator=g) * 0.01 for _ in range(pool)]


def plaintext(numel: int, n: int, ds, repeats: int = 3) -> float:
    agg = WeightedMean(numel)
    best = float("inf")
    for _ in range(repeats):  # best of a few: the first pays torch's warm-up
        agg.reset()
        t0 = time.perf_counter()
        for i in range(n):
            agg.add(ds[i % len(ds)], 1.0, i)
        agg.result()
        best = min(best, time.perf_counter() - t0)
    return best


def sync(numel: int, n: int, degree, drop: float, ds) -> dict:
    agg = SecureAggregator(numel, n, clip=1.0, degree=degree, dropout=DropoutSim(mask=drop, seed=0))
    t0 = time.perf_counter()
    for i in range(n):
        agg.add(ds[i % len(ds)], 1.0, i)
    agg.result()
    wall = time.perf_counter() - t0
    return dict(
        client=agg.timing["client_s"],
        server=agg.timing["server_s"],
        wall=wall,
        k=agg.config.neighbourhood - 1,
        t=agg.config.t,
    )


def buffer(numel: int, n: int, ds) -> dict:
    buf = SecureBuffer(numel, min_updates=n, staleness_weight=lambda tau: (1 + tau) ** -0.5)
    client = server = 0.0
    for i in range(n):
        a = buf.assign(i, version=0)  # buffer side, negligible
        t0 = time.perf_counter()
        up = seal_update(ds[i % len(ds)], 1.0, a)
        t1 = time.perf_counter()
        buf.receive(up, server_version=4 * i // n)  # staleness 0..3
        server += time.perf_counter() - t1
        client += t1 - t0
    t0 = time.perf_counter()
    buf.release()
    server += time.perf_counter() - t0
    return dict(client=client, server=server, wall=client + server, k=None, t=None)


RING_VARIANTS = [  # (name, secure_aggregation, channels)
    ("plaintext fp32", None, None),
    ("SecAgg+ fixed point, 32-bit ring", {"clip": 1.0}, None),
    ("SecAgg+ quantize 8 bits, clip 1.0", {"clip": 1.0}, {"upload": [{"name": "quantize", "bits": 8}]}),
    ("SecAgg+ quantize 8 bits, clip 0.1", {"clip": 0.1}, {"upload": [{"name": "quantize", "bits": 8}]}),
    ("SecAgg+ quantize 4 bits, clip 0.1", {"clip": 0.1}, {"upload": [{"name": "quantize", "bits": 4}]}),
    ("SecAgg+ quantize 4 bits, clip 0.02", {"clip": 0.02}, {"upload": [{"name": "quantize", "bits": 4}]}),
]


def ring_accuracy(rounds: int, seed: int) -> None:
    """Fashion-MNIST (examples/fashion_secagg.yaml without dropouts, 200 examples a client, FedAvgM,
    cohort 20), ``rounds`` rounds per variant: final accuracy, bytes per upload, coordinates clipped
    by the ring's range."""
    from flotilla.api import run_experiment
    from flotilla.config import validate

    base = {
        "seed": seed,
        "task": {
            "name": "fashion-mnist",
            "partition": "dirichlet",
            "num_clients": 100,
            "alpha": 0.5,
            "examples_per_client": 200,  # (a few minutes per variant on a shared machine)
        },
        "rounds": rounds,
        "cohort": 20,
        "threads": 1,
        "client": {"epochs": 1, "batch_size": 20, "lr": 0.05},
        "server": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9},
        "eval": {"every": rounds},
        "output": {"progress": False},
    }
    print("| upload | accuracy | bytes per upload | vs fp32 | ring bits | coordinates clipped / round | wall s |")
    print("|---|---|---|---|---|---|---|")
    fp32 = None
    for name, secure, channels in RING_VARIANTS:
        cfg = {
            **base,
            **({"secure_aggregation": secure} if secure else {}),
            **({"channels": channels} if channels else {}),
        }
        t0 = time.perf_counter()
        r = run_experiment(validate(cfg), write_run_dir=False)
        wall = time.perf_counter() - t0
        last = r.history[-1]
        numel = r.weights.numel()
        up = last.get("secagg_upload_bytes", 4 * (numel + 1) if secure else 4 * numel)
        fp32 = fp32 or 4 * numel
        clipped = sum(h.get("secagg_clipped", 0) for h in r.history) / len(r.history)
        print(
            f"| {name} | {last['accuracy']:.3f} | {up:,} | {fp32 / up:.1f}x | {last.get('secagg_ring_bits', 32 if secure else '-')} "
            f"| {clipped:,.0f} | {wall:.0f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--dropout", type=float, default=0.1, help="fraction dropping before masked input (extra rows)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (the crypto and numpy work is single-threaded anyway; 1 keeps the "
        "plaintext reference from thrashing on a shared machine)",
    )
    p.add_argument(
        "--full-max",
        type=int,
        default=100,
        help="run the complete graph only up to this many clients (its cost grows as n^2)",
    )
    p.add_argument("--ring-accuracy", action="store_true", help="accuracy and bytes of quantising into the ring")
    p.add_argument("--rounds", type=int, default=10, help="--ring-accuracy: rounds per variant")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ring_accuracy:
        ring_accuracy(args.rounds, args.seed)
        return
    ds = deltas(args.numel)
    rows = []
    for n in args.clients:
        base = plaintext(args.numel, n, ds)
        runs = []
        if n <= args.full_max:
            runs += [("sync, complete graph", None, 0.0), ("sync, complete graph", None, args.dropout)]
        runs += [("sync, SecAgg+", default_degree(n), 0.0), ("sync, SecAgg+", default_degree(n), args.dropout)]
        for name, degree, drop in runs:
            r = sync(args.numel, n, degree, drop, ds)
            rows.append((name, n, drop, r, base))
            print(f"  done: {name} n={n} drop={drop}: {r['client'] + r['server']:.2f}s", flush=True)
        r = buffer(args.numel, n, ds)
        rows.append((f"async buffer, K={n}", n, 0.0, r, base))
        print(f"  done: buffer n={n}", flush=True)

    print(
        f"\n{args.numel:,} parameters, float32 deltas, ring 2^32, seconds of CPU compute per round. "
        f"'added' = wall time of the secure round minus the plaintext weighted mean of the same updates.\n"
    )
    print(
        "| mode | clients | neighbours k / threshold t | dropped | clients, total | per client | server | "
        "secure round | plaintext | added |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, drop, r, base in rows:
        kt = f"{r['k']} / {r['t']}" if r["k"] is not None else "-"
        print(
            f"| {name} | {n} | {kt} | {drop:.0%} | {r['client']:.2f} | {r['client'] / n * 1e3:.1f} ms | "
            f"{r['server']:.2f} | {r['wall']:.2f} | {base:.2f} | {r['wall'] - base:.2f} |"
        )


if __name__ == "__main__":
    main()
