"""Synchronous FedAvg with the cohort split over worker processes.

Each round the cohort (sampled exactly as in :class:`~flotilla.sim.sync.SyncFedAvg`) is split
into ``workers`` shares balanced by client size.  Every worker process holds its own model,
:class:`~flotilla.core.client.LocalTrainer` and dataset (inherited by ``fork``, so nothing is
pickled and the data pages stay shared), trains its share one client at a time *in place*, and
returns only the weighted sum of its clients' deltas, written into a shared-memory row.  The
parent process is worker 0; it adds the rows in worker order and takes the one server step.

* The global weights live in shared memory: workers read them directly, no copy per round.
* Per round only the client ids go to the workers and four numbers come back.
* Deterministic for a fixed worker count: the split and every summation order are fixed.
  ``workers=1`` adds deltas in exactly SyncFedAvg's order (bit-identical); with more workers
  the sum is regrouped, so results differ from ``workers=1`` by float rounding only.
* Each process trains with ``threads_per_worker`` torch threads (default: the cores divided
  by the workers), so that workers never oversubscribe the cores.

Plain weighted-mean aggregation only: a custom aggregator (privacy, secure aggregation)
needs every client's delta in one place, so it runs with ``workers=1``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import traceback
import weakref

import torch
from torch import nn

from flotilla.core.aggregate import UpdateRejected, check_update
from flotilla.core.client import ClientSpec, LossFn, client_seed
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import CUDA_FORK, resolve_device
from flotilla.core.protocols import Components, Shape
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.sim.sync import SyncFedAvg


def split_cohort(clients: list[int], sizes: list[int], workers: int) -> list[list[int]]:
    """Deterministic balanced split: largest client first to the least-loaded worker.

    Each share keeps the clients in cohort order, so ``workers=1`` is the cohort itself.
    """
    load = [0] * workers
    owner = {}
    order = sorted(range(len(clients)), key=lambda i: (-sizes[i], i))
    for i in order:
        w = min(range(workers), key=lambda k: (load[k], k))
        owner[i] = w
        load[w] += max(sizes[i], 1)
    return [[clients[i] for i in range(len(clients)) if owner[i] == w] for w in range(workers)]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_NOT_COMPOSABLE = (
    "each worker process trains its clients and sums their plain deltas in shared memory, so a "
    "client update (DP-SGD), an aggregator (DP, secure aggregation) or a cohort sampler given to it "
    "would never run"
)


class ParallelFedAvg(SyncFedAvg):
    """:class:`SyncFedAvg` whose rounds are trained by ``workers`` processes (the parent included)."""

    @classmethod
    def shape(cls, *, workers: int = 2, **kwargs) -> Shape:
        base = SyncFedAvg.shape(**kwargs)
        return dataclasses.replace(
            base, name=f"ParallelFedAvg(workers={workers})", composable=workers <= 1, why_not_composable=_NOT_COMPOSABLE
        )

    def __init__(
        self,
        model: nn.Module,
        dataset: FederatedDataset,
        loss_fn: LossFn,
        *,
        cohort: int,
        workers: int = 2,
        threads_per_worker: int | None = None,
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        weighting: str = "examples",
        seed: int = 0,
        aggregator=None,
        components: Components | None = None,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        if workers > 1 and resolve_device(device).type != "cpu":
            raise ValueError(f"workers: {CUDA_FORK}")
        if aggregator is not None or (components is not None and components.given()):
            raise ValueError(f"workers: {_NOT_COMPOSABLE}; use workers=1")
        if workers > 1 and "fork" not in mp.get_all_start_methods():
            raise RuntimeError("workers > 1 needs the 'fork' start method (Linux); use workers=1 on this platform")
        super().__init__(
            model,
            dataset,
            loss_fn,
            cohort=cohort,
            client=client,
            server=server,
            weighting=weighting,
            seed=seed,
            device=device,
        )
        self.workers = workers
        self.threads_per_worker = threads_per_worker or max(1, _usable_cores() // workers)
        self.weights.share_memory_()  # workers read the global model from here
        self._sum = torch.zeros(self.flat.numel)  # worker 0's (the parent's) share
        self._rows = torch.zeros(max(workers - 1, 1), self.flat.numel).share_memory_()
        self._total = torch.zeros(self.flat.numel)
        self._conns: list = []
        self._procs: list = []
        self._finalizer = None

    # -- one worker's share ------------------------------------------------------------------
    def _train_share(self, round_: int, clients: list[int], out: torch.Tensor) -> tuple[float, float, float, int]:
        """Train ``clients`` in order from the global weights; ``out = sum_i w_i * delta_i``."""
        out.zero_()
        total_weight = loss_sum = seen = 0.0
        count = 0
        numel = self.flat.numel
        for c in clients:
            r = self.trainer.train(self.dataset, c, self.weights, client_seed(self.seed, round_, c), self.delta)
            if r.num_examples > 0:
                check_update(self.delta, numel, f"update from client {c}")
                weight = float(r.num_examples) if self.weighting == "examples" else 1.0
                out.add_(self.delta, alpha=weight)
                total_weight += weight
                count += 1
            loss_sum += r.loss * r.examples_seen
            seen += r.examples_seen
        return total_weight, loss_sum, seen, count

    # -- worker processes --------------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("fork")
        for rank in range(1, self.workers):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=self._serve, args=(rank, child_end, parent_end), daemon=True, name=f"flotilla-worker-{rank}"
            )
            p.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self._conns, self._procs)

    def _serve(self, rank: int, conn, parent_end) -> None:
        """Worker loop (in the child): receive (round, clients), train, write the row, reply."""
        parent_end.close()
        for other in self._conns:  # earlier workers' parent ends, inherited by fork
            other.close()
        torch.set_num_threads(self.threads_per_worker)
        row = self._rows[rank - 1]
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if msg is None:
                break
            round_, clients = msg
            try:
                conn.send(("ok", self._train_share(round_, clients, row)))
            except Exception as e:  # report, keep serving: the parent decides
                try:
                    conn.send(("error", e, traceback.format_exc()))
                except Exception:
                    conn.send(("error", RuntimeError(repr(e)), traceback.format_exc()))
        conn.close()
        os._exit(0)

    def close(self) -> None:
        """End the worker processes (they are restarted by the next ``step``)."""
        if self._finalizer is not None:
            self._finalizer()
        self._conns, self._procs, self._finalizer = [], [], None

    # -- the round ---------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        draw = self.sample_cohort
        clients = [int(c) for c in draw(self.seed, self.round, self.dataset.num_clients, self.cohort)]
        shares = split_cohort(clients, [self.dataset.num_train(c) for c in clients], self.workers)
        if self.workers > 1 and not self._procs:
            self._start()
        for conn, share in zip(self._conns, shares[1:]):
            conn.send((self.round, share))
        previous_threads = torch.get_num_threads()
        if previous_threads != self.threads_per_worker:
            torch.set_num_threads(self.threads_per_worker)
        error = None
        try:
            results = [self._train_share(self.round, shares[0], self._sum)]
        except Exception as e:  # collect the workers' replies before raising, to stay in step
            error, results = e, []
        finally:
            if previous_threads != self.threads_per_worker:
                torch.set_num_threads(previous_threads)
        for rank, conn in enumerate(self._conns, start=1):
            try:
                reply = conn.recv()
            except EOFError:
                self.close()
                raise RuntimeError(f"worker {rank} died during round {self.round + 1}") from None
            if reply[0] == "error" and error is None:
                error = reply[1]
                if not isinstance(error, UpdateRejected):
                    error = RuntimeError(f"worker {rank} failed in round {self.round + 1}:\n{reply[2]}")
            elif reply[0] == "ok":
                results.append(reply[1])
        if error is not None:
            raise error  # the round is abandoned: weights, optimizer state and round unchanged
        total = self._total.copy_(self._sum)
        for rank in range(1, self.workers):
            total.add_(self._rows[rank - 1])
        total_weight = sum(r[0] for r in results)
        if sum(r[3] for r in results):
            self.server_opt.step(self.weights, total.div_(total_weight))
        self.round += 1
        seen = sum(r[2] for r in results)
        return {
            "round": self.round,
            "train_loss": sum(r[1] for r in results) / max(seen, 1),
            "examples_seen": seen,
            "clients": len(clients),
        }


def _shutdown(conns, procs) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, BrokenPipeError):
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=1)
    for conn in conns:
        conn.close()
