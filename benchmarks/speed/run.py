"""Speed benchmark: one workload, side by side, Flotilla vs a bare PyTorch loop, pfl and Flower.

    .venv/bin/python benchmarks/speed/run.py --workload fmnist --repeats 3
    .venv/bin/python benchmarks/speed/run.py --workload shakespeare --repeats 3
    .venv/bin/python benchmarks/speed/run.py --workload scale --users 100000,1000000 --repeats 3

Every framework runs as its own process, started fresh for every repeat, in its own virtual
environment (peers under benchmarks/.peers/, installed on first use by install_peers.sh).
Reported per framework (medians over repeats; repeats are interleaved, in forward then reversed
order, so load drifts hit all and every pair runs in both orders):

* wall: process start to process exit (interpreter start, imports, data loading, training,
  final evaluation, shutdown) - what a researcher waits for.
* s/round: median duration of a round after the first (steady state).
* cpu: CPU seconds (user + system) of the whole process tree, each process's own time as last
  sampled (every 0.2 s, so up to 0.2 s per process is missed).  On a loaded, shared machine this
  is the steadier measure of work; wall time is what one waits for.
* peak memory: the largest sum of PSS over the whole process tree (every process in the
  child's session or descended from it: Ray's raylet, GCS and workers count), sampled every 1 s
  (reading PSS briefly locks the process's memory map, so it is not read more often).
* accuracy: on the workload's central test set after the last round.
* spread: median [min-max] over repeats of steady s/round and CPU seconds; every ratio line says
  whether it is beyond the harness's own noise (noise.py: only when the two frameworks' ranges over
  the repeats do not overlap).  Use 5 or more repeats to resolve a 10% difference.
* load: 1/5/15-minute load averages before and after the whole run (and each run's own).

Results go to benchmarks/out/speed-<workload>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
PEERS = BENCH / ".peers"
OUT = BENCH / "out"
sys.path.insert(0, str(HERE))
from common import WORKLOADS  # noqa: E402
from noise import spread, verdict  # noqa: E402
from prepare import prepare  # noqa: E402

# name -> (venv python, script, extra args)
FRAMEWORKS = {
    "raw": (REPO / ".venv" / "bin" / "python", "fl_raw.py", []),
    "flotilla": (REPO / ".venv" / "bin" / "python", "fl_flotilla.py", ["--workers", "1"]),
    "flotilla-w2": (REPO / ".venv" / "bin" / "python", "fl_flotilla.py", ["--workers", "2"]),
    "pfl": (PEERS / "pfl" / "bin" / "python", "fl_pfl.py", []),
    "flower": (PEERS / "flower" / "bin" / "python", "fl_flower.py", []),
}
PEER_OF = {"pfl": "pfl", "flower": "flower"}


# --- process-tree memory --------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, int, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2 :].split()
    # ppid, session id, own CPU seconds (utime + stime; children's times are not included)
    return int(rest[1]), int(rest[3]), (int(rest[11]) + int(rest[12])) / TICK


def tree(root: int, cpu: dict[int, float] | None = None) -> list[int]:
    """Processes in ``root``'s session or descended from ``root`` (their CPU seconds into ``cpu``)."""
    info = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(d)
            if st:
                info[int(d)] = st
    out = {p for p, (_, sid, _) in info.items() if sid == root}
    children: dict[int, list[int]] = {}
    for p, (pp, _, _) in info.items():
        children.setdefault(pp, []).append(p)
    stack = [root]
    while stack:
        p = stack.pop()
        if p in info:
            out.add(p)
        stack.extend(c for c in children.get(p, []) if c not in out)
    if cpu is not None:
        for p in out:
            cpu[p] = max(cpu.get(p, 0.0), info[p][2])
    return sorted(out)


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch(threading.Thread):
    """Samples the tree (and CPU) every ``every`` s and its PSS every ``pss_every`` s.

    Reading /proc/PID/smaps_rollup takes ~10 ms and holds the process's mmap lock meanwhile,
    which can stall its allocations; so PSS is read less often than the cheap /proc/PID/stat.
    """

    def __init__(self, root: int, every: float = 0.2, pss_every: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.every, self.pss_every = root, every, pss_every
        self.peak_kb = 0
        self.max_procs = 0
        self.cpu: dict[int, float] = {}  # pid -> last seen CPU seconds
        self.done = threading.Event()

    def run(self) -> None:
        last_pss = -1e9
        while not self.done.is_set():
            pids = tree(self.root, self.cpu)
            self.max_procs = max(self.max_procs, len(pids))
            if time.monotonic() - last_pss >= self.pss_every:
                last_pss = time.monotonic()
                self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in pids))
            self.done.wait(self.every)


