"""READ against LoRA, bottleneck adapters, BitFit, head-only and full fine-tuning (issue 18).

Every method fine-tunes the same pre-trained character transformer (flotilla.adapters.backbone;
pre-trained on the proxy plays on first use, then cached) on the federated plays' roles, with
the same client update Flotilla runs everywhere (LocalTrainer: plain SGD on the flat vector of
trainable parameters), so the step time and memory are what a device would pay.

    nice -n 10 .venv/bin/python benchmarks/read.py                  # the tables in docs/read.md
    nice -n 10 .venv/bin/python benchmarks/read.py --central-steps 20 --rounds 2 --methods read head  # smoke

Per method:
- trainable parameters, and bytes per round = cohort x (download + upload) x 4 bytes x trainable;
- peak training memory of one step (flotilla.adapters.memory: weights + gradients + optimizer
  state + activations saved for backward, by saved-tensor accounting) at the training batch;
- time per step (central training, median over the run's steps, one torch thread);
- central: SGD on the pooled training windows of every federated role, the learning rate picked
  from --lrs by held-out loss; federated: FedAvg rounds with that learning rate on the clients;
  quality is next-character loss and accuracy on the test windows of a fixed set of roles.
Writes benchmarks/out/read.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import functional as F

from flotilla.adapters.memory import step_memory
from flotilla.adapters.methods import METHODS
from flotilla.config import validate
from flotilla.core.aggregate import UpdateRejected
from flotilla.core.client import ClientSpec, LocalTrainer
from flotilla.core.evaluate import eval_clients, evaluate
from flotilla.core.flat import FlatModel
from flotilla.experiment.run import build
from flotilla.tasks import build_task
from flotilla.tasks.shakespeare_finetune import LMWindows, ShakespeareFinetuneTask, federated_data, model

OUT = Path(__file__).resolve().parent / "out" / "read.json"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def task_cfg(method: str) -> dict:
    return {"name": "shakespeare-finetune", "method": method}


def pooled(data: LMWindows) -> LMWindows:
    """One 'client' holding every role's training windows: central training."""
    return LMWindows(data._stream.numpy(), data.seq_len, [torch.cat(data.train_indices)], None, ["pooled"])


def central(method: str, data, eval_set, args) -> dict:
    """Best-lr central SGD run: quality, time per step."""
    cfg = ShakespeareFinetuneTask.model_validate(task_cfg(method))
    pool = pooled(data)
    best = None
    for lr in args.lrs:
        m = model(cfg, seed=0)
        flat = FlatModel(m)
        start = flat.flat.clone()
        delta = torch.empty_like(start)
        trainer = LocalTrainer(
            flat, F.cross_entropy, ClientSpec(steps=args.central_steps, batch_size=args.batch, lr=lr)
        )
        t0 = time.perf_counter()
        result = trainer.train(pool, 0, start, 0, delta)
        secs = time.perf_counter() - t0
        record = evaluate(flat, flat.flat.clone(), data, eval_set, F.cross_entropy)
        row = {"lr": lr, "loss": record["loss"], "accuracy": record["accuracy"], "train_loss": result.loss}
        row["step_ms"] = 1000 * secs / args.central_steps
        print(
            f"  central {method} lr {lr}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
            f"({row['step_ms']:.0f} ms/step)",
            flush=True,
        )
        if not math.isfinite(row["loss"]):
            row["loss"] = math.inf  # diverged at this lr
        if best is None or row["loss"] < best["loss"]:
            best = row
    return best


def memory(method: str, data, args) -> dict:
    cfg = ShakespeareFinetuneTask.model_validate(task_cfg(method))
    m = model(cfg, seed=0)
    FlatModel(m)  # as in training: trainable parameters (and gradients) live in one flat vector
    x, y = data.fetch(data.train_indices[0][: args.batch])
    mem = step_memory(m, F.cross_entropy, x, y)
    return {
        "trainable": mem.trainable,
        "weights_bytes": mem.weights,
        "gradient_bytes": mem.gradients,
        "activation_bytes": mem.activations,
        "peak_sgd_bytes": mem.total(0),
        "peak_adam_bytes": mem.total(8),
    }


