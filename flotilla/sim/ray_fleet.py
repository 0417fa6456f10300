"""The asynchronous fleet (FedBuff, FedAsync) with its clients trained by Ray actors
(``mode: async`` with ``runtime: {name: ray}``; see docs/ray.md).

Everything simulated stays on the driver, unchanged: :class:`RayAsyncFleet` *is* an
:class:`~flotilla.sim.fleet.AsyncFleetSim` (the event clock, the population, the scheduler with
``concurrency`` trips in flight in simulated time, the buffer, the snapshots, the server step,
the metrics and the checkpoint).  Only the host-side training of a trip moves to the actors
(:meth:`ClientActor.train_trip`, the actors of :mod:`flotilla.sim.ray_runtime`).

Why the trips of one server step can train in parallel: the model version does not change until
the step's last update (the one that fills the buffer), so every trip that completes before it
trains from weights already known at the step's start: the current weights or a kept snapshot.
At the start of each step the driver runs the step's events ahead on a copy of the scheduler
(loaded from its checkpoint arrays, so it replays exactly), predicts which trips will be trained
(not dropped, not too stale) and how many of them fill the buffer (a client with training
examples counts), and sends those trips to the actors at once, each with the weights of the
version it downloaded (one object-store copy per version).  Then the unchanged in-process loop
runs, and its ``_train`` takes each trip's result from its actor in event order, so the buffer
receives the same deltas in the same order: the same bits as in-process when actors and driver
train with the same torch thread count.  A wrong prediction (an update rejected as non-finite)
only costs time: a trip that was not sent ahead is trained on an actor when the loop reaches it.

Parallelism is therefore up to ``buffer_size`` trips per step (FedAsync applies every update at
once, so its trips train one at a time: correct, not faster).  Faults are handled as for
synchronous rounds: a killed actor is restarted by Ray and its trips are retried
(``max_task_retries``); a trip's training depends only on (weights, seed, trip, client).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from flotilla.core.client import ClientResult
from flotilla.core.protocols import Components, Shape
from flotilla.fleet.clock import AsyncScheduler, FleetStalled
from flotilla.sim.fleet import AsyncFleetSim, _stall_limit
from flotilla.sim.ray_runtime import ClientTrainingError, RayActors, check_actor_args, import_ray

NOT_ON_RAY_ASYNC = (
    "the async fleet on runtime: ray trains plain clients on the actors; privacy (DP-FedBuff, DP-SGD), "
    "secure aggregation and client algorithms are not supported there yet; use runtime: {name: in-process}"
)


class RayAsyncFleet(RayActors, AsyncFleetSim):
    """:class:`AsyncFleetSim` whose trips are trained by ``actors`` Ray actors."""

    @classmethod
    def shape(cls, *, actors: int = 2, **kwargs) -> Shape:
        base = AsyncFleetSim.shape(**kwargs)
        return dataclasses.replace(base, name=f"RayAsyncFleet(actors={actors})")

    def __init__(
        self,
        model,
        dataset,
        loss_fn,
        *,
        actors: int = 2,
        address: str | None = None,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        max_restarts: int = 3,
        on_client_error: str = "stop",
        task_config=None,
        components: Components | None = None,
        **kwargs,
    ):
        check_actor_args(actors, cpus_per_actor, gpus_per_actor, max_restarts, on_client_error)
        self._ray = import_ray()  # before anything is built: one line naming the extra
        if components is not None and components.given():
            raise ValueError(f"runtime: ray: {', '.join(components.given())} given: {NOT_ON_RAY_ASYNC}")
        super().__init__(model, dataset, loss_fn, **kwargs)
        self.actors, self.address, self.cpus_per_actor = actors, address, float(cpus_per_actor)
        self.max_restarts, self.on_client_error = max_restarts, on_client_error
        self._client_spec, self._loss_fn, self._model = kwargs.get("client"), loss_fn, model
        if self._client_spec is None:
            from flotilla.core.client import ClientSpec

            self._client_spec = ClientSpec()
        self._task_config = task_config
        self._dp_trainer = self._dp_aggregator = None
        self._handles: list = []
        self._source = None
        self.actor_nodes: list[str] = []
        self._started_ray = False
        self._ahead: dict[int, object] = {}  # trip id -> the actor's reply (an ObjectRef), this step only
        self._load = [0] * actors  # examples sent to each actor this step
        self.trips_sent_ahead = self.trips_trained_late = 0  # how well the look-ahead predicted

    # -- the look-ahead ------------------------------------------------------------------------
    def _predict(self) -> list[tuple[int, int, int]]:
        """The trips ``(trip_id, client, version)`` this step's loop will train, in event order,
        found by running its events on a copy of the scheduler (the real one is not touched)."""
        sched, server = self.sched, self.server
        rate = None if sched.poisson is None else sched.poisson.rate
        ahead = AsyncScheduler(self.fleet, sched.concurrency, arrival_rate=rate)
        ahead.load_state_arrays(sched.state_arrays())
        need = self.buffer_size - (server.buffer.count if self.algorithm == "fedbuff" else 0)
        version, max_s, num_train = server.version, self.max_staleness, self.dataset.num_train
        trips = []
        try:
            for _ in range(_stall_limit(sched.concurrency)):  # the real loop stalls past this
                _, _, tid, _, client, v0, _, dropped = ahead.pop()
                if not dropped and (max_s is None or version - v0 <= max_s):
                    trips.append((tid, client, v0))
                    if num_train(client) > 0:
                        need -= 1
                        if need <= 0:
                            break
                ahead.fill()
        except FleetStalled:  # the real loop will say so
            pass
        return trips

    def _send(self, tid: int, client: int, weights_ref):
        """One trip to the least-loaded actor (by examples, this step); Ray runs each actor's calls in order."""
        rank = min(range(self.actors), key=lambda k: (self._load[k], k))
        self._load[rank] += max(self.dataset.num_train(client), 1)
        return self._handles[rank].train_trip.remote(tid, client, weights_ref)

    def step(self):
        if self.null_client:  # nothing is trained: the in-process loop as it is
            return super().step()
        if not self._handles:
            self._start()
        ray, refs = self._ray, {}
        self._load = [0] * self.actors
        for tid, client, v0 in self._predict():
            if v0 not in refs:  # each version's weights into the object store once
                refs[v0] = ray.put(self._start_weights(v0))
            self._ahead[tid] = self._send(tid, client, refs[v0])
        self.trips_sent_ahead += len(self._ahead)
        try:
            return super().step()
        finally:
            self._ahead.clear()  # replies not used (a stall): dropped

    def _train(self, trip_id: int, client: int, start: torch.Tensor):
        """The trip's result from its actor (sent ahead, or now), its delta into ``self.delta``."""
        ref = self._ahead.pop(trip_id, None)
        if ref is None:
            self.trips_trained_late += 1
            ref = self._send(trip_id, client, self._ray.put(start))
        try:
            reply = self._ray.get(ref)
        except self._ray.exceptions.RayActorError as e:
            raise RuntimeError(
                f"runtime: ray: an actor died during server step {self.round + 1} and was not back after "
                f"{self.max_restarts} restarts: {str(e).splitlines()[0]}"
            ) from None
        if isinstance(reply[0], str):
            _, c, error, detail = reply
            if self.on_client_error == "skip":  # left out like a dropout: nothing reaches the model
                print(f"flotilla: ray: client {c} failed on trip {trip_id}, left out: {error}", file=sys.stderr)
                return ClientResult(c, 0, 0, 0, 0.0)
            raise ClientTrainingError(c, self.round + 1, error, detail)
        r, delta = reply
        self.delta.copy_(delta)
        return r
