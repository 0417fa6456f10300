"""Federated training on a simulated fleet: FedBuff / FedAsync, and synchronous rounds with
over-selection and deadlines, all on a simulated wall clock.

Both algorithms plug into :class:`flotilla.runner.Runner` like :class:`~flotilla.sim.sync.SyncFedAvg`:
``step()`` is one *server step* (a FedBuff buffer flush, one FedAsync update, or one
synchronous round) and returns its metrics, including

    sim_time_s        simulated clock at the end of the step
    trips             client trips started (= model downloads), cumulative
    uploads           results that reached the server, cumulative
    dropouts          trips abandoned by their device, cumulative
    bytes_down/up     model bytes sent to / received from clients, cumulative
    wasted_trips      trips whose work did not reach the model (dropped, late, too stale), cumulative
    wasted_device_s   device time spent on those trips, cumulative
    staleness_mean/max/p90   of the updates applied in this step (async)
    staleness_counts         of those updates, how many had staleness 0, 1, 2, ... (async)
    concurrency       time-averaged number of trips in flight during this step

Memory: clients in flight hold no model copy.  A client's local training is executed lazily at
its completion event, from the model version it downloaded, so one model is trained at a time.
The global weights serve the current version; a snapshot of version ``v`` is taken only when
the server moves past ``v`` while trips that downloaded ``v`` are still in flight, and is freed
when the last of them ends.  Memory therefore grows with the number of distinct versions in
flight (FedBuff: about max staleness; with ``max_staleness`` set, at most ``max_staleness + 1``
because older snapshots are released early and their trips are known to be discarded).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from flotilla.core.aggregate import UpdateRejected, WeightedMean
from flotilla.core.client import ClientSpec, LocalTrainer, LossFn, client_seed
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import resolve_device
from flotilla.core.fedbuff import FedAsyncServer, FedBuff, FedBuffServer
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape, refuse_unused
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec
from flotilla.core.staleness import Staleness
from flotilla.fleet.clock import AsyncScheduler, FleetStalled, SyncScheduler
from flotilla.fleet.fleet import Fleet

_NP_PREFIX = "fleet."


def _stall_limit(concurrency: int) -> int:
    return max(100_000, 100 * concurrency)


class _Counters:
    """Cumulative accounting shared by both algorithms (checkpointed)."""

    NAMES = (
        "uploads",
        "dropouts",
        "bytes_up",
        "wasted_trips",
        "wasted_device_s",
        "stale_discarded",
        "late_discarded",
        "rejected",
        "since_accept",
        "examples_seen_total",
    )

    def __init__(self):
        for n in self.NAMES:
            setattr(self, n, 0.0 if n == "wasted_device_s" else 0)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([float(getattr(self, n)) for n in self.NAMES], dtype=torch.float64)

    def load(self, t: torch.Tensor) -> None:
        for n, v in zip(self.NAMES, t.tolist()):
            setattr(self, n, v if n == "wasted_device_s" else int(v))


class _FleetAlgorithm:
    """Shared plumbing: model, trainer, fleet, counters, checkpoint helpers."""

    def __init__(
        self,
        model,
        dataset,
        loss_fn,
        fleet: Fleet,
        client: ClientSpec,
        weighting: str,
        seed: int,
        null_client: bool,
        components: Components,
        device: str | torch.device = "cpu",
    ):
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting: must be 'examples' or 'uniform', got {weighting!r}")
        if fleet.population.num_clients != dataset.num_clients:
            raise ValueError(
                f"the fleet maps devices onto {fleet.population.num_clients} clients, "
                f"the dataset has {dataset.num_clients}"
            )
        self.dataset = dataset
        self.fleet = fleet
        self.weighting = weighting
        self.seed = seed
        self.null_client = null_client
        # Trips train on the device; the global model, the buffer and the server step stay on the CPU.
        self.device = resolve_device(device)
        self.flat = FlatModel(model, self.device)
        self.weights = self.flat.flat.to("cpu", copy=True)
        self.model_bytes = fleet.model_bytes
        self.delta = torch.empty(0 if null_client else self.flat.numel)
        self.trainer = (components.client_update or LocalTrainer)(self.flat, loss_fn, client)
        self.c = _Counters()
        self.round = 0

    def close(self) -> None:
        """Nothing to release: the fleet lives in this process."""

    def _train(self, trip_id: int, client: int, start: torch.Tensor):
        return self.trainer.train(self.dataset, client, start, client_seed(self.seed, trip_id, client), self.delta)

    def _weight(self, num_examples: int) -> float:
        return float(num_examples) if self.weighting == "examples" else 1.0

    def _common_metrics(self, sched) -> dict[str, Any]:
        c = self.c
        return {
            "sim_time_s": sched.now,
            "trips": sched.trips_started,
            "uploads": c.uploads,
            "dropouts": c.dropouts,
            "bytes_down": sched.trips_started * self.fleet.download_bytes,
            "bytes_up": c.bytes_up,
            "wasted_trips": c.wasted_trips,
            "wasted_device_s": round(c.wasted_device_s, 3),
        }


class AsyncFleetSim(_FleetAlgorithm):
    """FedBuff (``algorithm="fedbuff"``) or FedAsync (``"fedasync"``) with ``concurrency``
    clients in flight on a simulated fleet."""

    def __init__(
        self,
        model: nn.Module,
        dataset: FederatedDataset,
        loss_fn: LossFn,
        *,
        fleet: Fleet,
        concurrency: int,
        algorithm: str = "fedbuff",
        buffer_size: int = 10,
        staleness: Staleness = Staleness(),
        normalize: str = "mean",
        max_staleness: int | None = None,
        mixing: float = 0.6,
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        weighting: str = "examples",
        seed: int = 0,
        null_client: bool = False,
        trace: bool = False,
        arrival_rate: float | None = None,
        components: Components | None = None,
        device: str | torch.device = "cpu",
    ):
        if algorithm not in ("fedbuff", "fedasync"):
            raise ValueError(f"async.algorithm: must be 'fedbuff' or 'fedasync', got {algorithm!r}")
        usable = ("client_update", "buffer") if algorithm == "fedbuff" else ("client_update",)
        parts = refuse_unused(components, f"AsyncFleetSim({algorithm})", usable)
        super().__init__(model, dataset, loss_fn, fleet, client, weighting, seed, null_client, parts, device)
        self.algorithm = algorithm
        self.sched = AsyncScheduler(fleet, concurrency, trace=trace, arrival_rate=arrival_rate)
        self.max_staleness = max_staleness
        numel = self.flat.numel
        if algorithm == "fedbuff":
            buf = FedBuff(
                0 if null_client else numel, buffer_size, staleness, normalize=normalize, max_staleness=max_staleness
            )
            if parts.buffer is not None:  # DP-FedBuff or the secure buffer, around this one
                buf = parts.buffer(buf, lambda: self.server.version)
            self.server = FedBuffServer(self.weights, buf, ServerOptimizer(server, 0 if null_client else numel))
        else:
            self.server = FedAsyncServer(self.weights, mixing, staleness, max_staleness=max_staleness)
        self.buffer_size = buffer_size if algorithm == "fedbuff" else 1
        self._null_count = 0
        self.snapshots: dict[int, torch.Tensor] = {}  # version -> weights, only for versions still in flight
        self._pool: list[torch.Tensor] = []
        self.staleness_counts: dict[int, int] = {}  # histogram of applied updates' staleness
        self.peak_snapshots = 0
        self.sched.fill()

    @classmethod
    def shape(
        cls,
        *,
        dataset: FederatedDataset,
        algorithm: str = "fedbuff",
        buffer_size: int = 10,
        weighting: str = "examples",
        seed: int = 0,
        null_client: bool = False,
        **_,
    ) -> Shape:
        buffered = algorithm == "fedbuff"
        return Shape(
            f"AsyncFleetSim({algorithm})",
            "buffer" if buffered else "per_update",
            "first_arrivals",
            buffer_size if buffered else 1,
            dataset.num_clients,
            dataset,
            weighting,
            seed,
            trains=not null_client,
        )

    @property
    def version(self) -> int:
        return self.server.version

    # -- the version store ------------------------------------------------------------------
    def _snapshot_current(self) -> None:
        """Called just before the global weights change: keep them if trips still need them."""
        v = self.server.version
        if self.null_client or self.sched.refs.get(v, 0) == 0:
            return
        buf = self._pool.pop() if self._pool else torch.empty_like(self.weights)
        buf.copy_(self.weights)
        self.snapshots[v] = buf
        self.peak_snapshots = max(self.peak_snapshots, len(self.snapshots))

    def _release(self, v: int) -> None:
        if v in self.snapshots and v not in self.sched.refs:
            buf = self.snapshots.pop(v)
            if len(self._pool) < 2:
                self._pool.append(buf)

    def _evict_too_stale(self) -> None:
        """With max_staleness, versions older than ``version - max_staleness`` can never be applied:
        free their snapshots now; their trips will be discarded on arrival."""
        if self.max_staleness is None:
            return
        floor = self.server.version - self.max_staleness
        for v in [v for v in self.snapshots if v < floor]:
            del self.snapshots[v]

    def _start_weights(self, v: int) -> torch.Tensor:
        return self.weights if v == self.server.version else self.snapshots[v]

    # -- one server step --------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        # The hot loop of the simulator (100k+ trip ends per second with a null client): counters
        # live in locals and are written back once per server step.
        sched, c, server = self.sched, self.c, self.server
        pop, fill, refs, snapshots = sched.pop, sched.fill, sched.refs, self.snapshots
        hist, max_s, null, buffer_size = self.staleness_counts, self.max_staleness, self.null_client, self.buffer_size
        t_begin, area_begin = sched.now, sched.area
        limit = _stall_limit(sched.concurrency)
        taus: list[int] = []
        loss_sum = seen = 0.0
        dropouts = uploads = wasted = stale = 0
        wasted_s = 0.0
        since = c.since_accept
        stepped = False
        try:
            while not stepped:
                t, _, tid, device, client, v0, t_start, dropped = pop()
                if dropped:
                    dropouts += 1
                    wasted += 1
                    wasted_s += t - t_start
                    since += 1
                else:
                    uploads += 1
                    tau = server.version - v0
                    if max_s is not None and tau > max_s:
                        stale += 1
                        wasted += 1
                        wasted_s += t - t_start
                        since += 1
                    elif null:
                        since = 0
                        taus.append(tau)
                        hist[tau] = hist.get(tau, 0) + 1
                        self._null_count += 1
                        if self._null_count >= buffer_size:
                            self._null_count = 0
                            server.version += 1
                            sched.version = server.version
                            stepped = True
                    else:
                        applied, r_loss, r_seen = self._apply(tid, client, v0, tau)
                        if applied is None:
                            since += 1
                            wasted += 1
                            wasted_s += t - t_start
                        else:
                            since = 0
                            taus.append(tau)
                            hist[tau] = hist.get(tau, 0) + 1
                            loss_sum += r_loss * r_seen
                            seen += r_seen
                            stepped = applied
                if snapshots and v0 in snapshots and v0 not in refs:
                    self._release(v0)
                if since > limit:
                    raise FleetStalled(self._stall_message(limit, dropouts, stale))
                fill()
        finally:
            c.dropouts += dropouts
            c.uploads += uploads
            c.bytes_up += uploads * self.fleet.upload_bytes
            c.wasted_trips += wasted
            c.wasted_device_s += wasted_s
            c.stale_discarded += stale
            c.since_accept = since
        self._evict_too_stale()
        self.round += 1
        dt = sched.now - t_begin
        n = len(taus)
        ordered = sorted(taus)
        out = {
            "round": self.round,
            "version": server.version,
            "updates": n,
            **self._common_metrics(sched),
            "stale_discarded": c.stale_discarded,
            "staleness_mean": sum(taus) / n if n else None,
            "staleness_p90": ordered[min(n - 1, int(0.9 * n))] if n else None,
            "staleness_max": ordered[-1] if n else None,
            # updates of staleness 0, 1, 2, ... in this step (the dashboard's histogram sums them)
            "staleness_counts": [ordered.count(k) for k in range(ordered[-1] + 1)] if n else [],
            "concurrency": (sched.area - area_begin) / dt if dt > 0 else float(sched.in_flight),
            "versions_in_memory": len(snapshots) + 1,
            **(
                {}
                if sched.poisson is None
                else {"arrivals": sched.poisson.count, "arrivals_missed": sched.poisson.missed}
            ),
            "train_loss": loss_sum / seen if seen else None,
            "examples_seen": seen,
        }
        c.examples_seen_total += int(seen)
        return out

    def _apply(self, tid: int, client: int, v0: int, tau: int) -> tuple[bool | None, float, float]:
        """Train the client lazily from version ``v0`` and hand its update to the server.

        Returns (stepped, loss, examples_seen); stepped is None when nothing was applied."""
        start = self._start_weights(v0)
        r = self._train(tid, client, start)
        if r.num_examples == 0:
            return None, 0.0, 0.0
        try:
            if self.algorithm == "fedbuff":
                buf = self.server.buffer
                if buf.count + 1 >= buf.buffer_size:
                    self._snapshot_current()
                res = self.server.submit(self.delta, self._weight(r.num_examples), v0, client)
            else:
                self._snapshot_current()
                res = self.server.submit(self.delta, start, v0, client)
        except UpdateRejected:
            self.c.rejected += 1
            return None, 0.0, 0.0
        if res.stepped:
            self.sched.version = self.server.version
        return res.stepped, r.loss, r.examples_seen

    def _stall_message(self, limit: int, dropouts: int = 0, stale: int = 0) -> str:
        c, av = self.c, self.fleet.availability
        return (
            f"fleet simulation stalled: {limit} client trips in a row ended without an update reaching the model "
            f"(simulated time {self.sched.now:.0f} s; so far {c.dropouts + dropouts} dropouts, "
            f"{c.stale_discarded + stale} too stale, "
            f"{c.rejected} rejected). No client can finish: check fleet.availability.dropout ({av.dropout}), "
            f"fleet.availability.session_s (sessions shorter than trips drop out) and async.max_staleness "
            f"({self.max_staleness})."
        )

    def staleness_histogram(self) -> dict[int, int]:
        return dict(sorted(self.staleness_counts.items()))

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "weights": self.weights.clone(),
            "round": torch.tensor(self.round),
            "version": torch.tensor(self.server.version),
            "fleet.counters": self.c.as_tensor(),
            "fleet.null_count": torch.tensor(self._null_count),
        }
        for k, v in self.sched.state_arrays().items():
            state[_NP_PREFIX + k] = torch.from_numpy(np.ascontiguousarray(v))
        for v, w in self.snapshots.items():
            state[f"snapshot.{v}"] = w.clone()
        if self.staleness_counts:
            items = sorted(self.staleness_counts.items())
            state["fleet.staleness_hist"] = torch.tensor(items, dtype=torch.int64)
        if self.algorithm == "fedbuff" and not self.null_client:
            state.update({f"buffer.{k}": v for k, v in self.server.buffer.state_dict().items()})
            state.update({f"server_opt.{k}": v for k, v in self.server.server_opt.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["weights"].shape != self.weights.shape:
            raise ValueError(f"checkpoint has {state['weights'].numel()} weights, model has {self.weights.numel()}")
        if self.algorithm == "fedbuff" and not self.null_client:
            self.server.server_opt.load_state_dict(
                {k.removeprefix("server_opt."): v for k, v in state.items() if k.startswith("server_opt.")}
            )
            self.server.buffer.load_state_dict(
                {k.removeprefix("buffer."): v for k, v in state.items() if k.startswith("buffer.")}
            )
        self.weights.copy_(state["weights"])
        self.round = int(state["round"])
        self.server.version = int(state["version"])
        self.c.load(state["fleet.counters"])
        self._null_count = int(state["fleet.null_count"])
        self.sched.load_state_arrays(
            {k.removeprefix(_NP_PREFIX): v.numpy() for k, v in state.items() if k.startswith(_NP_PREFIX)}
        )
        self.snapshots = {
            int(k.removeprefix("snapshot.")): v.clone() for k, v in state.items() if k.startswith("snapshot.")
        }
        hist = state.get("fleet.staleness_hist")
        self.staleness_counts = {int(a): int(b) for a, b in hist.tolist()} if hist is not None else {}


class SyncFleetSim(_FleetAlgorithm):
    """Synchronous FedAvg-family rounds in simulated time.

    Each round selects ``ceil(cohort * over_selection)`` eligible devices, closes at the
    ``cohort``-th arrival (or at ``deadline_s`` after the round start, or when every selected
    trip has ended), aggregates the results that arrived before the close and discards the
    rest as wasted work.  Discarded clients are never trained on the host.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: FederatedDataset,
        loss_fn: LossFn,
        *,
        fleet: Fleet,
        cohort: int,
        over_selection: float = 1.3,
        deadline_s: float | None = None,
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        weighting: str = "examples",
        seed: int = 0,
        aggregator=None,
        null_client: bool = False,
        trace: bool = False,
        max_empty_rounds: int = 100,
        components: Components | None = None,
        device: str | torch.device = "cpu",
    ):
        if over_selection < 1:
            raise ValueError(f"fleet.over_selection: must be >= 1, got {over_selection}")
        if cohort < 1:
            raise ValueError(f"cohort: must be >= 1, got {cohort}")
        self.select = math.ceil(cohort * over_selection - 1e-9)
        if self.select > fleet.size:
            raise ValueError(
                f"cohort x fleet.over_selection = {self.select} is larger than fleet.population={fleet.size}"
            )
        parts = refuse_unused(components, "SyncFleetSim", ("client_update", "aggregator"))
        super().__init__(model, dataset, loss_fn, fleet, client, weighting, seed, null_client, parts, device)
        self.cohort = cohort
        self.deadline_s = deadline_s
        self.sched = SyncScheduler(fleet, trace=trace)
        self.server_opt = ServerOptimizer(server, 0 if null_client else self.flat.numel)
        numel = 0 if null_client else self.flat.numel
        if aggregator is None:
            aggregator = parts.aggregator(numel) if parts.aggregator else WeightedMean(numel)
        self.aggregator = aggregator
        self.max_empty_rounds = max_empty_rounds
        self.empty_rounds = 0
        self.last_round = None

    @classmethod
    def shape(
        cls,
        *,
        dataset: FederatedDataset,
        cohort: int,
        weighting: str = "examples",
        seed: int = 0,
        null_client: bool = False,
        **_,
    ) -> Shape:
        return Shape(
            "SyncFleetSim",
            "round",
            "first_arrivals",
            cohort,
            dataset.num_clients,
            dataset,
            weighting,
            seed,
            trains=not null_client,
        )

    def step(self) -> dict[str, Any]:
        sched, c, mb = self.sched, self.c, self.fleet.upload_bytes
        out = sched.round(self.select, self.cohort, self.deadline_s)
        self.last_round = out
        c.bytes_up += (len(out.accepted) + len(out.late)) * mb
        c.uploads += len(out.accepted) + len(out.late)
        c.dropouts += len(out.dropped)
        c.late_discarded += len(out.late)
        c.wasted_trips += len(out.late) + len(out.dropped)
        c.wasted_device_s += out.wasted_device_s
        loss_sum = seen = 0.0
        self.aggregator.reset()
        if not self.null_client:
            for tid, _device, client in out.accepted:
                r = self._train(tid, client, self.weights)
                if r.num_examples > 0:
                    try:
                        self.aggregator.add(self.delta, self._weight(r.num_examples), client)
                    except UpdateRejected:
                        c.rejected += 1
                        c.wasted_trips += 1
                loss_sum += r.loss * r.examples_seen
                seen += r.examples_seen
            if self.aggregator.count:
                self.server_opt.step(self.weights, self.aggregator.result())
        if out.accepted:
            self.empty_rounds = 0
        else:
            self.empty_rounds += 1
            if self.empty_rounds >= self.max_empty_rounds:
                raise FleetStalled(
                    f"fleet simulation stalled: {self.empty_rounds} rounds in a row closed with no result "
                    f"(simulated time {sched.now:.0f} s; {c.dropouts} dropouts, {c.late_discarded} late). No client can "
                    f"finish: check fleet.deadline_s ({self.deadline_s}) against the trip durations, "
                    f"fleet.availability.dropout and fleet.availability.session_s."
                )
        self.round += 1
        dt = out.t_close - out.t_start
        c.examples_seen_total += int(seen)
        return {
            "round": self.round,
            "updates": len(out.accepted),
            **self._common_metrics(sched),
            "late_discarded": c.late_discarded,
            "round_time_s": dt,
            "concurrency": out.busy_device_s / dt if dt > 0 else float(out.selected),
            "train_loss": loss_sum / seen if seen else None,
            "examples_seen": seen,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "weights": self.weights.clone(),
            "round": torch.tensor(self.round),
            "fleet.counters": self.c.as_tensor(),
            "fleet.empty_rounds": torch.tensor(self.empty_rounds),
        }
        for k, v in self.sched.state_arrays().items():
            state[_NP_PREFIX + k] = torch.from_numpy(np.ascontiguousarray(v))
        state.update({f"server_opt.{k}": v for k, v in self.server_opt.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["weights"].shape != self.weights.shape:
            raise ValueError(f"checkpoint has {state['weights'].numel()} weights, model has {self.weights.numel()}")
        self.server_opt.load_state_dict(
            {k.removeprefix("server_opt."): v for k, v in state.items() if k.startswith("server_opt.")}
        )
        self.weights.copy_(state["weights"])
        self.round = int(state["round"])
        self.c.load(state["fleet.counters"])
        self.empty_rounds = int(state["fleet.empty_rounds"])
        self.sched.load_state_arrays(
            {k.removeprefix(_NP_PREFIX): v.numpy() for k, v in state.items() if k.startswith(_NP_PREFIX)}
        )