def _kill_leftovers(root: int) -> None:
    for p in tree(root):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def run_watched(cmd: list[str], env: dict, log: Path, timeout: float, watch_class) -> tuple[int | str, float, object]:
    """Run ``cmd`` in its own session with its output in ``log``, sampled by ``watch_class(pid)``;
    ``(exit code or "timeout", wall seconds, the watch)``; whatever it left running is killed."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        watch = watch_class(proc.pid)
        watch.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - t0
        watch.done.set()
        watch.join()
        _kill_leftovers(proc.pid)
        if rc == "timeout":
            proc.wait()
    return rc, wall, watch


# --- one run --------------------------------------------------------------------------------
def run_one(name: str, data_dir: Path, extra: list[str], threads: int, timeout: float, log_dir: Path, tag: str) -> dict:
    python, script, args = FRAMEWORKS[name]
    cmd = [str(python), str(HERE / script), "--data", str(data_dir), "--threads", str(threads), *args, *extra]
    env = dict(
        os.environ,
        PYTHONPATH=str(HERE),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        RAY_DEDUP_LOGS="0",
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
    )
    log = log_dir / f"{tag}-{name}.log"
    load_before = os.getloadavg()[0]
    rc, wall, watch = run_watched(cmd, env, log, timeout, MemoryWatch)
    result = {
        "framework": name,
        "wall_s": wall,
        "cpu_s": sum(watch.cpu.values()),
        "peak_mb": watch.peak_kb / 1024,
        "max_procs": watch.max_procs,
        "rc": rc,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
        "log": str(log),
    }
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            result.update({k: v for k, v in json.loads(line[7:]).items() if k != "framework"})
    if "accuracy" not in result:
        result["error"] = f"no RESULT line (rc={rc}); see {log}"
    return result


# --- summary ---------------------------------------------------------------------------------
def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def _paired_wall_ratios(runs: list[dict], a: str, b: str) -> list[float]:
    """Wall-time ratio a / b within each repeat (run close together, so a load drift hits both)."""
    wall = {(r["framework"], r.get("repeat")): r["wall_s"] for r in runs if "error" not in r and r.get("wall_s")}
    return [wall[(a, k)] / wall[(b, k)] for (f, k) in sorted(wall, key=str) if f == a and (b, k) in wall]


def _values(runs: list[dict], name: str, key: str) -> list[float]:
    return [
        r[key] for r in runs if r["framework"] == name and "error" not in r and isinstance(r.get(key), (int, float))
    ]


def _fmt(s: dict, digits: int) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def summarise(runs: list[dict], names: list[str]) -> tuple[str, dict]:
    med = {}
    for n in names:
        ok = [r for r in runs if r["framework"] == n and "error" not in r]
        if ok:
            med[n] = {
                k: _median(ok, k)
                for k in (
                    "wall_s",
                    "cpu_s",
                    "round_s_median",
                    "first_round_s",
                    "peak_mb",
                    "accuracy",
                    "load1_before",
                    "max_procs",
                )
            }
            accs = [r["accuracy"] for r in ok]
            med[n].update(
                n_ok=len(ok),
                acc_min=min(accs),
                acc_max=max(accs),
                shas=sorted({r.get("weights_sha") for r in ok if r.get("weights_sha")}),
                round_spread=spread(_values(ok, n, "round_s_median")),
                cpu_spread=spread(_values(ok, n, "cpu_s")),
            )
    lines = [
        "| framework | runs | wall s | CPU s (tree), median [min-max] | s/round (steady), median [min-max] | first round s | peak MB (PSS, tree) | procs | accuracy (median, min-max) | load1 at start |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        if n not in med:
            fails = [r.get("error", "") for r in runs if r["framework"] == n]
            lines.append(f"| {n} | 0 | failed: {fails[:1]} | | | | | | | |")
            continue
        m = med[n]
        lines.append(
            f"| {n} | {m['n_ok']} | {m['wall_s']:.1f} | {_fmt(m['cpu_spread'], 1)} | {_fmt(m['round_spread'], 3)} | {m['first_round_s']:.2f} | "
            f"{m['peak_mb']:.0f} | {m['max_procs']:.0f} | {m['accuracy']:.4f} ({m['acc_min']:.4f}-{m['acc_max']:.4f}) | "
            f"{m['load1_before']:.2f} |"
        )
    ratios = []
    for fl in ("flotilla", "flotilla-w2"):
        if fl not in med:
            continue
        for peer in ("raw", "pfl", "flower"):
            if peer in med:
                w = med[fl]["wall_s"] / med[peer]["wall_s"]
                paired = _paired_wall_ratios(runs, fl, peer)
                v_round = verdict(_values(runs, fl, "round_s_median"), _values(runs, peer, "round_s_median"))
                v_cpu = verdict(_values(runs, fl, "cpu_s"), _values(runs, peer, "cpu_s"))
                ratios.append(
                    f"- {fl} / {peer}: steady s/round {v_round['text']}; CPU {v_cpu['text']}; wall {w:.2f}x"
                    + (f"  ({1 / w:.1f}x faster end to end)" if w < 1 else "")
                    + (
                        f"; wall of each repeat's pair {', '.join(f'{x:.2f}x' for x in paired)} "
                        f"(median {statistics.median(paired):.2f}x)"
                        if paired
                        else ""
                    )
                )
                med[fl].setdefault("verdicts", {})[peer] = {"round_s": v_round, "cpu_s": v_cpu}
    if "raw" in med and "flotilla" in med:
        same = set(med["raw"]["shas"]) & set(med["flotilla"]["shas"])
        ratios.append(f"- final weights of flotilla (1 worker) and the bare loop identical: {bool(same)}")
    return "\n".join(lines + [""] + ratios), med


def ensure_peers(names: list[str]) -> None:
    need = sorted({PEER_OF[n] for n in names if n in PEER_OF and not (PEERS / PEER_OF[n] / ".ok").exists()})
    if need:
        print(f"installing peers {need} into {PEERS} (several minutes, once)...", flush=True)
        subprocess.run(["bash", str(HERE / "install_peers.sh"), *need], check=True)


def paired_rounds(workload: str, data_dir: Path, pairs: int, threads: int, out: Path) -> str:
    """round_ab.py's verdict: steady rounds timed back to back in one process, immune to the load
    drifting between the repeats above (which is what keeps their ratio "within noise")."""
    res = out / f"round_ab-{workload}.json"
    cmd = [sys.executable, str(HERE / "round_ab.py"), "--data", str(data_dir), "--pairs", str(pairs)]
    subprocess.run([*cmd, "--threads", str(threads), "--json", str(res)], check=True, stdout=subprocess.DEVNULL)
    r = json.loads(res.read_text())
    return (
        f"Paired steady rounds (round_ab.py, {pairs} pairs in one process, load {r['load_avg_before'][0]:.2f}): "
        f"Flotilla / bare loop, wall {r['wall_ratio']['text']}; CPU {r['cpu_ratio']['text']}; "
        f"identical weights: {r['identical_weights']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma list of {list(FRAMEWORKS)}")
    p.add_argument("--rounds", type=int, default=None, help="central iterations (default: the workload's)")
    p.add_argument("--users", default=None, help="scale: comma list of population sizes (default 100000,1000000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process for every framework")
    p.add_argument("--seed", type=int, default=None, help="seed passed to every framework (default: the workload's, 0)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before one run is killed")
    p.add_argument("--skip", default="", help="framework@users pairs to skip, e.g. flower@1000000")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--data", default=None, help="prepared data folder (default: <out>/data)")
    p.add_argument(
        "--ab-pairs",
        type=int,
        default=0,
        help="after the repeats, also time N steady rounds of Flotilla and the bare loop back to back in one "
        "process (round_ab.py) and report the paired ratio with its 95%% interval (fmnist, shakespeare)",
    )
    a = p.parse_args(argv)
    names = [n.strip() for n in a.frameworks.split(",") if n.strip()]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown:
        p.error(f"--frameworks: unknown {unknown}; choose from {list(FRAMEWORKS)}")
    out = Path(a.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ensure_peers(names)
    data_dir = prepare(a.workload, Path(a.data) if a.data else out / "data")
    pops = [None]
    if a.workload == "scale":
        pops = [int(u) for u in (a.users or "100000,1000000").split(",")]
    skip = set(s for s in a.skip.split(",") if s)
    report, all_runs = [], []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start = os.getloadavg()
    for pop in pops:
        extra = (["--rounds", str(a.rounds)] if a.rounds else []) + (["--users", str(pop)] if pop else [])
        extra += ["--seed", str(a.seed)] if a.seed is not None else []
        runs = []
        for rep in range(a.repeats):
            # alternate: forward on even repeats, reversed on odd ones, so every pair runs in both orders
            order = names if rep % 2 == 0 else names[::-1]
            for n in order:
                if f"{n}@{pop}" in skip:
                    continue
                tag = f"{stamp}-{a.workload}{pop or ''}-r{rep}"
                r = run_one(n, data_dir, extra, a.threads, a.timeout, log_dir, tag)
                r.update(repeat=rep, users=pop)
                runs.append(r)
                print(
                    f"  [{a.workload}{'' if pop is None else f' users={pop}'} repeat {rep + 1}/{a.repeats}] {n:12s} "
                    f"wall {r['wall_s']:7.1f}s  cpu {r['cpu_s']:7.1f}s  s/round {r.get('round_s_median', float('nan')):.3f}  "
                    f"peak {r['peak_mb']:6.0f}MB  acc {r.get('accuracy', float('nan')):.4f}  load {r['load1_before']:.2f}"
                    + (f"  ERROR {r['error']}" if "error" in r else ""),
                    flush=True,
                )
        table, med = summarise(runs, [n for n in names if any(r["framework"] == n for r in runs)])
        title = f"### {a.workload}" + (f", population {pop:,}" if pop else "")
        meta = json.loads((data_dir / "meta.json").read_text())
        rounds = a.rounds or meta["rounds"]
        head = (
            f"{title}: {rounds} rounds, cohort {meta['cohort']}, {a.repeats} repeats, {a.threads} torch thread(s) per process, "
            f"{os.cpu_count()} cores, seed {a.seed if a.seed is not None else meta.get('seed', 0)}; load average (1/5/15 min) "
            f"before {' '.join(f'{x:.2f}' for x in load_start)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        report.append(head + "\n\n" + table)
        all_runs += runs
        print("\n" + report[-1] + "\n", flush=True)
    if a.ab_pairs and a.workload != "scale":
        report.append(paired_rounds(a.workload, data_dir, a.ab_pairs, a.threads, out))
        print(report[-1] + "\n", flush=True)
    path = out / f"speed-{a.workload}.json"
    loads = {"before": load_start, "after": os.getloadavg()}
    path.write_text(
        json.dumps({"argv": sys.argv, "time": stamp, "load": loads, "runs": all_runs, "report": report}, indent=1)
    )
    print(f"raw results: {path}")
    return 0 if all("error" not in r for r in all_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
