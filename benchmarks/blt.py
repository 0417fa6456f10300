"""BLT vs a byte transformer vs the CharLSTM on federated Shakespeare (issue 17; docs/blt.md).

    nice -n 10 python benchmarks/blt.py entropy             # train + cache the entropy model (~2 min)
    nice -n 10 python benchmarks/blt.py sweep               # mean patch size, global FLOPs/byte vs threshold
    python benchmarks/blt.py patches ["TEXT"]               # where patches start in TEXT
    python benchmarks/blt.py unigram                        # the byte-frequency floor, bits per byte
    nice -n 10 python benchmarks/blt.py train [--rounds 30] [--only blt,bt,...]   # one line per model

Every model trains federated with the same schedule (rounds x cohort x local steps x batch x bytes),
is scored in bits per byte on the held-out text of held-out roles (roles that never trained), and
its training FLOPs per byte are counted by PyTorch's FlopCounterMode on one batch.  Results go to
benchmarks/out/blt_sweep.json and blt_train_seed<S>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
SEQ = 128
BATCH = 16

# Model configurations: (task model section); BLT's global model runs once per ~4 bytes, so at
# about the same FLOPs per byte the byte transformer is narrower in total than BLT's global model.
MODELS = {
    "blt": {"name": "blt", "patching": "entropy", "target_patch_size": 4.0},
    "blt-space": {"name": "blt", "patching": "space"},
    "blt-fixed": {"name": "blt", "patching": "fixed", "patch_size": 4},
    "bt": {"name": "byte-transformer", "dim": 96, "layers": 2},
}


def load():
    return os.popen("uptime").read().strip()


def byte_cfg(model: dict, rounds: int, cohort: int, steps: int, lr: float, server_lr: float, seed: int = 0) -> dict:
    return {
        "seed": seed,
        "task": {"name": "shakespeare-bytes", "seq_len": SEQ, "model": model},
        "rounds": rounds,
        "cohort": cohort,
        "threads": 1,
        "client": {"steps": steps, "batch_size": BATCH, "lr": lr},
        "server": {"optimizer": "fedadam", "lr": server_lr},
        "eval": {"every": rounds, "max_clients": 20, "batch_size": 64},
        "output": {"progress": False},
    }


def run_bytes(name: str, args) -> dict:
    from flotilla.blt.metrics import bits_per_byte, score, train_flops
    from flotilla.config import validate
    from flotilla.experiment.run import run_experiment
    from flotilla.tasks import build_task
    from flotilla.tasks.shakespeare_bytes import heldout_roles

    cfg = validate(byte_cfg(MODELS[name], args.rounds, args.cohort, args.steps, args.lr, args.server_lr, args.seed))
    task = build_task(cfg.task, cfg.seed)
    x, y = task.dataset.fetch(task.dataset.train_indices[0][:BATCH])
    if len(x) < BATCH:
        x, y = task.dataset.fetch(torch.cat(task.dataset.train_indices)[:BATCH])
    flops = train_flops(task.model, x, y) / x.numel()
    params = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_experiment(cfg, task=task, write_run_dir=False)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    held = heldout_roles(cfg.task)
    nats, n = score(result.model, held, range(held.num_clients))
    record = {
        "model": name,
        "params": params,
        "train_flops_per_byte": flops,
        "train_bytes": args.rounds * args.cohort * args.steps * BATCH * SEQ,
        "heldout_bpb": bits_per_byte(nats, n),
        "heldout_bytes": n,
        "heldout_roles": held.num_clients,
        "sim_eval_loss_nats": result.history[-1].get("loss"),
        "s_per_round": train_s / args.rounds,
        "cpu_s_per_round": cpu_s / args.rounds,
    }
    model = result.model
    if getattr(model, "patching", None) is not None:
        from flotilla.blt.patcher import mean_patch_size

        xs = torch.cat([held.fetch(held.test_indices[c])[0] for c in range(held.num_clients)])[:256]
        record["mean_patch_size"] = mean_patch_size(model.starts(xs))
        record["threshold"] = model.threshold if model.patching == "entropy" else None
    record["total_train_flops"] = record["train_flops_per_byte"] * record["train_bytes"]
    return record


def run_charlstm(args) -> dict:
    """The existing shakespeare task's CharLSTM on the same training roles, scored on the held-out
    roles; its nats per character are divided by the UTF-8 bytes of exactly the characters scored."""
    from torch.nn import functional as F

    from flotilla.blt.data import load_role_bytes
    from flotilla.blt.metrics import bits_per_byte
    from flotilla.config import validate
    from flotilla.data.shakespeare import ShakespeareDataset
    from flotilla.experiment.run import run_experiment
    from flotilla.tasks import build_task
    from flotilla.tasks.registry import Task
    from flotilla.tasks.shakespeare_bytes import _eligible

    bcfg = validate(byte_cfg(MODELS["bt"], 1, 1, 1, 0.1, 0.1)).task
    rb = load_role_bytes()
    train_roles, held_roles = _eligible(bcfg, rb)
    cfg = validate(
        {
            "seed": args.seed,
            "task": {"name": "shakespeare", "seq_len": 80, "min_chars": 0},
            "rounds": args.rounds,
            "cohort": args.cohort,
            "threads": 1,
            "client": {"steps": args.steps, "batch_size": 32, "lr": 1.0},
            "server": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9},
            "eval": {"every": args.rounds, "max_clients": 20},
            "output": {"progress": False},
        }
    )
    full = build_task(cfg.task, cfg.seed).dataset
    by_name = {n: i for i, n in enumerate(full.client_names)}
    keep = [by_name[rb.names[r]] for r in train_roles if rb.names[r] in by_name]
    ds = ShakespeareDataset(
        full.text,
        80,
        [full.train_indices[c] for c in keep],
        [full.test_indices[c] for c in keep],
        [full.client_names[c] for c in keep],
    )
    torch.manual_seed(cfg.seed)
    model = build_task(cfg.task, cfg.seed).model
    task = Task("shakespeare", ds, model, F.cross_entropy)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_experiment(cfg, task=task, write_run_dir=False)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model = result.model.eval()
    nats, n_bytes, n_chars = 0.0, 0, 0
    with torch.no_grad():
        for r in held_roles:
            c = by_name[rb.names[r]]
            idx = full.test_indices[c]
            for i in range(0, len(idx), 512):
                x, y = full.fetch(idx[i : i + 512])
                nats += float(F.cross_entropy(model(x), y, reduction="sum"))
            text = rb.role(r).decode("utf-8")
            first = int(len(text) * 0.8) + 80  # the first scored character (the window's target)
            n_bytes += len(text[first:].encode("utf-8"))
            n_chars += len(idx)
            assert len(text) - first == len(idx), (rb.names[r], len(text) - first, len(idx))
    lstm_flops = 2 * 4 * (8 * 128 + 128 * 128) + 2 * 128 * 81  # per character: LSTM gates + head
    return {
        "model": "charlstm",
        "params": sum(p.numel() for p in model.parameters()),
        "train_flops_per_byte": None,
        "forward_flops_per_char_last_step": lstm_flops,
        "heldout_bpb": bits_per_byte(nats, n_bytes),
        "heldout_nats_per_char": nats / n_chars,
        "heldout_chars": n_chars,
        "heldout_bytes": n_bytes,
        "s_per_round": train_s / args.rounds,
        "cpu_s_per_round": cpu_s / args.rounds,
        "train_chars_predicted": args.rounds * args.cohort * args.steps * 32,
    }


def cmd_entropy(args) -> None:
    from flotilla.blt.entropy import train_and_save
    from flotilla.tasks.shakespeare_bytes import EntropyModelConfig, entropy_spec

    t0 = time.perf_counter()
    path = train_and_save(entropy_spec(EntropyModelConfig()))
    print(json.dumps({"checkpoint": str(path), "seconds": time.perf_counter() - t0, "load": load()}))


def cmd_sweep(args) -> None:
    from flotilla.blt.entropy import load_entropy_model
    from flotilla.blt.metrics import transformer_flops_per_token
    from flotilla.blt.patcher import calibrate_threshold, entropy_starts, mean_patch_size, space_starts
    from flotilla.config import validate
    from flotilla.tasks.shakespeare_bytes import BLTConfig, entropy_spec, heldout_roles

    cfg = validate(byte_cfg(MODELS["blt"], 1, 1, 1, 0.1, 0.1)).task
    model, calibration = load_entropy_model(entropy_spec(cfg.model.entropy))
    held = heldout_roles(cfg)
    x = torch.cat([held.fetch(held.test_indices[c])[0] for c in range(held.num_clients)])
    with torch.no_grad():
        ent = torch.cat([model.entropy(x[i : i + 64]) for i in range(0, len(x), 64)])
    g = BLTConfig(name="blt")
    rows = []

    def row(label, starts, theta=None, mode=None):
        size = mean_patch_size(starts)
        patches = starts[:, :-1].sum(1).float().mean().item()
        per_patch = transformer_flops_per_token(g.global_dim, g.global_layers, (patches + 1) / 2)
        rows.append(
            {
                "rule": label,
                "mode": mode,
                "threshold": theta,
                "mean_patch_size": size,
                "global_fwd_flops_per_byte": per_patch / size,
            }
        )

    for mode in ("global", "monotonic"):
        for target in (2.0, 3.0, 4.0, 6.0, 8.0):
            theta = calibrate_threshold(calibration, target, mode)
            row(f"entropy {mode}, calibrated to {target:g} on proxy", entropy_starts(ent, theta, mode), theta, mode)
    theta = calibrate_threshold(calibration, 4.0, "global")
    row("entropy global, target 4, max_patch 8", entropy_starts(ent, theta, "global", max_patch=8), theta, "global")
    row("space", space_starts(x))
    print(json.dumps({"rows": rows, "bytes": x.numel(), "load": load()}, indent=1))
    OUT.mkdir(exist_ok=True)
    (OUT / "blt_sweep.json").write_text(json.dumps({"rows": rows, "bytes": x.numel(), "load": load()}, indent=1))


def cmd_patches(args) -> None:
    """Show where patches start in ``args.text`` ('|' before each patch) for a few targets."""
    from flotilla.blt.bytes import encode
    from flotilla.blt.entropy import load_entropy_model
    from flotilla.blt.patcher import calibrate_threshold, entropy_starts, patch_lengths
    from flotilla.tasks.shakespeare_bytes import EntropyModelConfig, entropy_spec

    model, calibration = load_entropy_model(entropy_spec(EntropyModelConfig()))
    x = encode(args.text)[None]
    ent = model.entropy(x)
    for target in (2.0, 4.0, 8.0):
        starts = entropy_starts(ent, calibrate_threshold(calibration, target))
        raw, pos, parts = args.text.encode(), 0, []
        for n in patch_lengths(starts)[0]:
            parts.append(raw[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        print(f"target {target:g}: " + "|".join(parts))


def cmd_unigram(args) -> None:
    """Bits per byte of the training roles' byte frequencies (add-one) on the held-out roles' test bytes."""
    from flotilla.config import validate
    from flotilla.tasks.shakespeare_bytes import build_data, heldout_roles

    cfg = validate(byte_cfg(MODELS["bt"], 1, 1, 1, 0.1, 0.1)).task
    train, held = build_data(cfg, 0), heldout_roles(cfg)
    counts = torch.ones(260)
    for c in range(train.num_clients):
        counts += torch.bincount(train.fetch(train.train_indices[c])[1].reshape(-1), minlength=260)
    logp = (counts / counts.sum()).log()
    y = torch.cat([held.fetch_test(held.test_indices[c])[1] for c in range(held.num_clients)])
    print(json.dumps({"unigram_heldout_bpb": float(-logp[y].sum() / math.log(2) / len(y)), "bytes": len(y)}))


def cmd_train(args) -> None:
    names = args.only.split(",")
    if len(names) > 1:  # one process per model (one thread each), all at once: cpu_s_per_round is
        # the process's own CPU time, the figure least disturbed by the machine's other load
        procs = []
        for n in names:
            cmd = [sys.executable, __file__, "train", "--only", n] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("only", "command", "func")
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        records = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a run failed (exit {proc.returncode})")
            records.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(records[-1]), flush=True)
        OUT.mkdir(exist_ok=True)
        (OUT / f"blt_train_seed{args.seed}.json").write_text(
            json.dumps({"records": records, "args": vars(args) | {"func": None}, "load": load()}, indent=1)
        )
        return
    torch.set_num_threads(1)
    name = names[0]
    rec = run_charlstm(args) if name == "charlstm" else run_bytes(name, args)
    rec["load_after"] = load()
    print(json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("entropy").set_defaults(func=cmd_entropy)
    sub.add_parser("sweep").set_defaults(func=cmd_sweep)
    sub.add_parser("unigram").set_defaults(func=cmd_unigram)
    pt = sub.add_parser("patches")
    pt.add_argument("text", nargs="?", default="Now is the winter of our discontent made glorious summer by this sun")
    pt.set_defaults(func=cmd_patches)
    t = sub.add_parser("train")
    t.add_argument("--only", default="bt,blt,blt-space,blt-fixed,charlstm")
    t.add_argument("--rounds", type=int, default=15)
    t.add_argument("--cohort", type=int, default=4)
    t.add_argument("--steps", type=int, default=4)
    t.add_argument("--lr", type=float, default=0.5)
    t.add_argument("--server-lr", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0, help="model init, cohorts, shuffling (not the entropy model)")
    t.set_defaults(func=cmd_train)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
