"""Benchmark (c): the FedBuff / Papaya comparison in simulated time.

FedAvgM (synchronous, over-selection 1.3), FedAsync and FedBuff (K=10, staleness 1/sqrt(1+tau))
at concurrency 10, 100 and 1,000, on Shakespeare and Fashion-MNIST, with heavy-tailed
(log-normal) device speeds.  For each run: simulated time and client trips (model downloads)
until a target test accuracy, bytes, wasted work, staleness; plus plots of accuracy against
simulated time and against trips.

Sized for a small shared CPU (see docs/fleet.md for exactly what was run):

    .venv/bin/python benchmarks/fleet_papaya.py --task fashion --out docs/fleet
    .venv/bin/python benchmarks/fleet_papaya.py --task shakespeare --out docs/fleet

Models are deliberately small (an MLP with one hidden layer of 32 for Fashion-MNIST; a 1-layer
character LSTM with 32 hidden units over 20 characters for Shakespeare), local training is one
epoch over a client's few examples, and accuracy is measured on a fixed random sample of 2,000
test examples.  Each run stops at the target accuracy or at the trip budget.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.client import ClientSpec
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.core.staleness import polynomial
from flotilla.fleet import make_fleet
from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim

ALGOS = ("fedavgm", "fedasync", "fedbuff")


# --- tasks ---------------------------------------------------------------------------------
def fashion_task(seed: int):
    from flotilla.data import fashion_mnist_federated

    data = fashion_mnist_federated(
        partition="dirichlet", num_clients=1000, alpha=0.5, examples_per_client=40, seed=seed
    )

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    return data, model, ClientSpec(epochs=1, batch_size=10, lr=0.05)


def shakespeare_task(seed: int):
    from flotilla.data import VOCAB_SIZE, shakespeare_federated
    from flotilla.tasks.models import CharLSTM

    data = shakespeare_federated(seq_len=20, max_train_samples_per_client=40, seed=seed)

    def model():
        torch.manual_seed(seed)
        return CharLSTM(VOCAB_SIZE, embed_dim=8, hidden=32, layers=1)

    return data, model, ClientSpec(epochs=1, batch_size=10, lr=1.0)


TASKS = {"fashion": fashion_task, "shakespeare": shakespeare_task}


def eval_sample(data, n: int, seed: int):
    """A fixed random sample of ``n`` test examples pooled over all clients: one batch."""
    all_idx = torch.cat([data.test_indices[c] for c in range(data.num_clients)])
    g = torch.Generator().manual_seed(seed)
    idx = all_idx[torch.randperm(len(all_idx), generator=g)[:n]]
    return data.fetch_test(idx)


@torch.no_grad()
def accuracy(alg, batch) -> float:
    alg.flat.load(alg.weights)
    model = alg.flat.model
    model.eval()
    x, y = batch
    return float((model(x).argmax(-1) == y).float().mean())


# --- one run -------------------------------------------------------------------------------
def run(task: str, algo: str, concurrency: int, args, data, make_model, client: ClientSpec, batch) -> dict:
    model = make_model()
    numel = sum(p.numel() for p in model.parameters())
    fleet = make_fleet(
        population=args.population,
        seed=args.seed,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=numel * 4,
        epochs=client.epochs,
        steps=client.steps,
        batch_size=client.batch_size,
        speed={"dist": "lognormal", "median": args.speed_median, "sigma": args.sigma},
        bandwidth_down_mbps={"dist": "lognormal", "median": 20, "sigma": 0.5},
        bandwidth_up_mbps={"dist": "lognormal", "median": 5, "sigma": 0.5},
        dropout=args.dropout,
    )
    common = dict(fleet=fleet, client=client, seed=args.seed)
    if algo == "fedavgm":
        cohort = max(1, int(concurrency / 1.3))
        alg = SyncFleetSim(
            model,
            data,
            F.cross_entropy,
            cohort=cohort,
            over_selection=1.3,
            server=ServerOptimizerSpec("fedavgm", lr=args.sync_lr, momentum=0.9),
            **common,
        )
    elif algo == "fedbuff":
        alg = AsyncFleetSim(
            model,
            data,
            F.cross_entropy,
            concurrency=concurrency,
            algorithm="fedbuff",
            buffer_size=10,
            staleness=polynomial(0.5),
            max_staleness=args.max_staleness,
            server=ServerOptimizerSpec(args.fedbuff_opt, lr=args.fedbuff_lr, momentum=0.9),
            **common,
        )
    else:
        alg = AsyncFleetSim(
            model,
            data,
            F.cross_entropy,
            concurrency=concurrency,
            algorithm="fedasync",
            staleness=polynomial(0.5),
            mixing=args.mixing,
            max_staleness=args.max_staleness,
            **common,
        )
    eval_every = max(args.eval_min_trips, concurrency // 5)
    curve = [{"trips": 0, "uploads": 0, "sim_time_s": 0.0, "accuracy": accuracy(alg, batch)}]
    next_eval = eval_every
    hit = None
    staleness = []
    t0 = time.perf_counter()
    m = {}
    while True:
        m = alg.step()
        if m.get("staleness_mean") is not None:
            staleness.append(m["staleness_mean"])
        if m["trips"] >= next_eval or m["trips"] >= args.max_trips:
            next_eval = m["trips"] + eval_every
            acc = accuracy(alg, batch)
            curve.append({"trips": m["trips"], "uploads": m["uploads"], "sim_time_s": m["sim_time_s"], "accuracy": acc})
            if acc >= args.target:
                hit = curve[-1]
                break
            if m["trips"] >= args.max_trips:
                break
    host = time.perf_counter() - t0
    out = {
        "task": task,
        "algo": algo,
        "concurrency": concurrency,
        "target": args.target,
        "reached": hit is not None,
        "time_to_target_s": hit["sim_time_s"] if hit else None,
        "trips_to_target": hit["trips"] if hit else None,
        "uploads_to_target": hit["uploads"] if hit else None,
        "final_accuracy": curve[-1]["accuracy"],
        "trips": m["trips"],
        "sim_time_s": m["sim_time_s"],
        "server_steps": m["round"],
        "bytes_down": m["bytes_down"],
        "bytes_up": m["bytes_up"],
        "wasted_trips": m["wasted_trips"],
        "wasted_device_s": m["wasted_device_s"],
        "mean_staleness": float(np.mean(staleness)) if staleness else 0.0,
        "concurrency_achieved": m["concurrency"],
        "host_s": host,
        "curve": curve,
    }
    if isinstance(alg, AsyncFleetSim):
        out["staleness_hist"] = alg.staleness_histogram()
        out["peak_snapshots"] = alg.peak_snapshots
    return out


def plot(results: list[dict], path: Path, task: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted({r["concurrency"] for r in results})
    fig, axes = plt.subplots(2, len(concs), figsize=(4.2 * len(concs), 7), squeeze=False)
    colors = {"fedavgm": "tab:blue", "fedasync": "tab:orange", "fedbuff": "tab:green"}
    for j, c in enumerate(concs):
        for r in results:
            if r["concurrency"] != c:
                continue
            xs_t = [p["sim_time_s"] for p in r["curve"]]
            xs_n = [p["trips"] for p in r["curve"]]
            ys = [p["accuracy"] for p in r["curve"]]
            axes[0][j].plot(xs_t, ys, color=colors[r["algo"]], label=r["algo"])
            axes[1][j].plot(xs_n, ys, color=colors[r["algo"]], label=r["algo"])
        for i, xl in enumerate(("simulated time (s)", "client trips (downloads)")):
            ax = axes[i][j]
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set(xlabel=xl, ylabel="test accuracy", title=f"{task}, concurrency {c}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = [
        "| task | C | algorithm | time to target (sim s) | trips to target | final acc | trips run | wasted trips | mean staleness | server steps | host s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = f"{r['time_to_target_s']:.0f}" if r["reached"] else f"not reached ({r['sim_time_s']:.0f})"
        n = f"{r['trips_to_target']}" if r["reached"] else f"> {r['trips']}"
        lines.append(
            f"| {r['task']} | {r['concurrency']} | {r['algo']} | {t} | {n} | {r['final_accuracy']:.3f} | {r['trips']} | "
            f"{r['wasted_trips']} | {r['mean_staleness']:.1f} | {r['server_steps']} | {r['host_s']:.0f} |"
        )
    return "\n".join(lines)


def speedups(results: list[dict]) -> str:
    lines = [
        "| task | C | FedAvgM / FedBuff time | FedAsync / FedBuff time | FedAvgM / FedBuff trips | FedAsync / FedBuff trips |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["task"], r["concurrency"], r["algo"]): r for r in results}
    for task, c in sorted({(r["task"], r["concurrency"]) for r in results}):
        fb = by.get((task, c, "fedbuff"))

        def ratio(algo, key):
            o = by.get((task, c, algo))
            if not (fb and o and fb["reached"]):
                return "-"
            if not o["reached"]:
                other = o["sim_time_s"] if key == "time_to_target_s" else o["trips"]
                return f"> {other / fb[key]:.1f}x"
            return f"{o[key] / fb[key]:.1f}x"

        lines.append(
            f"| {task} | {c} | {ratio('fedavgm', 'time_to_target_s')} | {ratio('fedasync', 'time_to_target_s')} | "
            f"{ratio('fedavgm', 'trips_to_target')} | {ratio('fedasync', 'trips_to_target')} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--concurrency", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--target", type=float, help="target test accuracy (default: fashion 0.75, shakespeare 0.30)")
    p.add_argument("--max-trips", type=int, help="trip budget per run (default: fashion 20000, shakespeare 12000)")
    p.add_argument("--population", type=int, default=1_000_000)
    p.add_argument("--speed-median", type=float, default=10.0, help="examples per second (median device)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of device speed (heavy tail)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sync-lr", type=float, default=1.0)
    p.add_argument(
        "--fedbuff-opt",
        choices=["fedavg", "fedavgm"],
        default="fedavg",
        help="FedBuff's server optimizer (fedavgm uses momentum 0.9)",
    )
    p.add_argument("--fedbuff-lr", type=float, default=1.0)
    p.add_argument("--mixing", type=float, default=0.6)
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--eval-min-trips", type=int, default=20)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for <task>_results.json, <task>_table.md and <task>.png")
    p.add_argument(
        "--replot", action="store_true", help="only redraw the plots and tables from <out>/<task>_results.json"
    )
    args = p.parse_args()
    if args.replot:
        saved = json.loads((Path(args.out) / f"{args.task}_results.json").read_text())
        write_outputs(Path(args.out), args.task, saved["summary"], saved["args"], saved["results"])
        return
    args.target = args.target if args.target is not None else {"fashion": 0.75, "shakespeare": 0.30}[args.task]
    args.max_trips = args.max_trips or {"fashion": 20000, "shakespeare": 12000}[args.task]
    torch.set_num_threads(1)
    data, make_model, client = TASKS[args.task](args.seed)
    batch = eval_sample(data, args.eval_examples, args.seed)
    results = []
    t0 = time.perf_counter()
    for c in args.concurrency:
        for algo in args.algos:
            r = run(args.task, algo, c, args, data, make_model, client, batch)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("curve", "staleness_hist")}), flush=True)
    load = os.getloadavg()
    summary = (
        f"{args.task}: target accuracy {args.target}, trip budget {args.max_trips}, population {args.population}, "
        f"speed lognormal(median {args.speed_median} ex/s, sigma {args.sigma}), dropout {args.dropout}; "
        f"FedAvgM: cohort floor(C/1.3), over-selection 1.3, server lr {args.sync_lr} momentum 0.9; "
        f"FedBuff: K=10, 1/sqrt(1+tau), mean, server {args.fedbuff_opt} lr {args.fedbuff_lr}; "
        f"FedAsync: mixing {args.mixing}, 1/sqrt(1+tau); max staleness {args.max_staleness}; seed {args.seed}; "
        f"host time {time.perf_counter() - t0:.0f} s, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(summary)
    print(table(results))
    print(speedups(results))
    if args.out:
        write_outputs(Path(args.out), args.task, summary, vars(args), results)


def write_outputs(out: Path, task: str, summary: str, args: dict, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}_results.json").write_text(
        json.dumps({"summary": summary, "args": args, "results": results}, indent=1)
    )
    (out / f"{task}_table.md").write_text(summary + "\n\n" + table(results) + "\n\n" + speedups(results) + "\n")
    plot(results, out / f"{task}.png", task, args["target"])
    plot_staleness(results, out / f"{task}_staleness.png", task)


def plot_staleness(results: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r.get("staleness_hist")]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        h = {int(k): v for k, v in r["staleness_hist"].items()}
        taus = sorted(h)
        total = sum(h.values())
        ax.step(taus, [h[t] / total for t in taus], where="mid", label=f"{r['algo']} C={r['concurrency']}")
    ax.set(
        xlabel="staleness tau (server versions)",
        ylabel="fraction of applied updates",
        title=f"{task}: staleness histogram",
        xscale="symlog",
        yscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
