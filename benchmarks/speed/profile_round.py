"""Profile Flotilla's rounds on a workload with cProfile: where does the time go?

    .venv/bin/python benchmarks/speed/profile_round.py --data benchmarks/out/data/fmnist [--rounds 2] [--top 25]

A --data folder named fmnist, shakespeare or scale that prepare.py has not written yet is
prepared first (common.ensure_prepared).

Builds the workload exactly as fl_flotilla.py does, runs one warm-up round, then profiles
``--rounds`` rounds of ``SyncFedAvg.step`` (no evaluation) and prints the top functions by
own time plus a coarse split: forward, backward, optimizer step, batch fetch, the rest.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_args, load  # noqa: E402
from fl_flotilla import sync_fedavg  # noqa: E402


def main() -> None:
    p = base_args(__doc__)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    rounds = args.rounds or 2
    args.rounds = None
    wl = load(args)
    alg = sync_fedavg(wl)
    alg.step()  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(rounds):
        alg.step()
    prof.disable()
    wall = time.perf_counter() - t0
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(args.top)
    print(s.getvalue())
    total = sum(v[2] for v in st.stats.values())

    def own(pred):
        return sum(v[2] for k, v in st.stats.items() if pred(k))

    def cum(pred):
        return max([v[3] for k, v in st.stats.items() if pred(k)] or [0.0])

    parts = {
        "backward (autograd engine)": own(lambda k: "run_backward" in k[2]),
        "forward: conv/linear/lstm kernels": own(
            lambda k: any(n in k[2] for n in ("conv2d", "linear", "lstm", "max_pool2d", "relu", "embedding"))
        ),
        "loss (cross_entropy)": own(lambda k: "cross_entropy" in k[2]),
        "optimizer step (fused add_ on the flat vector)": cum(lambda k: k[2] == "_sgd_step"),
        "batch fetch (train_batches generator)": own(
            lambda k: k[2] in ("train_batches", "<lambda>", "windows", "fetch")
        ),
        "zero grad": own(lambda k: "zero_" in k[2]),
    }
    print(f"profiled {rounds} round(s): {wall:.2f} s wall ({wall / rounds:.3f} s/round), profiler total {total:.2f} s")
    for k, v in parts.items():
        print(f"  {k:50s} {v:7.3f} s  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
