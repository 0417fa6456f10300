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
examples counts), and sends those trips to the actors (within the window below), each with the
weights of the version it downloaded (one object-store copy per version).  Then the unchanged in-process loop
runs, and its ``_train`` takes each trip's result from its actor in event order, so the buffer
receives the same deltas in the same order: the same bits as in-process when actors and driver
train with the same torch thread count.  A wrong prediction (an update rejected as non-finite)
only costs time: a trip that was not sent ahead is trained on an actor when the loop reaches it.

The look-ahead goes on past the step's end: trips of the next step(s) that downloaded a version
already known (most of them, as they started before this step ended) are sent too, so the actors
keep training while the driver takes the server step.  At most ``window = 4 x actors`` replies
are outstanding (each one delta in Ray's object store, however large the buffer); the other
predicted trips wait on the driver and are sent as replies are taken.  A trip's id fixes its
client, and a trip sent ahead started at a version no later than the current one, so its reply
stays valid until it is taken; replies are forgotten when their trip is no longer in flight and
when a checkpoint is loaded.  FedAsync (a buffer of one) thus also trains several trips at once.

Faults are handled as for synchronous rounds: a killed actor is restarted by Ray and its trips are
retried (``max_task_retries``); a trip's training depends only on (weights, seed, trip, client).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import deque

import torch

from flotilla.core.client import ClientResult, ClientSpec
from flotilla.core.protocols import Components, Shape
from flotilla.fleet.clock import AsyncScheduler, FleetStalled
from flotilla.sim.fleet import AsyncFleetSim, _stall_limit
from flotilla.sim.ray_runtime import (
    ClientTrainingError,
    RayActors,
    check_actor_args,
    client_update_spec,
    import_ray,
)

NOT_ON_RAY_ASYNC = (
    "the async fleet on runtime: ray trains each trip on an actor and hands its delta to the driver's "
    "buffer (FedBuff, DP-FedBuff or the secure buffer); an aggregator or a cohort sampler is not used there"
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
        components = components or Components()
        if components.aggregator is not None or components.sampler is not None:
            given = "an aggregator" if components.aggregator is not None else "a sampler"
            raise ValueError(f"runtime: ray: {given} given: {NOT_ON_RAY_ASYNC}")
        if components.client_update is not None and task_config is None:
            model_for_actors = copy.deepcopy(model)  # from before a DP-SGD trainer hooks into the model
        else:
            model_for_actors = model
        # the driver only keeps the weights (on the CPU); the actors train, on their GPU with gpus_per_actor > 0
        kwargs.pop("device", None)
        super().__init__(model, dataset, loss_fn, components=components, **kwargs)
        try:  # the actors build the client update themselves (plain, DP-SGD, FedProx); SCAFFOLD is refused
            self._update = client_update_spec(self.trainer)
        except ValueError:
            if hasattr(self.trainer, "close"):
                self.trainer.close()  # Opacus' hooks off the user's model
            raise
        # DP-SGD: each trip's DPClientResult (its epsilon) goes into the driver trainer's results, as in-process
        self._dp_trainer = self.trainer if self._update is not None and self._update[0] == "dp" else None
        self.actors, self.address, self.cpus_per_actor = actors, address, float(cpus_per_actor)
        self.gpus_per_actor = float(gpus_per_actor)
        self.max_restarts, self.on_client_error = max_restarts, on_client_error
        self._client_spec, self._loss_fn, self._model = kwargs.get("client", ClientSpec()), loss_fn, model_for_actors
        self._task_config = task_config
        self._dp_aggregator = None  # DP-FedBuff's clipping and noise, the secure buffer: in the driver's buffer
        self._handles: list = []
        self._source = None
        self.actor_nodes: list[str] = []
        self._started_ray = False
        self._ahead: dict[int, tuple] = {}  # trip id -> (the actor's reply, an ObjectRef; actor; examples)
        self._load = [0] * actors  # examples outstanding on each actor
        self._queue: deque = deque()  # (trip id, client, weights) predicted, to send as replies are taken
        # replies outstanding at most (each one delta in Ray's object store): enough to keep every
        # actor busy, bounded however large the buffer
        self.window = 4 * actors
        self.trips_sent_ahead = self.trips_trained_late = 0  # how well the look-ahead predicted

    # -- the look-ahead ------------------------------------------------------------------------
    def _predict(self) -> list[tuple[int, int, int]]:
        """The trips ``(trip_id, client, version)`` to send now, in event order: those this step's loop
        will train, then those of the next step(s) whose version is already known (so the actors keep
        working while the driver steps; at most ``window`` of those).  Found by running the events on
        a copy of the scheduler (the real one is not touched)."""
        sched, server = self.sched, self.server
        rate = None if sched.poisson is None else sched.poisson.rate
        ahead = AsyncScheduler(self.fleet, sched.concurrency, arrival_rate=rate)
        ahead.load_state_arrays(sched.state_arrays())
        need = self.buffer_size - (server.buffer.count if self.algorithm == "fedbuff" else 0)
        version = known = server.version
        max_s, num_train, sent, snapshots = self.max_staleness, self.dataset.num_train, self._ahead, self.snapshots
        trips: list[tuple[int, int, int]] = []
        steps_ahead = max(1, self.window // self.buffer_size)  # FedAsync: several one-update steps
        beyond = 0  # trips of the next steps found
        try:
            for _ in range(_stall_limit(sched.concurrency)):  # the real loop stalls past this
                _, _, tid, _, client, v0, _, dropped = ahead.pop()
                if not dropped and (max_s is None or version - v0 <= max_s):
                    if beyond >= self.window:  # enough of the next steps' trips
                        break
                    # weights of a later version are not known yet; a trip sent at an earlier step is kept
                    if tid not in sent and (v0 == known or (v0 < known and v0 in snapshots)):
                        trips.append((tid, client, v0))
                        beyond += version > known
                    if num_train(client) > 0:
                        need -= 1
                        if need <= 0:
                            if version - known >= steps_ahead:  # far enough
                                break
                            version += 1  # as the real step will (unless an update is rejected)
                            ahead.version = version
                            need = self.buffer_size
                ahead.fill()
        except FleetStalled:  # the real loop will say so
            pass
        return trips

    def _send(self, tid: int, client: int, weights_ref):
        """One trip to the actor with the fewest examples outstanding; Ray runs each actor's calls in order."""
        rank = min(range(self.actors), key=lambda k: (self._load[k], k))
        size = max(self.dataset.num_train(client), 1)
        self._load[rank] += size
        return self._handles[rank].train_trip.remote(tid, client, weights_ref), rank, size

    def step(self):
        if self.null_client:  # nothing is trained: the in-process loop as it is
            return super().step()
        if not self._handles:
            self._start()
        ray, refs = self._ray, {}
        for tid, client, v0 in self._predict():
            if v0 not in refs:  # each version's weights into the object store once per step
                refs[v0] = ray.put(self._start_weights(v0))
            self._queue.append((tid, client, refs[v0]))
        self._top_up()
        try:
            out = super().step()
        except BaseException:
            self._forget()
            raise
        self._queue.clear()  # predicted but not sent: the next step predicts again
        # a reply whose trip is no longer in flight will not be asked for (a prediction was wrong)
        in_flight = {e[2] for e in self.sched.heap}
        for tid in [t for t in self._ahead if t not in in_flight]:
            self._forget(tid)
        return out

    def _top_up(self) -> None:
        """Send predicted trips, in event order, while fewer than ``window`` replies are outstanding."""
        while self._queue and len(self._ahead) < self.window:
            tid, client, weights_ref = self._queue.popleft()
            self._ahead[tid] = self._send(tid, client, weights_ref)
            self.trips_sent_ahead += 1

    def _forget(self, tid: int | None = None) -> None:
        if tid is None:
            self._queue.clear()
        for t in list(self._ahead) if tid is None else [tid]:
            _, rank, size = self._ahead.pop(t)
            self._load[rank] -= size

    def close(self) -> None:
        self._forget()  # replies of these actors: the next step starts new ones
        super().close()

    def load_state_dict(self, state) -> None:
        self._forget()  # replies computed for another state
        super().load_state_dict(state)

    def _train(self, trip_id: int, client: int, start: torch.Tensor):
        """The trip's result from its actor (sent ahead, or now), its delta into ``self.delta``."""
        sent = self._ahead.pop(trip_id, None)
        if sent is None:  # still waiting for room in the window (sent now, once), or not predicted
            queued = next((q for q in self._queue if q[0] == trip_id), None)
            if queued is not None:
                self._queue.remove(queued)
                weights_ref = queued[2]
            else:
                self.trips_trained_late += 1
                weights_ref = self._ray.put(start)
            sent = self._send(trip_id, client, weights_ref)
        ref, rank, size = sent
        self._load[rank] -= size
        self._top_up()  # the next trip to the actors before waiting for this one
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
        if self._dp_trainer is not None and r.num_examples > 0:
            self._dp_trainer.results.append(r)  # as DPLocalTrainer.train appends it in-process
        return r
