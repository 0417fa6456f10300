"""Torch intra-op threads for FL-sized steps: time one SGD step (batch 10) with 1 vs N threads.

    .venv/bin/python benchmarks/speed/threads.py [--threads 1,2] [--steps 100]

Prints wall and CPU milliseconds per step for the SmallCNN (Fashion-MNIST) and the CharLSTM
(Shakespeare).  On a machine whose cores are busy with other work, more threads than free cores
make OpenMP threads wait for each other: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _models_module  # noqa: E402


def per_step(model, x, y, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(10):
        step()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - w) / steps * 1e3, (time.process_time() - c) / steps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    models = _models_module()
    torch.manual_seed(0)
    cases = {
        "SmallCNN": (models.SmallCNN(), torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))),
        "CharLSTM": (models.CharLSTM(81), torch.randint(0, 81, (10, 80)), torch.randint(0, 81, (10,))),
    }
    for n in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(n)
        for name, (m, x, y) in cases.items():
            wall, cpu = per_step(m, x, y, a.steps)
            print(f"{name:9s} threads={n}: {wall:7.2f} ms/step wall, {cpu:7.2f} ms/step CPU")


if __name__ == "__main__":
    main()
