"""Channels benchmark (issue 19): bytes and simulated time to a target accuracy, FedAvgM in fp32 vs
FedBuff with each channel, on the fleet simulator (docs/channels.md quotes its tables).

    nice -n 10 .venv/bin/python benchmarks/channels.py --task fashion --out docs/channels
    nice -n 10 .venv/bin/python benchmarks/channels.py --task shakespeare --out docs/channels
    nice -n 10 .venv/bin/python benchmarks/channels.py --movielens-rows --rows-rounds 10 --out docs/channels

``--movielens-rows``: sparse embedding rows composed with each upload chain (flotilla/channels/rows.py)
on examples/movielens.yaml (RF^2's setup): every user's exact message size, then, with
``--rows-rounds N``, N rounds of that config per chain (cumulative bytes_up, test AUC after round N).

The setting is benchmarks/fleet_papaya.py's (same small models, data, heavy-tailed device speeds,
FedBuff K=10 with 1/sqrt(1+tau), FedAvgM with over-selection 1.3): only the channels change.  Trip
durations use each message's compressed size (download and upload bandwidths are per device), and
bytes_down / bytes_up count every trip's download and every arrival's upload.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_papaya import TASKS, accuracy, eval_sample  # noqa: E402

from flotilla.channels.sim import compose, message_bytes  # noqa: E402
from flotilla.core.protocols import Components  # noqa: E402
from flotilla.core.server_opt import ServerOptimizerSpec  # noqa: E402
from flotilla.core.staleness import polynomial  # noqa: E402
from flotilla.fleet import make_fleet  # noqa: E402
from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim  # noqa: E402

Q8 = {"name": "quantize", "bits": 8, "per_channel": True}
Q8_DOWN = {**Q8, "stochastic": False}
RUNS = {  # name -> (algorithm, channels or None)
    "fedavgm fp32": ("fedavgm", None),
    "fedbuff fp32": ("fedbuff", None),
    "fedbuff fp16": ("fedbuff", {"upload": [{"name": "fp16"}], "download": [{"name": "fp16"}]}),
    "fedbuff q8": ("fedbuff", {"upload": [Q8], "download": [Q8_DOWN]}),
    "fedbuff q4 up": (
        "fedbuff",
        {"upload": [{"name": "quantize", "bits": 4, "per_channel": True}], "download": [{"name": "fp16"}]},
    ),
    "fedbuff top10%+EF": (
        "fedbuff",
        {"upload": [{"name": "topk", "keep": 0.1}], "download": [{"name": "fp16"}], "error_feedback": True},
    ),
    "fedbuff top10%+q8+EF": (
        "fedbuff",
        {"upload": [{"name": "topk", "keep": 0.1}, Q8], "download": [Q8_DOWN], "error_feedback": True},
    ),
}


def build(name: str, concurrency: int, args, data, make_model, client):
    algo, channels = RUNS[name]
    model = make_model()
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    down, up = message_bytes(channels, shapes)
    fleet = make_fleet(
        population=args.population,
        seed=args.seed,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=sum(p.numel() for p in model.parameters()) * 4,
        epochs=client.epochs,
        steps=client.steps,
        batch_size=client.batch_size,
        speed={"dist": "lognormal", "median": args.speed_median, "sigma": args.sigma},
        bandwidth_down_mbps={"dist": "lognormal", "median": 20, "sigma": 0.5},
        bandwidth_up_mbps={"dist": "lognormal", "median": 5, "sigma": 0.5},
        download_bytes=down,
        upload_bytes=up,
    )
    kw = dict(model=model, dataset=data, loss_fn=F.cross_entropy, fleet=fleet, client=client, seed=args.seed)
    if algo == "fedavgm":
        cls = SyncFleetSim
        kw.update(
            cohort=max(1, int(concurrency / 1.3)),
            over_selection=1.3,
            server=ServerOptimizerSpec("fedavgm", lr=args.sync_lr, momentum=0.9),
        )
    else:
        cls = AsyncFleetSim
        kw.update(
            concurrency=concurrency,
            algorithm="fedbuff",
            buffer_size=10,
            staleness=polynomial(0.5),
            server=ServerOptimizerSpec("fedavg", lr=args.fedbuff_lr),
        )
    if channels is None:
        return cls(**kw), down, up
    components, wrap = compose(channels, cls.shape(**kw), Components(), privacy=None, secure=False)
    return wrap(cls(**kw, components=components)), down, up


def run(task: str, name: str, concurrency: int, args, data, make_model, client, batch) -> dict:
    alg, down, up = build(name, concurrency, args, data, make_model, client)
    eval_every = max(args.eval_min_trips, concurrency // 5)
    next_eval, hit, m = eval_every, None, {}
    curve = [{"trips": 0, "sim_time_s": 0.0, "bytes": 0, "accuracy": accuracy(alg, batch)}]
    t0 = time.perf_counter()
    while True:
        m = alg.step()
        if m["trips"] >= next_eval or m["trips"] >= args.max_trips:
            next_eval = m["trips"] + eval_every
            acc = accuracy(alg, batch)
            curve.append(
                {
                    "trips": m["trips"],
                    "sim_time_s": m["sim_time_s"],
                    "bytes_down": m["bytes_down"],
                    "bytes_up": m["bytes_up"],
                    "accuracy": acc,
                }
            )
            if acc >= args.target:
                hit = curve[-1]
                break
            if m["trips"] >= args.max_trips:
                break
    return {
        "task": task,
        "run": name,
        "concurrency": concurrency,
        "target": args.target,
        "message_bytes": {"down": down, "up": up},
        "reached": hit is not None,
        "time_to_target_s": hit["sim_time_s"] if hit else None,
        "trips_to_target": hit["trips"] if hit else None,
        "bytes_down_to_target": hit["bytes_down"] if hit else None,
        "bytes_up_to_target": hit["bytes_up"] if hit else None,
        "final_accuracy": curve[-1]["accuracy"],
        "trips": m["trips"],
        "sim_time_s": m["sim_time_s"],
        "host_s": time.perf_counter() - t0,
        "residual_clients": m.get("residual_clients"),
        "curve": curve,
    }


def _mb(x) -> str:
    return f"{x / 1e6:.1f}"


def table(results: list[dict]) -> str:
    lines = [
        "| task | C | run | bytes/msg down, up | time to target (sim s) | trips | MB down | MB up | MB total | "
        "FedAvgM fp32 total / this | FedBuff fp32 total / this | host s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["task"], r["concurrency"], r["run"]): r for r in results}
    for r in results:
        mb = f"{r['message_bytes']['down']:,}, {r['message_bytes']['up']:,}"
        if not r["reached"]:
            lines.append(
                f"| {r['task']} | {r['concurrency']} | {r['run']} | {mb} | not reached "
                f"({r['final_accuracy']:.3f} after {r['trips']} trips) | | | | | | | {r['host_s']:.0f} |"
            )
            continue
        total = r["bytes_down_to_target"] + r["bytes_up_to_target"]

        def ratio(base):
            b = by.get((r["task"], r["concurrency"], base))
            if b is None or not b["reached"]:
                return "-"
            return f"{(b['bytes_down_to_target'] + b['bytes_up_to_target']) / total:.1f}x"

        lines.append(
            f"| {r['task']} | {r['concurrency']} | {r['run']} | {mb} | {r['time_to_target_s']:.0f} | "
            f"{r['trips_to_target']} | {_mb(r['bytes_down_to_target'])} | {_mb(r['bytes_up_to_target'])} | "
            f"{_mb(total)} | {ratio('fedavgm fp32')} | {ratio('fedbuff fp32')} | {r['host_s']:.0f} |"
        )
    return "\n".join(lines)


ROW_CHAINS = {  # name -> channels section (upload only: downloads stay fp32 here)
    "rows fp32": {},
    "rows fp16": {"upload": [{"name": "fp16"}]},
    "rows q8 per row": {"upload": [Q8]},
    "rows q4 per row": {"upload": [{"name": "quantize", "bits": 4, "per_channel": True}]},
    "rows q8 per tensor": {"upload": [{"name": "quantize", "bits": 8}]},
    "rows top10%+EF": {"upload": [{"name": "topk", "keep": 0.1}], "error_feedback": True},
    "rows top10%+q8+EF": {"upload": [{"name": "topk", "keep": 0.1}, Q8], "error_feedback": True},
}


def movielens_rows(args) -> None:
    """Per-user message sizes of row-sparse uploads through each chain, and optionally short training runs."""
    from flotilla.algorithms.rowwise import layout
    from flotilla.channels.config import as_channels
    from flotilla.channels.rows import RowsCodec
    from flotilla.config import apply_overrides, load_config, read_yaml, validate
    from flotilla.experiment.run import run_experiment
    from flotilla.tasks import build_task

    example = Path(__file__).resolve().parents[1] / "examples" / "movielens.yaml"
    cfg = load_config(example)
    task = build_task(cfg.task, cfg.seed)
    model, data = task.model, task.dataset
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    numel = sum(math.prod(s) for s in shapes)
    tables = layout(model, data.tables)
    users = [data.embedding_rows(c) for c in range(data.num_clients)]
    lines = [
        f"MovieLens DLRM ({numel:,} parameters; tables {', '.join(f'{t.name} {t.rows}x{t.dim}' for t in tables)}); "
        f"{len(users)} users; dense fp32 upload {4 * numel:,} bytes",
        "",
        "| upload | mean bytes | max bytes | dense fp32 / mean | rows fp32 / mean |",
        "|---|---|---|---|---|",
    ]
    base = None
    for name, channels in ROW_CHAINS.items():
        codec = RowsCodec(as_channels(channels).steps("upload"), shapes, tables)
        sizes = np.array([codec.message_bytes(r) for r in users], dtype=np.float64)
        base = base if base is not None else sizes.mean()
        lines.append(
            f"| {name} | {sizes.mean():,.0f} | {sizes.max():,.0f} | {4 * numel / sizes.mean():.1f}x | "
            f"{base / sizes.mean():.2f}x |"
        )
    print("\n".join(lines), flush=True)
    if args.rows_rounds:
        lines += [
            "",
            f"{args.rows_rounds} rounds of examples/movielens.yaml (cohort {cfg.cohort}, seed {cfg.seed}) per chain:",
            "",
            "| upload | MB up | AUC | AP | test loss | host s |",
            "|---|---|---|---|---|---|",
        ]
        for name, channels in ROW_CHAINS.items():
            over = [f"rounds={args.rows_rounds}", f"eval.every={args.rows_rounds}", "output.progress=false"]
            raw = apply_overrides(read_yaml(example), over)
            run_cfg = validate({**raw, "channels": channels})  # the schema checks rows + channels compose
            t0 = time.perf_counter()
            last = run_experiment(run_cfg, write_run_dir=False).history[-1]
            row = (
                f"| {name} | {last['bytes_up'] / 1e6:.2f} | {last['auc']:.3f} | {last['ap']:.3f} | "
                f"{last['loss']:.3f} | {time.perf_counter() - t0:.0f} |"
            )
            print(row, flush=True)
            lines.append(row)
    load = os.getloadavg()
    lines.append(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "movielens_rows_table.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--movielens-rows", action="store_true", help="row-sparse uploads x channels on MovieLens")
    p.add_argument("--rows-rounds", type=int, default=0, help="with --movielens-rows: train N rounds per chain")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--target", type=float, help="target test accuracy (default: fashion 0.75, shakespeare 0.30)")
    p.add_argument("--max-trips", type=int, help="trip budget per run (default: fashion 20000, shakespeare 12000)")
    p.add_argument("--population", type=int, default=1_000_000)
    p.add_argument("--speed-median", type=float, default=10.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--sync-lr", type=float, default=1.0)
    p.add_argument("--fedbuff-lr", type=float, default=1.0)
    p.add_argument("--eval-min-trips", type=int, default=20)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for <task>_results.json and <task>_table.md")
    p.add_argument(
        "--from-log",
        help="only write the table from the JSON lines this script printed (a run cut short keeps its finished runs)",
    )
    args = p.parse_args()
    if args.movielens_rows:
        movielens_rows(args)
        return
    if args.task is None:
        p.error("--task is required (or --movielens-rows)")
    if args.from_log:
        lines = [json.loads(x) for x in Path(args.from_log).read_text().splitlines() if x.startswith("{")]
        results = [r for r in lines if r["task"] == args.task]
        print(table(results))
        if args.out:
            note = f"{args.task}: table rebuilt from {Path(args.from_log).name} (finished runs only)"
            (Path(args.out) / f"{args.task}_table.md").write_text(note + "\n\n" + table(results) + "\n")
        return
    args.target = args.target if args.target is not None else {"fashion": 0.75, "shakespeare": 0.30}[args.task]
    args.max_trips = args.max_trips or {"fashion": 20000, "shakespeare": 12000}[args.task]
    torch.set_num_threads(1)
    data, make_model, client = TASKS[args.task](args.seed)
    batch = eval_sample(data, args.eval_examples, args.seed)
    results, t0 = [], time.perf_counter()
    for c in args.concurrency:
        for name in args.runs:
            r = run(args.task, name, c, args, data, make_model, client, batch)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    load = os.getloadavg()
    summary = (
        f"{args.task}: target accuracy {args.target}, trip budget {args.max_trips}, seed {args.seed}; "
        f"host time {time.perf_counter() - t0:.0f} s, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(summary)
    print(table(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.task}_results.json").write_text(
            json.dumps({"summary": summary, "args": vars(args), "results": results}, indent=1)
        )
        (out / f"{args.task}_table.md").write_text(summary + "\n\n" + table(results) + "\n")


if __name__ == "__main__":
    main()
