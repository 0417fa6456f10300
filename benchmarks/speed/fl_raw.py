"""The bare PyTorch loop: exactly the local SGD steps Flotilla performs, with no framework around them.

One model; per round the same cohort (same sampling rule), per client the global weights copied
in, the same shuffled mini-batches (same per-client seed), ``torch.optim.SGD`` steps, the
example-weighted delta summed, and the mean delta added to the global weights.  With one
Flotilla worker the final weights are expected to be identical (the harness compares hashes).

    .venv/bin/python benchmarks/speed/fl_raw.py --data benchmarks/out/data/fmnist
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import base_args, emit, evaluate, load, make_model, round_stats  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def sample_cohort(seed: int, round_: int, population: int, cohort: int) -> np.ndarray:
    return np.random.default_rng([seed, round_, 0x5EED]).choice(population, size=cohort, replace=False)


def client_seed(seed: int, round_: int, client: int) -> int:
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1, np.uint64)[0] >> 1)


class BareLoop:
    """The loop's state (one model, the global weights, the delta sum, ``torch.optim.SGD``) and one
    round of it; ``main`` runs it end to end, ``round_ab.py`` alternates its rounds with Flotilla's."""

    def __init__(self, wl):
        self.wl, self.m = wl, wl.meta
        self.model = make_model(self.m)
        self.params = list(self.model.parameters())
        self.global_w = [p.detach().clone() for p in self.params]
        self.delta_sum = [torch.zeros_like(p) for p in self.params]
        self.opt = torch.optim.SGD(self.params, lr=self.m["lr"])
        self.model.train()

    def round(self, r: int) -> None:
        m, wl, model, params, opt = self.m, self.wl, self.model, self.params, self.opt
        for d in self.delta_sum:
            d.zero_()
        total = 0.0
        for c in sample_cohort(m["seed"], r, wl.num_users, m["cohort"]).tolist():
            with torch.no_grad():
                for p, g in zip(params, self.global_w):
                    p.copy_(g)
            x, y = wl.user_data(c)
            s = client_seed(m["seed"], r, c)
            gen = torch.Generator().manual_seed(s)
            n = len(y)
            for _ in range(m["epochs"]):
                order = torch.randperm(n, generator=gen)
                for i in range(0, n, m["batch"]):
                    idx = order[i : i + m["batch"]]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            with torch.no_grad():
                for d, p, g in zip(self.delta_sum, params, self.global_w):
                    d.add_(p - g, alpha=float(n))
            total += n
        with torch.no_grad():
            for g, d in zip(self.global_w, self.delta_sum):
                g.add_(d / total)


def main() -> None:
    args = base_args(__doc__).parse_args()
    wl = load(args)
    m = wl.meta
    loop = BareLoop(wl)
    model, params, global_w = loop.model, loop.params, loop.global_w
    stamps = [time.perf_counter()]
    for r in range(m["rounds"]):
        loop.round(r)
        stamps.append(time.perf_counter())
    with torch.no_grad():
        for p, g in zip(params, global_w):
            p.copy_(g)
    ev = evaluate(model, wl.x_test, wl.y_test)
    stamps[-1] = time.perf_counter()
    flat = torch.cat([g.reshape(-1) for g in global_w])
    emit(
        {
            "framework": "raw",
            **ev,
            "rounds": m["rounds"],
            **round_stats(stamps),
            "weights_sha": hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:12],
        }
    )


if __name__ == "__main__":
    main()