def federated(method: str, lr: float, args) -> dict:
    cfg = validate(
        {
            "seed": 0,
            "rounds": args.rounds,
            "cohort": args.cohort,
            "threads": 1,
            "task": task_cfg(method),
            "client": {"steps": args.client_steps, "batch_size": args.batch, "lr": lr},
            "server": {"optimizer": "fedavg", "lr": 1.0},
            "eval": {"every": args.rounds, "max_clients": args.eval_clients},
            "output": {"progress": False},
        }
    )
    task = build_task(cfg.task, cfg.seed)
    algorithm, rounds, evaluate_fn, _ = build(cfg, task)
    t0 = time.perf_counter()
    try:
        for _ in range(rounds):
            algorithm.step()
        record = evaluate_fn(algorithm.weights)
    except UpdateRejected as e:  # a client diverged at this lr
        record = {"loss": math.inf, "accuracy": 0.0, "error": str(e)}
    finally:
        algorithm.close()
    n = algorithm.flat.numel
    return {
        "loss": record["loss"],
        "accuracy": record["accuracy"],
        "seconds": time.perf_counter() - t0,
        "flat_numel": n,
        "bytes_per_round": args.cohort * 2 * 4 * n,
    }


def interleaved_timing(methods, data, args) -> dict:
    """ms per training step, methods interleaved (--timing-repeats x --timing-steps each), so a
    change of machine load hits every method alike; the median over repeats."""
    trainers = {}
    pool = pooled(data)
    for method in methods:
        m = model(ShakespeareFinetuneTask.model_validate(task_cfg(method)), seed=0)
        flat = FlatModel(m)
        spec = ClientSpec(steps=args.timing_steps, batch_size=args.batch, lr=0.1)
        trainers[method] = (LocalTrainer(flat, F.cross_entropy, spec), flat.flat.clone(), torch.empty(flat.numel))
    times = {m: [] for m in methods}
    for repeat in range(args.timing_repeats):
        for method, (trainer, start, delta) in trainers.items():
            t0 = time.perf_counter()
            trainer.train(pool, 0, start, repeat, delta)
            times[method].append(1000 * (time.perf_counter() - t0) / args.timing_steps)
    return {m: {"median_ms": statistics.median(t), "all_ms": t} for m, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--central-steps", type=int, default=60)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cohort", type=int, default=4)
    p.add_argument("--client-steps", type=int, default=5)
    p.add_argument("--eval-clients", type=int, default=20)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--central-only", action="store_true", help="skip the federated runs (an lr sweep)")
    p.add_argument("--timing-only", action="store_true", help="only the interleaved step timing")
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--timing-repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = load()
    cfg = ShakespeareFinetuneTask.model_validate(task_cfg("read"))
    data = federated_data(cfg, 0)
    eval_set = eval_clients(data, args.eval_clients, 0)
    backbone = model(ShakespeareFinetuneTask.model_validate(task_cfg("head")), seed=0)
    flat = FlatModel(backbone)
    zero = evaluate(flat, flat.flat.clone(), data, eval_set, F.cross_entropy)
    print(
        f"backbone (no fine-tuning): loss {zero['loss']:.4f} acc {zero['accuracy']:.4f}; "
        f"{data.num_clients} federated roles; load {load_before}",
        flush=True,
    )
    if args.timing_only:
        timing = interleaved_timing(args.methods, data, args)
        for m, t in timing.items():
            print(f"{m}: {t['median_ms']:.0f} ms/step (median of {args.timing_repeats})")
        out = {"args": {**vars(args), "out": str(args.out)}, "timing": timing, "load_before": load_before}
        out["load_after"] = load()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"load {load_before} -> {out['load_after']}; wrote {args.out}")
        return
    rows = {}
    for method in args.methods:
        row = {"method": method, **memory(method, data, args)}
        row["central"] = central(method, data, eval_set, args)
        if not args.central_only:
            row["federated"] = federated(method, row["central"]["lr"], args)
        rows[method] = row
        print(json.dumps(row), flush=True)
    out = {
        "args": vars(args),
        "backbone": {
            "loss": zero["loss"],
            "accuracy": zero["accuracy"],
            "params": sum(p.numel() for p in backbone.parameters()),
        },
        "federated_roles": data.num_clients,
        "rows": rows,
        "load_before": load_before,
        "load_after": load(),
        "median_step_ms": statistics.median(r["central"]["step_ms"] for r in rows.values()),
    }
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    out["args"] = {**vars(args), "out": str(path)}
    path.write_text(json.dumps(out, indent=1))
    print(f"load {load_before} -> {out['load_after']}; wrote {path}")


if __name__ == "__main__":
    main()
