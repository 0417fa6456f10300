"""Random vs pre-trained initialisation on Fashion-MNIST (after Nguyen et al., "Where to Begin?").

    nice -n 10 .venv/bin/python benchmarks/pretraining.py [--rounds 15] [--seeds 0] [--out benchmarks/out/pretraining]

1. ``flotilla pretrain``: SmallCNN trained centrally on MNIST 5k (the public proxy), a checkpoint.
2. Federated Fashion-MNIST from a random and from the pre-trained start, across Dirichlet alpha
   (0.1, 0.5, IID), without and with system heterogeneity (30% of clients a uniform 1-5 local
   epochs), server FedAvg, FedAvgM and FedAdam: final accuracy, the IID/non-IID gap.
3. The top eigenvalue of the Hessian of the Fashion-MNIST training loss at each initialisation
   (power iteration on Hessian-vector products).

Small enough for a shared CPU (100 clients x 30 images, 10 a round, few rounds): a sketch of the
paper's setting (~1,000 rounds), not a reproduction.  Writes results.json and results.md.
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
    """The checkpoint without the classifier head (head.*): loaded with init.partial, the head stays random."""
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/pretraining")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": {}, "hessian": {}}

    from flotilla.config import validate
    from flotilla.experiment.pretrain import PretrainConfig, pretrain
    from flotilla.experiment.run import run_experiment

    ckpt = out / "mnist5k.safetensors"
    if not ckpt.exists():
        t = time.time()
        info = pretrain(
            PretrainConfig.model_validate(
                {
                    "task": {"name": "mnist-5k", "num_clients": 10},
                    "epochs": args.pretrain_epochs,
                    "lr": 0.05,
                    "momentum": 0.9,
                    "output": str(ckpt),
                }
            )
        )
        results["pretrain"] = {**info, "wall_s": time.time() - t}
    for seed in args.seeds:
        inits = (("random", None), ("pretrained", str(ckpt)), ("pretrained-body", str(body_only(ckpt))))
        for name, path in inits:
            key = f"{name}/seed{seed}"
            if key not in results["hessian"]:
                t = time.time()
                top, loss = hessian_top(path, seed)
                results["hessian"][key] = {"top_eigenvalue": top, "initial_loss": loss, "wall_s": time.time() - t}
                print(f"hessian {key}: top eigenvalue {top:.2f}, initial loss {loss:.3f}", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
        for init in ("random", "pretrained"):
            for hetero in (False, True):
                for server in SERVERS:
                    for alpha in ALPHAS:
                        key = f"{init}/{'hetero' if hetero else 'homog'}/{server}/alpha={alpha}/seed{seed}"
                        if key in results["runs"]:
                            continue
                        raw = base(
                            alpha, server, hetero, args.rounds, seed, str(ckpt) if init == "pretrained" else None
                        )
                        t = time.time()
                        r = run_experiment(validate(raw), write_run_dir=False)
                        acc = r.history[-1]["accuracy"]
                        results["runs"][key] = {"accuracy": acc, "wall_s": time.time() - t}
                        print(f"{key}: accuracy {acc:.4f} ({time.time() - t:.0f} s)", flush=True)
                        results_file.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(summary(results, args.seeds))
    print(summary(results, args.seeds))


def summary(results: dict, seeds: list[int]) -> str:
    import numpy as np

    def acc(init, het, server, alpha):
        vals = [results["runs"].get(f"{init}/{het}/{server}/alpha={alpha}/seed{s}", {}).get("accuracy") for s in seeds]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    lines = [
        "| init | clients | server | acc alpha=0.1 | acc alpha=0.5 | acc IID | IID - alpha0.1 gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for init in ("random", "pretrained"):
        for het in ("homog", "hetero"):
            for server in SERVERS:
                a = [acc(init, het, server, al) for al in ALPHAS]
                lines.append(
                    f"| {init} | {het} | {server} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {a[2] - a[0]:.3f} |"
                )
    lines += ["", "| init | top Hessian eigenvalue | initial loss |", "|---|---|---|"]
    for key, h in sorted(results["hessian"].items()):
        lines.append(f"| {key} | {h['top_eigenvalue']:.2f} | {h['initial_loss']:.3f} |")
    if "pretrain" in results:
        lines += ["", f"pre-training on MNIST 5k: test accuracy {results['pretrain']['test_accuracy']:.4f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
