"""Paired A/B of steady rounds, in one process: Flotilla's round vs the bare loop's, back to back.

    .venv/bin/python benchmarks/speed/round_ab.py --workload fmnist [--pairs 40] [--limit 1.03]
    .venv/bin/python benchmarks/speed/round_ab.py --workload shakespeare --pairs 60

Why paired: separate processes (``run.py``) see this shared machine's load drift between runs,
so 5-7 repeats cannot resolve a 3% difference.  Here both sides train the *same* round (same
cohort, same data, same seeds, bit-identical SGD steps) one right after the other, many times, in
the order A B B A A B ... (each side goes first half the time), and each pair gives one ratio.
The verdict is the median ratio with a distribution-free 95% interval (noise.paired_verdict):
"at most 1.03x shown" only when the whole interval lies under the limit.

Flotilla's side is what ``run.py``'s steady s/round measures of it: one ``Runner`` round
(``SyncFedAvg.step`` and the finite check; no evaluation, no run directory).  The bare loop's
side is ``fl_raw.BareLoop.round``.  Wall time and process CPU time are both reported; the first
``--warmup`` pairs are dropped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch  # noqa: E402
from common import base_args, load  # noqa: E402
from fl_flotilla import sync_fedavg  # noqa: E402
from fl_raw import BareLoop  # noqa: E402
from noise import paired_verdict  # noqa: E402

from flotilla.runner import Runner  # noqa: E402


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = base_args(__doc__)
    p.add_argument(
        "--workload", default=None, help="fmnist or shakespeare: the prepared folder under benchmarks/out/data"
    )
    p.add_argument("--pairs", type=int, default=40, help="measured pairs (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="pairs run first and dropped")
    p.add_argument("--limit", type=float, default=1.03, help="the ratio to test against")
    p.add_argument("--json", help="also write the results to this file")
    for act in p._actions:
        if act.dest == "data":
            act.required = False
    a = p.parse_args()
    if a.data is None:
        a.data = str(HERE.parents[0] / "out" / "data" / (a.workload or "fmnist"))
    a.rounds = None
    wl = load(a)
    alg = sync_fedavg(wl)
    runner = Runner(alg, None, rounds=0, progress=False, plot=False)
    bare = BareLoop(wl)

    def flotilla_round() -> None:
        runner.rounds = alg.round + 1
        runner.run()

    rows = []
    load_before = os.getloadavg()
    for i in range(a.warmup + a.pairs):
        r = alg.round  # both sides train round r: the same cohort and seeds
        if i % 4 in (0, 3):  # A B B A: each side first half the time
            fw, fc = timed(flotilla_round)
            bw, bc = timed(lambda: bare.round(r))
        else:
            bw, bc = timed(lambda: bare.round(r))
            fw, fc = timed(flotilla_round)
        if i >= a.warmup:
            rows.append({"round": r, "flotilla_wall": fw, "raw_wall": bw, "flotilla_cpu": fc, "raw_cpu": bc})
        print(f"round {r}: flotilla {fw:.3f} s ({fc:.3f} CPU), raw {bw:.3f} s ({bc:.3f} CPU), ratio {fw / bw:.3f}")
    same = torch.equal(alg.weights, torch.cat([g.reshape(-1) for g in bare.global_w]))
    wall = paired_verdict([x["flotilla_wall"] / x["raw_wall"] for x in rows], a.limit)
    cpu = paired_verdict([x["flotilla_cpu"] / x["raw_cpu"] for x in rows], a.limit)
    out = {
        "data": a.data,
        "pairs": a.pairs,
        "warmup": a.warmup,
        "limit": a.limit,
        "torch_threads": torch.get_num_threads(),
        "flotilla_wall_median_s": statistics.median(x["flotilla_wall"] for x in rows),
        "raw_wall_median_s": statistics.median(x["raw_wall"] for x in rows),
        "wall_ratio": wall,
        "cpu_ratio": cpu,
        "identical_weights": same,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rows": rows,
    }
    print(f"identical weights after {alg.round} rounds: {same}")
    print(f"Flotilla / bare loop, wall: {wall['text']}")
    print(f"Flotilla / bare loop, CPU:  {cpu['text']}")
    print(f"load average before {load_before}, after {out['load_avg_after']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
