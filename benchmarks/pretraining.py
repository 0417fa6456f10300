"""Random vs pre-trained initialisation (after Nguyen et al., "Where to Begin?").

    nice -n 10 .venv/bin/python benchmarks/pretraining.py [--task fmnist] [--rounds 15] [--seeds 0]
    nice -n 10 .venv/bin/python benchmarks/pretraining.py --task shakespeare --rounds 20 --seeds 0 1

Fashion-MNIST (``--task fmnist``, out: benchmarks/out/pretraining):
1. ``flotilla pretrain``: SmallCNN trained centrally on MNIST 5k (the public proxy), a checkpoint.
2. Federated Fashion-MNIST from a random and from the pre-trained start, across Dirichlet alpha
   (0.1, 0.5, IID), without and with system heterogeneity (30% of clients a uniform 1-5 local
   epochs), server FedAvg, FedAvgM and FedAdam: final accuracy, the IID/non-IID gap.
3. The top eigenvalue of the Hessian of the Fashion-MNIST training loss at each initialisation
   (power iteration on Hessian-vector products).

Shakespeare (``--task shakespeare``, out: benchmarks/out/pretraining-shakespeare): the CharLSTM
pre-trained centrally on the 11 history plays (``plays: proxy``), then federated next-character
prediction on the other 27 (``plays: target``): 100 sampled roles x 64 training windows, 10 a round, the
natural per-role split vs IID (``partition: iid``), the same servers and heterogeneity; the Hessian
on 256 target training windows.

Small enough for a shared CPU (few rounds, small cohorts): a sketch of the paper's setting
(~1,000 rounds), not a reproduction.  Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALPHAS = {"0.1": ("dirichlet", 0.1), "0.5": ("dirichlet", 0.5), "iid": ("iid", 0.5)}
SERVERS = {
    "fedavg": {"optimizer": "fedavg", "lr": 1.0},
    "fedavgm": {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.5},
    "fedadam": {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
}
HETERO = {"fraction": 0.3, "min": 1, "max": 5}


# Shakespeare: roles (natural, non-IID) vs the roles' windows shuffled across clients (IID).
PARTITIONS = {"natural": "natural", "iid": "iid"}
SHAKESPEARE = {"name": "shakespeare", "seq_len": 80, "max_clients": 100, "max_train_samples_per_client": 64}
SHAKESPEARE_PRETRAIN = {"epochs": 1, "batch_size": 32, "lr": 1.0, "momentum": 0.0, "max_examples": 60000}


def shakespeare_base(partition: str, server: str, hetero: bool, rounds: int, seed: int, init: str | None) -> dict:
    cfg = {
        "seed": seed,
        "threads": 1,
        "task": {**SHAKESPEARE, "plays": "target", "partition": PARTITIONS[partition]},
        "rounds": rounds,
        "cohort": 10,
        "client": {"batch_size": 16, "lr": 1.0, **({"heterogeneous_epochs": HETERO} if hetero else {})},
        "server": SERVERS[server],
        "eval": {"every": rounds, "max_clients": 10},
        "output": {"progress": False, "plot": False, "checkpoint_every": rounds},
    }
    if init is not None:
        cfg["init"] = {"checkpoint": init}
    return cfg


def base(alpha: str, server: str, hetero: bool, rounds: int, seed: int, init: str | None) -> dict:
    partition, a = ALPHAS[alpha]
    cfg = {
        "seed": seed,
        "threads": 1,
        "task": {
            "name": "fashion-mnist",
            "partition": partition,
            "alpha": a,
            "num_clients": 100,
            "examples_per_client": 30,
        },
        "rounds": rounds,
        "cohort": 10,
        "client": {"batch_size": 10, "lr": 0.05, **({"heterogeneous_epochs": HETERO} if hetero else {})},
        "server": SERVERS[server],
        "eval": {"every": rounds, "max_clients": 30},
        "output": {"progress": False, "plot": False, "checkpoint_every": rounds},
    }
    if init is not None:
        cfg["init"] = {"checkpoint": init}
    return cfg


def body_only(checkpoint: Path) -> Path:
    """The checkpoint without the output layer (head.*): loaded with init.partial, the head stays random."""
    from safetensors.torch import load_file, save_file

    out = checkpoint.with_name(checkpoint.stem + "-body.safetensors")
    if not out.exists():
        save_file({k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("head.")}, str(out))
    return out


def hessian_top(checkpoint: str | None, seed: int, examples: int = 500) -> tuple[float, float]:
    """(top Hessian eigenvalue, loss) of the Fashion-MNIST training loss at the initial model."""
    from torch.nn import functional as F

    from flotilla.data.fashion_mnist import fashion_mnist_federated
    from flotilla.experiment.init import load_init
    from flotilla.experiment.pretrain import top_hessian_eigenvalue
    from flotilla.tasks.models import SmallCNN

    data = fashion_mnist_federated("iid", 100, seed=0, examples_per_client=30)
    idx = torch.cat(data.train_indices)[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:examples]]
    batches = [data.fetch(idx[i : i + 250]) for i in range(0, examples, 250)]
    torch.manual_seed(seed)
    model = SmallCNN()
    if checkpoint is not None:
        print(load_init(model, checkpoint, partial=True).summary())
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in batches) / examples
    return top_hessian_eigenvalue(model, F.cross_entropy, batches, iters=30, seed=seed, tol=1e-3), loss


def shakespeare_hessian_top(checkpoint: str | None, seed: int, examples: int = 256) -> tuple[float, float]:
    """(top Hessian eigenvalue, loss) of the target plays' training loss at the initial CharLSTM."""
    from flotilla.config import validate
    from flotilla.experiment.init import load_init
    from flotilla.experiment.pretrain import top_hessian_eigenvalue
    from flotilla.tasks import build_task

    cfg = validate({"task": {**SHAKESPEARE, "plays": "target"}, "rounds": 1, "seed": seed})
    task = build_task(cfg.task, 0)  # the same windows for every seed; the model is seeded below
    pool = torch.cat(task.dataset.train_indices)
    idx = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))[:examples]]
    batches = [task.dataset.fetch(idx[i : i + 128]) for i in range(0, examples, 128)]
    torch.manual_seed(seed)
    model = build_task(cfg.task, seed).model
    if checkpoint is not None:
        print(load_init(model, checkpoint, partial=True).summary())
    with torch.no_grad():
        loss = sum(float(task.loss_fn(model(x), y)) * len(y) for x, y in batches) / examples
    return top_hessian_eigenvalue(model, task.loss_fn, batches, iters=20, seed=seed, tol=1e-3), loss


