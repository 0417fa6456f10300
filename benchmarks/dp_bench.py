"""Differential privacy benchmark (on demand; ~10-15 min on a loaded 2-core machine).

    .venv/bin/python benchmarks/dp_bench.py                  # everything
    .venv/bin/python benchmarks/dp_bench.py --part timing    # DP-SGD vs plain local training (alternating repeats)
    .venv/bin/python benchmarks/dp_bench.py --part overhead  # user-level DP cost of one round
    .venv/bin/python benchmarks/dp_bench.py --part curve     # accuracy vs epsilon, FMNIST + Shakespeare
    .venv/bin/python benchmarks/dp_bench.py --quick          # smaller everything (smoke test)
    .venv/bin/python benchmarks/dp_bench.py --part modes --quick   # DP-SGD ms/step per grad_sample_mode
    .venv/bin/python benchmarks/dp_bench.py --part timing --grad-sample-mode ew   # timing with one mode (+ direct)
    .venv/bin/python benchmarks/dp_bench.py --part timing --quick --repeats 7      # more alternating repeats

Prints markdown tables and writes benchmarks/out/dp_bench.json.  One torch thread throughout, so
timings compare like with like on a shared machine; the load average is recorded with them.
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

import opacus  # noqa: F401  (imported up front so that "wrap once" times the wrapping, not the import)
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flotilla.api import train  # noqa: E402
from flotilla.core.aggregate import WeightedMean  # noqa: E402
from flotilla.core.client import ClientSpec, LocalTrainer  # noqa: E402
from flotilla.core.flat import FlatModel  # noqa: E402
from flotilla.privacy import DPFedAvg, DPLocalTrainer, SampleLevelSpec, make_dp_compatible, make_private  # noqa: E402
from flotilla.privacy.sample import choose_mode  # noqa: E402
from flotilla.sim.sync import SyncFedAvg  # noqa: E402
from flotilla.tasks.models import CharLSTM, SmallCNN  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "dp_bench.json"
GRAD_SAMPLE_MODE = "auto"  # --grad-sample-mode


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmnist(num_clients, seed=0, **kw):
    from flotilla.data.fashion_mnist import fashion_mnist_federated

    return fashion_mnist_federated(partition="iid", num_clients=num_clients, seed=seed, **kw)


def shakespeare(**kw):
    from flotilla.data.shakespeare import VOCAB_SIZE, shakespeare_federated

    return shakespeare_federated(seed=0, **kw), VOCAB_SIZE


def run_clients(trainer, dataset, clients, start, seed) -> tuple[float, float]:
    """(wall, CPU) ms per local step over ``clients``."""
    delta = torch.empty_like(start)
    w0, c0, steps = time.perf_counter(), time.process_time(), 0
    for i, c in enumerate(clients):
        steps += trainer.train(dataset, c, start, seed + i, delta).steps
    return tuple((t * 1000 / max(steps, 1)) for t in (time.perf_counter() - w0, time.process_time() - c0))


# --- A: DP-SGD client training vs non-private -------------------------------------------------
TARGET = {"SmallCNN": 1.6, "CharLSTM": 3.0}  # issue 14: DP step at most this many plain steps


def cnn_floor_extra_ms(batch: int = 32, reps: int = 20) -> tuple[float, float]:
    """(wall, CPU) ms that per-example clipping of the SmallCNN must add to a plain step whatever the method:
    the two convolutions' per-example weight gradients (one grouped convolution backward each, the cheapest
    way found here; ghost norms over 784 / 196 positions cost more) minus the summed weight gradients the
    plain backward computes instead, plus drawing the Gaussian noise for every parameter."""
    from opacus.optimizers.optimizer import _generate_noise

    model = SmallCNN()
    convs = [(m, hw) for m, hw in zip([model.features[0], model.features[3]], (28, 14))]
    g = torch.Generator().manual_seed(0)
    data = [
        (
            m,
            torch.randn(batch, m.in_channels, hw, hw, generator=g),
            torch.randn(batch, m.out_channels, hw, hw, generator=g),
        )
        for m, hw in convs
    ]

    def conv_grads(per_example: bool):
        for m, x, gy in data:
            groups = batch if per_example else 1
            w = m.weight.new_zeros(batch * m.out_channels, *m.weight.shape[1:]) if per_example else m.weight
            torch.ops.aten.convolution_backward(
                gy.reshape(1, -1, *gy.shape[2:]) if per_example else gy,
                x.reshape(1, -1, *x.shape[2:]) if per_example else x,
                w,
                None,
                m.stride,
                m.padding,
                m.dilation,
                False,
                [0, 0],
                groups,
                [False, True, False],
            )

    def noise():
        for p in model.parameters():
            _generate_noise(1.0, p, generator=g)

    def timed(fn):
        walls, cpus = [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        return statistics.median(walls) * 1000, statistics.median(cpus) * 1000

    with torch.no_grad():
        timed(lambda: conv_grads(True))  # warm-up
        per, summed, nz = timed(lambda: conv_grads(True)), timed(lambda: conv_grads(False)), timed(noise)
    return tuple(per[i] - summed[i] + nz[i] for i in (0, 1))


def part_timing(quick: bool, repeats: int) -> list[dict]:
    """Plain and DP-SGD local steps, alternated ``repeats`` times over the same clients (so load drifts hit
    all alike); median and min of the per-repeat ms/step.  DP runs the --grad-sample-mode mode and, where
    that is not it, the direct mode too."""
    n_clients = 3 if quick else 6
    spec = ClientSpec(epochs=1, batch_size=32, lr=0.05)
    ds = fmnist(100)  # 600 images per client: ~19 steps of 32
    sh, vocab = shakespeare(max_clients=40, max_train_samples_per_client=320)
    sh_clients = [c for c in range(sh.num_clients) if sh.num_train(c) >= 320][:n_clients]
    setups = {
        "SmallCNN": ("SmallCNN (FMNIST, batch 32)", SmallCNN, ds, list(range(n_clients))),
        "CharLSTM": ("CharLSTM 128 (Shakespeare, seq 80, batch 32)", lambda: CharLSTM(vocab), sh, sh_clients),
    }
    rows = []
    for key, (name, make, data, clients) in setups.items():
        auto = choose_mode(make_dp_compatible(make()))
        runs = {}  # label -> (trainer, start)
        torch.manual_seed(0)
        flat = FlatModel(make())  # nn.LSTM (fused kernel) for the CharLSTM
        runs["plain"] = (LocalTrainer(flat, F.cross_entropy, spec), flat.flat.clone())
        if key == "CharLSTM":
            torch.manual_seed(0)
            flat = FlatModel(make_dp_compatible(make()))  # Opacus DPLSTM, trained without DP
            runs["plain DPLSTM"] = (LocalTrainer(flat, F.cross_entropy, spec), flat.flat.clone())
        wrap_ms = {}
        for mode in dict.fromkeys([GRAD_SAMPLE_MODE, "direct"]):
            torch.manual_seed(0)
            flat = FlatModel(make_dp_compatible(make()))
            t0 = time.perf_counter()
            trainer = DPLocalTrainer(flat, F.cross_entropy, spec, SampleLevelSpec(grad_sample_mode=mode))
            if f"dp {trainer.mode}" in runs:
                trainer.close()
                continue
            wrap_ms[f"dp {trainer.mode}"] = (time.perf_counter() - t0) * 1000
            runs[f"dp {trainer.mode}"] = (trainer, flat.flat.clone())
        for trainer, start in runs.values():  # warm-up
            run_clients(trainer, data, clients[:1], start, 0)
        times: dict[str, list] = {k: [] for k in runs}
        for r in range(repeats):
            for label, (trainer, start) in runs.items():
                times[label].append(run_clients(trainer, data, clients, start, 100 * r))
        med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        low = {k: [min(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        for label in runs:
            if label == "plain":
                continue
            rows.append(
                {
                    "model": name,
                    "run": label,
                    "auto_mode": auto,
                    "plain_ms_median": med["plain"][0],
                    "plain_ms_min": low["plain"][0],
                    "ms_median": med[label][0],
                    "ms_min": low[label][0],
                    "slowdown_median": med[label][0] / med["plain"][0],
                    "slowdown_min": low[label][0] / low["plain"][0],
                    "cpu_slowdown_median": med[label][1] / med["plain"][1],
                    "target": TARGET[key] if label.startswith("dp") else None,
                    "wrap_once_ms": wrap_ms.get(label),
                    "load": load(),
                }
            )
        if key == "SmallCNN":
            extra = cnn_floor_extra_ms()
            rows.append(
                {
                    "model": name,
                    "run": "floor: plain + per-example conv grads - summed + noise",
                    "plain_ms_median": med["plain"][0],
                    "ms_median": med["plain"][0] + extra[0],
                    "slowdown_median": 1 + extra[0] / med["plain"][0],
                    "cpu_slowdown_median": 1 + extra[1] / med["plain"][1],
                    "load": load(),
                }
            )
        for label, (trainer, _) in runs.items():
            if label.startswith("dp"):
                trainer.close()
    return rows


# --- B: user-level DP overhead on a round -----------------------------------------------------
def part_overhead(quick: bool) -> list[dict]:
    rows = []
    numel = FlatModel(SmallCNN()).numel
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(numel, generator=g) * 0.01 for _ in range(8)]
    for m in (10, 100):
        reps = 3 if quick else 10

        def agg_ms(agg):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                agg.reset()
                for i in range(m):
                    agg.add(deltas[i % 8], 1.0, i)
                agg.result()
                ts.append((time.perf_counter() - t0) * 1000)
            return statistics.median(ts)

        plain = agg_ms(WeightedMean(numel))
        dp = agg_ms(DPFedAvg(numel, clip_norm=1.0, noise_multiplier=1.0, expected_cohort=m))
        rows.append(
            {
                "what": f"aggregate {m} CNN deltas ({numel} params)",
                "plain_ms": plain,
                "dp_ms": dp,
                "overhead_ms": dp - plain,
                "load": load(),
            }
        )

    # Whole rounds, plain and private alternated (same cohorts, same seeds) so that load drifts hit both.
    ds = fmnist(100)
    rounds = 2 if quick else 6
    algs = {}
    for private in (False, True):
        torch.manual_seed(0)
        alg = SyncFedAvg(
            SmallCNN(),
            ds,
            F.cross_entropy,
            cohort=10,
            weighting="uniform",
            client=ClientSpec(epochs=1, batch_size=32, lr=0.05),
        )
        if private:
            # small S so that the noise (std z S / m per weight) does not wreck the model over the timed rounds
            alg = make_private(alg, {"user_level": {"clip_norm": 0.01, "noise_multiplier": 1.0}}, rounds=rounds + 1)
        alg.step()  # warm-up
        algs[private] = alg
    times = {False: [], True: []}
    for _ in range(rounds):
        for private in (False, True):
            t0 = time.perf_counter()
            algs[private].step()
            times[private].append(time.perf_counter() - t0)
    plain, dp = statistics.median(times[False]), statistics.median(times[True])
    rows.append(
        {
            "what": "one sync round, FMNIST, cohort 10 x 600 images, 1 epoch (median)",
            "plain_ms": plain * 1000,
            "dp_ms": dp * 1000,
            "overhead_ms": (dp - plain) * 1000,
            "load": load(),
        }
    )
    return rows


# --- C: privacy / utility ----------------------------------------------------------------------
def curve(name, make_model, dataset, *, rounds, cohort, client, server, clip, targets, eval_clients, sample_level=None):
    rows = []
    settings = [("no DP", None), ("clip only (z=0)", {"clip_norm": clip, "noise_multiplier": 0.0})]
    settings += [(f"target eps {t:g}", {"clip_norm": clip, "target_epsilon": float(t)}) for t in targets]
    for label, user in settings:
        privacy = None if user is None else {"user_level": user}
        if sample_level is not None and user is not None:
            privacy["sample_level"] = sample_level
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = train(
            make_model(),
            dataset,
            rounds=rounds,
            cohort=cohort,
            client=client,
            server=server,
            weighting="uniform",
            eval={"every": rounds, "max_clients": eval_clients},
            privacy=privacy,
            seed=0,
        )
        last = res.history[-1]
        rows.append(
            {
                "task": name,
                "setting": label,
                "epsilon": last.get("epsilon", math.inf if user else None),
                "delta": last.get("delta"),
                "noise_multiplier": last.get("noise_multiplier"),
                "accuracy": last["accuracy"],
                "rounds": last["round"],
                "seconds": time.perf_counter() - t0,
                "load": load(),
            }
        )
        print(f"  {name} {label}: acc {last['accuracy']:.4f} eps {rows[-1]['epsilon']}", flush=True)
    return rows


def part_curve(quick: bool) -> list[dict]:
    rows = []
    # Clip norms near the median update norm at the start (measured: ~0.13 for the CNN, ~0.77 for the LSTM).
    ds = fmnist(2000)  # 30 images per client
    rows += curve(
        "Fashion-MNIST",
        SmallCNN,
        ds,
        rounds=5 if quick else 20,
        cohort=50,
        client={"epochs": 1, "batch_size": 10, "lr": 0.05},
        server={"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9},
        clip=0.1,
        targets=[4] if quick else [0.25, 1, 4, 16, 64],
        eval_clients=None,
    )  # all 10,000 test images
    sh, vocab = shakespeare(max_train_samples_per_client=32)
    rows += curve(
        "Shakespeare",
        lambda: CharLSTM(vocab),
        sh,
        rounds=4 if quick else 20,
        cohort=40,
        client={"epochs": 1, "batch_size": 16, "lr": 1.0},
        server={"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9},
        clip=0.8,
        targets=[8] if quick else [0.5, 2, 8, 32],
        eval_clients=20,
    )
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# --- A2: the same DP-SGD step under each Opacus grad-sample mode ------------------------------
def part_modes(quick: bool) -> list[dict]:
    """DP ms per step (wall, and CPU: steadier on a loaded machine) of each mode, interleaved,
    best of ``repeats``; every mode computes the same clipped, noised step (tests/test_dp_modes.py)."""
    repeats = 2 if quick else 4
    spec = ClientSpec(epochs=1, batch_size=32, lr=0.05)
    ds = fmnist(100)
    sh, vocab = shakespeare(max_clients=40, max_train_samples_per_client=320)
    sh_clients = [c for c in range(sh.num_clients) if sh.num_train(c) >= 320][:2]
    models = {
        "SmallCNN (batch 32)": (lambda: SmallCNN(), ds, [0, 1]),
        "CharLSTM/DPLSTM (seq 80, batch 32)": (lambda: make_dp_compatible(CharLSTM(vocab)), sh, sh_clients),
    }
    rows = []
    for name, (make, data, clients) in models.items():
        best: dict[str, list[float]] = {}
        for _ in range(repeats):
            for mode in ("hooks", "functorch", "ew", "ghost", "direct"):
                torch.manual_seed(0)
                flat = FlatModel(make())
                trainer = DPLocalTrainer(flat, F.cross_entropy, spec, SampleLevelSpec(grad_sample_mode=mode))
                start, delta = flat.flat.clone(), torch.empty(flat.numel)
                trainer.train(data, clients[0], start, 0, delta)  # warm-up
                w0, c0, steps = time.perf_counter(), time.process_time(), 0
                for i, c in enumerate(clients):
                    steps += trainer.train(data, c, start, i + 1, delta).steps
                wall, cpu = [(t * 1000 / max(steps, 1)) for t in (time.perf_counter() - w0, time.process_time() - c0)]
                trainer.close()
                b = best.setdefault(mode, [wall, cpu])
                best[mode] = [min(b[0], wall), min(b[1], cpu)]
        for mode, (wall, cpu) in best.items():
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "dp_ms_per_step": wall,
                    "dp_cpu_ms_per_step": cpu,
                    "cpu_vs_hooks": cpu / best["hooks"][1],
                    "load": load(),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["timing", "modes", "overhead", "curve", "all"], default="all")
    ap.add_argument(
        "--grad-sample-mode",
        default="auto",
        choices=["auto", "hooks", "functorch", "ew", "ghost", "direct"],
        help="for --part timing",
    )
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats for --part timing (5; quick 3)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {"started_load": load(), "torch_threads": 1}
    t0 = time.perf_counter()
    global GRAD_SAMPLE_MODE
    GRAD_SAMPLE_MODE = args.grad_sample_mode
    parts = (("timing", part_timing), ("modes", part_modes), ("overhead", part_overhead), ("curve", part_curve))
    for part, fn in parts:
        if args.part in (part, "all"):
            print(f"## {part} (load {load()})", flush=True)
            results[part] = (
                fn(args.quick, args.repeats or (3 if args.quick else 5)) if part == "timing" else fn(args.quick)
            )
            print(table(results[part]), flush=True)
    results["total_s"] = time.perf_counter() - t0
    results["ended_load"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"total {results['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
