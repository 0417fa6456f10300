"""Ray runtime benchmark (issue 13): per-round time at cohort 10, 50, 200 on Fashion-MNIST.

    .venv/bin/python benchmarks/ray_bench.py [--repeats 2] [--rounds 4] [--cohorts 10,50,200]
                                             [--variants inproc,ray1,ray2,flower] [--flower-repeats 1]

Variants, each a fresh process per run (the speed harness's process-tree watcher, run.py):

* ``inproc``: ``flotilla.train(model, data)`` in one process (1 torch thread).
* ``ray1`` / ``ray2``: the same call with ``runtime={"name": "ray", "actors": N}`` (a private
  local Ray, 1 CPU and 1 torch thread per actor); the task goes to the actors as objects, once.
* ``flower``: Flower's Ray simulation, benchmarks/speed/fl_flower.py unchanged (2 Ray workers
  of 1 CPU each on this 2-core machine), in its own venv (benchmarks/.peers/flower).

Same workload for all: the speed harness's ``fmnist`` (1,000 users x 50 images, SmallCNN, 1 local
epoch, batch 10, lr 0.1: 5 SGD steps per client, central evaluation after the last round), with
the cohort changed per row.  Repeats are interleaved and their order rotates, so load drift hits
every variant.  Reported per (cohort, variant), medians over repeats:

* s/round: median of rounds 2..R (the last one includes the final evaluation in every variant);
* start-up: the first round's time minus the steady round (Ray start, actors, task shipping);
* peak MB: the largest PSS sum of the process tree, and of its Ray worker processes
  (``ray::...`` but not Ray's own agents or idle workers: Flotilla's actors, Flower's workers)
  divided by their number (MB per actor);
* load1 before each run.

Writes benchmarks/out/ray-bench.json and prints a markdown table.

Where an actor's round goes (the same ``ClientActor.train`` in this process and in one actor, alternately:
wall and CPU time of each side, and the full call with Ray's plumbing):

    PYTHONPATH=benchmarks/speed .venv/bin/python benchmarks/ray_bench.py --profile-actor \
        --data benchmarks/out/data/fmnist-cohort50 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEED = HERE / "speed"
REPO = HERE.parent
OUT = HERE / "out"
VENV_PY = REPO / ".venv" / "bin" / "python"
FLOWER_PY = HERE / ".peers" / "flower" / "bin" / "python"
VARIANTS = ("inproc", "ray1", "ray2", "flower")
sys.path.insert(0, str(SPEED))


# --- the Flotilla child process ----------------------------------------------------------------
def child(argv: list[str]) -> None:
    """One Flotilla run (in-process or on Ray) on a prepared workload; prints the RESULT line."""
    import hashlib

    import torch  # noqa: F401  (before flotilla: the thread count below applies)
    from common import base_args, emit, load, make_model, round_stats
    from fl_flotilla import federated
    from torch.nn import functional as F

    import flotilla

    p = base_args("ray_bench child")
    p.add_argument("--actors", type=int, default=0, help="0: in-process; N: Ray with N actors")
    args = p.parse_args(argv)
    wl = load(args)
    m = wl.meta
    extra = {"runtime": {"name": "ray", "actors": args.actors}} if args.actors else {}
    t0 = time.perf_counter()
    res = flotilla.train(
        make_model(m),
        federated(wl),
        F.cross_entropy,
        rounds=m["rounds"],
        cohort=m["cohort"],
        client=flotilla.ClientSpec(epochs=m["epochs"], batch_size=m["batch"], lr=m["lr"]),
        seed=m["seed"],
        eval={"every": m["rounds"], "batch_size": 1024},
        **extra,
    )
    stamps = [0.0] + [h["wall_time_s"] for h in res.history]
    emit(
        {
            "accuracy": res.history[-1]["accuracy"],
            "rounds": len(res.history),
            "call_s": time.perf_counter() - t0,
            **round_stats(stamps),
            "weights_sha": hashlib.sha1(res.weights.numpy().tobytes()).hexdigest()[:12],
        }
    )


# --- where an actor's round goes: the same ClientActor.train in this process and in an actor -----
def profile_actor(argv: list[str]) -> None:
    """``--profile-actor``: one cohort's ``ClientActor.train`` run alternately in this process and in one
    Ray actor (same class, same task, same weights and clients), ``--pairs`` times: wall and CPU time of
    the training thread on each side, and the actor call's full time from the driver (``ray.put`` of
    the weights, the call, the reply).  Separates the actor's training from Ray's plumbing."""
    import ray
    import torch  # noqa: F401  (before flotilla: the thread count below applies)
    from common import base_args, load, make_model
    from fl_flotilla import federated
    from torch.nn import functional as F

    from flotilla.core.client import ClientSpec
    from flotilla.core.flat import FlatModel
    from flotilla.sim.ray_runtime import ClientActor
    from flotilla.sim.sync import sample_cohort

    p = base_args("ray_bench --profile-actor")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument(
        "--ray-niceness", type=int, default=0, help="Ray's worker_niceness (Ray's default 15; the runtime sets 0)"
    )
    args = p.parse_args(argv)
    wl = load(args)
    m = wl.meta
    data, model = federated(wl), make_model(m)
    spec = ClientSpec(epochs=m["epochs"], batch_size=m["batch"], lr=m["lr"])
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": args.ray_niceness},
    )
    task = [ray.put((model, data, F.cross_entropy))]
    paths = [os.getcwd()] + [q for q in sys.path if q]
    here = ClientActor("objects", task, spec, "examples", 0, 1, paths)
    actor = ray.remote(ClientActor).options(num_cpus=1).remote("objects", task, spec, "examples", 0, 1, paths)
    ray.get(actor.info.remote())
    weights = FlatModel(make_model(m)).flat.clone()
    clients = [int(c) for c in sample_cohort(0, 0, data.num_clients, m["cohort"])]

    def timed(self, clients, weights):
        w0, c0 = time.perf_counter(), time.thread_time()
        self.train(0, clients, weights)
        return time.perf_counter() - w0, time.thread_time() - c0

    rows = []
    for k in range(args.pairs):
        here_s, here_cpu = timed(here, clients, weights)
        actor_s, actor_cpu = ray.get(actor.__ray_call__.remote(timed, clients, weights))
        t0 = time.perf_counter()
        ray.get(actor.train.remote(0, clients, ray.put(weights)))
        call_s = time.perf_counter() - t0
        rows.append((here_s, here_cpu, actor_s, actor_cpu, call_s, os.getloadavg()[0]))
        print(
            f"  pair {k + 1}: this process {here_s:.3f}s (cpu {here_cpu:.3f}s)  actor {actor_s:.3f}s "
            f"(cpu {actor_cpu:.3f}s)  full actor call {call_s:.3f}s  load {rows[-1][-1]:.1f}",
            flush=True,
        )
    med = [statistics.median(col) for col in zip(*rows)]
    cpu_ratios = sorted(r[3] / r[1] for r in rows)
    print(
        f"cohort {len(clients)}, {args.pairs} pairs, medians: this process {med[0]:.3f}s (cpu {med[1]:.3f}s), actor "
        f"{med[2]:.3f}s (cpu {med[3]:.3f}s), full call {med[4]:.3f}s; actor/this cpu {statistics.median(cpu_ratios):.2f}x "
        f"(range {cpu_ratios[0]:.2f}-{cpu_ratios[-1]:.2f}); Ray plumbing per call {med[4] - med[2]:+.3f}s; "
        f"load1 {min(r[-1] for r in rows):.1f}-{max(r[-1] for r in rows):.1f}; actor niceness "
        f"{ray.get(actor.__ray_call__.remote(lambda self: os.nice(0)))} (this process {os.nice(0)})",
        flush=True,
    )
    ray.shutdown()


# --- data per cohort: the prepared fmnist folder with another cohort in meta.json ---------------
def cohort_dir(base: Path, cohort: int, out: Path) -> Path:
    d = out / "data" / f"fmnist-cohort{cohort}"
    d.mkdir(parents=True, exist_ok=True)
    for f in base.glob("*.npy"):
        link = d / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    meta = json.loads((base / "meta.json").read_text())
    meta["cohort"] = cohort
    (d / "meta.json").write_text(json.dumps(meta))
    return d


# --- one run, with the speed harness's process-tree watcher --------------------------------------
def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# Ray's own helpers and pre-started idle workers, not actors
NOT_ACTORS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _is_actor(cmdline: str) -> bool:
    return cmdline.startswith("ray::") and not cmdline.startswith(NOT_ACTORS)


class Watch(threading.Thread):
    """Peak PSS of the tree, and of its Ray worker processes (cmdline ``ray::...``), every ``every`` s."""

    def __init__(self, root: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peak_kb = self.peak_workers_kb = self.workers_at_peak = self.max_procs = 0
        self.done = threading.Event()

    def run(self) -> None:
        from run import pss_kb, tree

        while not self.done.is_set():
            pids = tree(self.root)
            self.max_procs = max(self.max_procs, len(pids))
            pss = {p: pss_kb(p) for p in pids}
            self.peak_kb = max(self.peak_kb, sum(pss.values()))
            workers = [p for p in pids if _is_actor(_cmdline(p))]
            wsum = sum(pss[p] for p in workers)
            if wsum > self.peak_workers_kb:
                self.peak_workers_kb, self.workers_at_peak = wsum, len(workers)
            self.done.wait(self.every)


def run_one(variant: str, data: Path, rounds: int, timeout: float, log: Path) -> dict:
    from run import run_watched

    if variant == "flower":
        cmd = [str(FLOWER_PY), str(SPEED / "fl_flower.py")]
    else:
        actors = {"inproc": 0, "ray1": 1, "ray2": 2}[variant]
        cmd = [str(VENV_PY), str(Path(__file__).resolve()), "--child", "--actors", str(actors)]
    cmd += ["--data", str(data), "--rounds", str(rounds), "--threads", "1"]
    env = dict(
        os.environ,
        PYTHONPATH=str(SPEED),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        RAY_DEDUP_LOGS="0",
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
    )
    load = os.getloadavg()[0]
    rc, wall, watch = run_watched(cmd, env, log, timeout, Watch)
    r = {
        "variant": variant,
        "wall_s": wall,
        "rc": rc,
        "load1_before": load,
        "peak_mb": watch.peak_kb / 1024,
        "workers": watch.workers_at_peak,
        "mb_per_worker": watch.peak_workers_kb / 1024 / watch.workers_at_peak if watch.workers_at_peak else None,
        "max_procs": watch.max_procs,
        "log": str(log),
    }
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            r.update({k: v for k, v in json.loads(line[7:]).items() if k != "framework"})
    if "round_s_median" not in r:
        r["error"] = f"no RESULT line (rc={rc}); see {log}"
    else:
        r["startup_s"] = r["first_round_s"] - r["round_s_median"]
    return r


# --- summary ------------------------------------------------------------------------------------
def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _f(x, fmt: str, unit: str = "") -> str:
    return "-" if x is None else format(x, fmt) + unit


def summarise(runs: list[dict], cohorts: list[int], variants: list[str]) -> tuple[str, dict]:
    med: dict = {}
    lines = [
        "| cohort | variant | runs | s/round (steady) | vs in-process | Flower / this | start-up s | wall s | "
        "peak MB (PSS, tree) | MB per Ray worker | accuracy | load1 at start |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cohorts:
        for v in variants:
            rows = [r for r in runs if r["cohort"] == c and r["variant"] == v]
            ok = [r for r in rows if "error" not in r]
            if not ok:
                if rows:
                    lines.append(f"| {c} | {v} | 0 | failed: {rows[0].get('error')} | | | | | | | | |")
                continue
            keys = ("round_s_median", "startup_s", "wall_s", "peak_mb", "mb_per_worker", "accuracy", "load1_before")
            med[(c, v)] = {k: _med(ok, k) for k in keys} | {"n": len(ok), "workers": _med(ok, "workers")}
        base = med.get((c, "inproc"), {}).get("round_s_median")
        flower = med.get((c, "flower"), {}).get("round_s_median")
        for v in variants:
            m = med.get((c, v))
            if not m:
                continue
            s = m["round_s_median"]
            w = f"{m['mb_per_worker']:.0f} (x{m['workers']:.0f})" if m["mb_per_worker"] else "-"
            lines.append(
                f"| {c} | {v} | {m['n']} | {s:.3f} | {_f(s / base if base else None, '.2f', 'x')} | "
                f"{_f(flower / s if flower and v != 'flower' else None, '.1f', 'x')} | {m['startup_s']:.1f} | "
                f"{m['wall_s']:.1f} | {m['peak_mb']:.0f} | {w} | {m['accuracy']:.4f} | {m['load1_before']:.2f} |"
            )
    notes = []
    r1, ip = med.get((50, "ray1")), med.get((50, "inproc"))
    if r1 and ip:
        x = r1["round_s_median"] / ip["round_s_median"]
        notes.append(
            f"- target Ray 1 actor within 1.2x of in-process at cohort 50: {x:.2f}x, {'met' if x <= 1.2 else 'NOT met'}"
        )
        paired = _paired(runs, 50, "ray1", "inproc")
        if paired:
            notes.append(
                f"  (within each repeat: {', '.join(f'{p:.2f}x' for p in paired)}; median "
                f"{statistics.median(paired):.2f}x, spread {min(paired):.2f}-{max(paired):.2f}x)"
            )
    for c in cohorts:
        fl = med.get((c, "flower"))
        for v in ("ray1", "ray2"):
            m = med.get((c, v))
            if fl and m:
                x = fl["round_s_median"] / m["round_s_median"]
                notes.append(
                    f"- target at least 5x faster per round than Flower on Ray, cohort {c}, {v}: "
                    f"{x:.1f}x, {'met' if x >= 5 else 'NOT met'}"
                )
    for v in variants:
        pts = [(c, med[(c, v)]["round_s_median"]) for c in cohorts if (c, v) in med]
        if len(pts) >= 2:
            (c0, s0), (c1, s1) = pts[0], pts[-1]
            slope = (s1 - s0) / (c1 - c0)
            notes.append(
                f"- growth with cohort, {v}: {' / '.join(f'{s:.3f}' for _, s in pts)} s at cohort "
                f"{' / '.join(str(c) for c, _ in pts)}: {slope * 1000:.1f} ms per extra client"
            )
    return "\n".join(lines + [""] + notes), {f"{c}/{v}": m for (c, v), m in med.items()}


def _paired(runs: list[dict], cohort: int, a: str, b: str) -> list[float]:
    s = {(r["variant"], r["repeat"]): r["round_s_median"] for r in runs if r["cohort"] == cohort and "error" not in r}
    return [s[(a, k)] / s[(b, k)] for (v, k) in sorted(s, key=str) if v == a and (b, k) in s]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cohorts", default="10,50,200")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--flower-repeats", type=int, default=None, help="Flower only in the first N repeats (default: all)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before one run is killed")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    try:
        cohorts = [int(c) for c in a.cohorts.split(",")]
    except ValueError:
        p.error(f"--cohorts: a comma list of integers, got {a.cohorts!r}")
    if "flower" in variants and not (FLOWER_PY.parent.parent / ".ok").exists():
        print("installing Flower into benchmarks/.peers/flower (once, several minutes)...", flush=True)
        subprocess.run(["bash", str(SPEED / "install_peers.sh"), "flower"], check=True)
    from prepare import prepare

    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    base = prepare("fmnist", out / "data")
    dirs = {c: cohort_dir(base, c, out) for c in cohorts}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start = os.getloadavg()
    runs = []
    for rep in range(a.repeats):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]  # rotate
        for c in cohorts:
            for v in order:
                if v == "flower" and a.flower_repeats is not None and rep >= a.flower_repeats:
                    continue
                r = run_one(v, dirs[c], a.rounds, a.timeout, out / "logs" / f"ray-{stamp}-c{c}-r{rep}-{v}.log")
                r.update(cohort=c, repeat=rep)
                runs.append(r)
                print(
                    f"  [repeat {rep + 1}/{a.repeats} cohort {c:3d}] {v:7s} s/round {r.get('round_s_median', float('nan')):7.3f} "
                    f"start-up {r.get('startup_s', float('nan')):5.1f}s wall {r['wall_s']:6.1f}s peak {r['peak_mb']:6.0f}MB "
                    f"load {r['load1_before']:.2f}" + (f"  ERROR {r['error']}" if "error" in r else ""),
                    flush=True,
                )
    table, med = summarise(runs, cohorts, variants)
    load_end = os.getloadavg()
    head = (
        f"Ray runtime: fmnist, {a.rounds} rounds, cohorts {a.cohorts}, {a.repeats} repeats"
        f"{'' if a.flower_repeats is None else f' (Flower {a.flower_repeats})'}, 1 torch thread per "
        f"process/actor, {os.cpu_count()} cores; load average at start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    report = head + "\n\n" + table
    print("\n" + report + "\n", flush=True)
    path = out / "ray-bench.json"
    path.write_text(
        json.dumps({"argv": sys.argv, "time": stamp, "runs": runs, "medians": med, "report": report}, indent=1)
    )
    (out / "ray-bench.md").write_text(report + "\n")
    print(f"raw results: {path}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    elif sys.argv[1:2] == ["--profile-actor"]:  # PYTHONPATH=benchmarks/speed; --data a prepared fmnist folder
        profile_actor(sys.argv[2:])
    else:
        sys.exit(main())