def shakespeare_start(seed: int, checkpoint: str) -> dict[str, float]:
    """Round-0 test accuracy on a run's evaluation roles: ``floor``, always predicting the most
    frequent next character of the target training windows (a space: what a model stuck at the
    unigram plateau scores), and ``pretrained``, the proxy checkpoint before any federated round."""
    from flotilla.config import validate
    from flotilla.core.evaluate import eval_clients
    from flotilla.experiment.init import load_init
    from flotilla.experiment.pretrain import central_accuracy
    from flotilla.tasks import build_task

    cfg = validate(shakespeare_base("natural", "fedavg", False, 1, seed, None))
    task = build_task(cfg.task, seed)
    data = task.dataset
    mode = torch.bincount(data.targets(torch.cat(data.train_indices))).argmax()
    test = torch.cat([data.test_indices[c] for c in eval_clients(data, cfg.eval.max_clients, seed)])
    load_init(task.model, checkpoint)
    pretrained = central_accuracy(task.model, data, test, data.fetch_test)
    return {"floor": float((data.targets(test) == mode).double().mean()), "pretrained": pretrained}


def pretrain_checkpoint(task: str, out: Path, epochs: int | None) -> tuple[Path, dict | None]:
    """The proxy checkpoint (written once): MNIST 5k for fmnist, the history plays for shakespeare."""
    from flotilla.experiment.pretrain import PretrainConfig, pretrain

    if task == "fmnist":
        ckpt = out / "mnist5k.safetensors"
        raw = {"task": {"name": "mnist-5k", "num_clients": 10}, "epochs": epochs or 3, "lr": 0.05, "momentum": 0.9}
    else:
        ckpt = out / "proxy-plays.safetensors"
        proxy = {k: v for k, v in SHAKESPEARE.items() if k != "max_clients"}  # every proxy role, all its windows
        proxy.pop("max_train_samples_per_client")
        raw = {"task": {**proxy, "plays": "proxy"}, **SHAKESPEARE_PRETRAIN, "max_test_examples": 20000}
        raw["epochs"] = epochs or raw["epochs"]
    if ckpt.exists():
        return ckpt, None
    t = time.time()
    info = pretrain(PretrainConfig.model_validate({**raw, "threads": 1, "output": str(ckpt)}))
    return ckpt, {**info, "wall_s": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("fmnist", "shakespeare"), default="fmnist")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default: 3 (fmnist), 1 (shakespeare)")
    ap.add_argument("--out", default=None, help="default: benchmarks/out/pretraining[-shakespeare]")
    ap.add_argument("--checkpoint", default=None, help="start from this proxy checkpoint instead of pre-training one")
    ap.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    ap.add_argument("--clients", choices=("homog", "hetero", "both"), default="both", help="system heterogeneity")
    ap.add_argument("--no-hessian", action="store_true", help="skip the Hessian eigenvalues")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shakespeare = args.task == "shakespeare"
    out = Path(args.out or ("benchmarks/out/pretraining" + ("-shakespeare" if shakespeare else "")))
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}, "hessian": {}}

    from flotilla.config import validate
    from flotilla.experiment.run import run_experiment

    ckpt, info = (
        (Path(args.checkpoint), None) if args.checkpoint else pretrain_checkpoint(args.task, out, args.pretrain_epochs)
    )
    if info is not None:
        results["pretrain"] = info
        results_file.write_text(json.dumps(results, indent=1))
    splits, make, hessian = (
        (PARTITIONS, shakespeare_base, shakespeare_hessian_top) if shakespeare else (ALPHAS, base, hessian_top)
    )
    label = "partition" if shakespeare else "alpha"
    for seed in args.seeds:
        if shakespeare and f"seed{seed}" not in results.setdefault("start", {}):
            results["start"][f"seed{seed}"] = shakespeare_start(seed, str(ckpt))
        inits = (("random", None), ("pretrained", str(ckpt)), ("pretrained-body", str(body_only(ckpt))))
        for name, path in () if args.no_hessian else inits:
            key = f"{name}/seed{seed}"
            if key not in results["hessian"]:
                t = time.time()
                top, loss = hessian(path, seed)
                results["hessian"][key] = {"top_eigenvalue": top, "initial_loss": loss, "wall_s": time.time() - t}
                print(f"hessian {key}: top eigenvalue {top:.2f}, initial loss {loss:.3f}", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
        for init in ("random", "pretrained"):
            for het in ("homog", "hetero") if args.clients == "both" else (args.clients,):
                for server in args.servers:
                    for split in splits:
                        key = f"{init}/{het}/{server}/{label}={split}/seed{seed}"
                        if key in results["runs"]:
                            continue
                        raw = make(
                            split,
                            server,
                            het == "hetero",
                            args.rounds,
                            seed,
                            str(ckpt) if init == "pretrained" else None,
                        )
                        t = time.time()
                        r = run_experiment(validate(raw), write_run_dir=False)
                        acc = r.history[-1]["accuracy"]
                        results["runs"][key] = {"accuracy": acc, "wall_s": time.time() - t}
                        print(f"{key}: accuracy {acc:.4f} ({time.time() - t:.0f} s)", flush=True)
                        results_file.write_text(json.dumps(results, indent=1))
    text = summary(results, args.seeds, shakespeare)
    (out / "results.md").write_text(text)
    print(text)


def summary(results: dict, seeds: list[int], shakespeare: bool = False) -> str:
    import numpy as np

    label, splits = ("partition", list(PARTITIONS)) if shakespeare else ("alpha", list(ALPHAS))

    def acc(init, het, server, split) -> list[float]:
        vals = [
            results["runs"].get(f"{init}/{het}/{server}/{label}={split}/seed{s}", {}).get("accuracy") for s in seeds
        ]
        return [v for v in vals if v is not None]

    def cell(vals: list[float]) -> str:  # mean, and half the range over seeds
        if not vals:
            return "-"
        spread = f" ±{(max(vals) - min(vals)) / 2:.3f}" if len(vals) > 1 else ""
        return f"{np.mean(vals):.3f}{spread}"

    if shakespeare:
        head = "| init | clients | server | acc natural (roles) | acc IID | IID - natural gap |"
    else:
        head = "| init | clients | server | acc alpha=0.1 | acc alpha=0.5 | acc IID | IID - alpha0.1 gap |"
    lines = [f"mean over seeds {seeds}", "", head, "|---" * (head.count("|") - 1) + "|"]
    for init in ("random", "pretrained"):
        for het in ("homog", "hetero"):
            for server in SERVERS:
                a = [acc(init, het, server, s) for s in splits]
                if not any(a):
                    continue
                # the gap per seed (IID minus the most non-IID split), then its mean and spread
                gaps = [i - n for i, n in zip(a[-1], a[0], strict=False)] if len(a[-1]) == len(a[0]) else []
                lines.append(f"| {init} | {het} | {server} | {' | '.join(cell(v) for v in a)} | {cell(gaps)} |")
    lines += ["", "| init | top Hessian eigenvalue | initial loss |", "|---|---|---|"]
    for key, h in sorted(results["hessian"].items()):
        lines.append(f"| {key} | {h['top_eigenvalue']:.2f} | {h['initial_loss']:.3f} |")
    if results.get("start"):
        lines += ["", "| round-0 accuracy on the evaluation roles | " + " | ".join(sorted(results["start"])) + " |"]
        lines.append("|---" * (len(results["start"]) + 1) + "|")
        for what, name in (
            ("floor", "always the most frequent character (a space)"),
            ("pretrained", "the proxy checkpoint"),
        ):
            lines.append(
                f"| {name} | " + " | ".join(f"{v[what]:.3f}" for _, v in sorted(results["start"].items())) + " |"
            )
    if "pretrain" in results:
        proxy = "the proxy plays" if shakespeare else "MNIST 5k"
        lines += ["", f"pre-training on {proxy}: test accuracy {results['pretrain']['test_accuracy']:.4f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
