"""Flotilla on a speed-benchmark workload: the public ``flotilla.train`` call, end to end.

.venv/bin/python benchmarks/speed/fl_flotilla.py --data benchmarks/out/data/fmnist [--workers 2]
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import base_args, emit, load, make_model, round_stats  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import flotilla  # noqa: E402
from flotilla.core.dataset import FederatedDataset  # noqa: E402


class _Same:
    """A read-only sequence of ``n`` identical items (per-client metadata without per-client objects)."""

    def __init__(self, n: int, item):
        self.n, self.item = n, item

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.item


class _TestSlots(_Same):
    """Clients ``0 .. k-1`` own 10 consecutive rows of the test pool each; the rest own none."""

    def __init__(self, n: int, k: int, per: int):
        super().__init__(n, None)
        self.k, self.per, self.empty = k, per, torch.empty(0, dtype=torch.long)

    def __getitem__(self, i):
        return torch.arange(i * self.per, (i + 1) * self.per) if i < self.k else self.empty


class OnDemandUsers(FederatedDataset):
    """A population of ``n`` users whose data is synthesised from (seed, user) when that user trains.

    Memory is independent of the population: there are no per-user tensors or objects, only
    the one user being trained is materialised.  The sampling, shuffling and batching are
    FederatedDataset's own (this class only swaps the store under ``fetch``).
    """

    def __init__(self, workload):
        m = workload.meta
        self.wl = workload
        self.name = "synthetic-on-demand"
        self.train_indices = _Same(workload.num_users, torch.arange(m["per_user"]))
        self._train_sizes = self._train_sizes_list = _Same(workload.num_users, m["per_user"])
        self.test_indices = _TestSlots(workload.num_users, m["test_users"], 10)
        self.client_names = _Same(workload.num_users, "synthetic")
        self._current = None
        self.fetch = lambda idx: (self._current[0][idx], self._current[1][idx])
        self.fetch_test = lambda idx: (workload.x_test[idx], workload.y_test[idx])

    def train_batches(self, client, batch_size, generator, epochs=1, steps=None):
        self._current = self.wl.user_data(client)
        yield from super().train_batches(client, batch_size, generator, epochs, steps)


def federated(wl) -> FederatedDataset:
    if wl.kind == "scale":
        return OnDemandUsers(wl)
    n = wl.num_users
    train = [torch.arange(int(wl.offsets[u]), int(wl.offsets[u + 1])) for u in range(n)]
    if wl.kind == "fmnist":
        test = [torch.arange(u, len(wl.y_test), n) for u in range(n)]  # the 10,000 test images dealt out
        return FederatedDataset(
            "fmnist", lambda i: (wl.x[i], wl.y[i]), train, test, fetch_test=lambda i: (wl.x_test[i], wl.y_test[i])
        )
    starts, tests = wl.starts, wl.test_starts
    train = [starts[int(wl.offsets[u]) : int(wl.offsets[u + 1])] for u in range(n)]
    test = [tests[int(wl.test_offsets[u]) : int(wl.test_offsets[u + 1])] for u in range(n)]
    return FederatedDataset("shakespeare", wl.windows, train, test)


def sync_fedavg(wl):
    """Flotilla's in-process algorithm on a workload, as ``flotilla.train`` builds it (for the
    in-process tools: round_ab.py, profile_round.py)."""
    from flotilla.core.client import ClientSpec
    from flotilla.sim.sync import SyncFedAvg

    m = wl.meta
    return SyncFedAvg(
        make_model(m),
        federated(wl),
        F.cross_entropy,
        cohort=m["cohort"],
        seed=m["seed"],
        client=ClientSpec(epochs=m["epochs"], batch_size=m["batch"], lr=m["lr"]),
    )


def main() -> None:
    p = base_args(__doc__)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    wl = load(args)
    m = wl.meta
    data = federated(wl)
    model = make_model(m)
    t0 = time.perf_counter()
    res = flotilla.train(
        model,
        data,
        F.cross_entropy,
        rounds=m["rounds"],
        cohort=m["cohort"],
        client=flotilla.ClientSpec(epochs=m["epochs"], batch_size=m["batch"], lr=m["lr"]),
        seed=m["seed"],
        eval={"every": m["rounds"], "batch_size": 1024},
        workers=args.workers,
    )
    stamps = [0.0] + [h["wall_time_s"] for h in res.history]
    last = res.history[-1]
    emit(
        {
            "framework": "flotilla",
            "workers": args.workers,
            "accuracy": last["accuracy"],
            "loss": last["loss"],
            "rounds": len(res.history),
            "call_s": time.perf_counter() - t0,
            **round_stats(stamps),
            "weights_sha": hashlib.sha1(res.weights.numpy().tobytes()).hexdigest()[:12],
        }
    )


if __name__ == "__main__":
    main()
