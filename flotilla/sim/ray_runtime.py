"""Synchronous FedAvg rounds trained by Ray actors (``runtime: {name: ray}``; see docs/ray.md).

Each actor holds one model trained in place (a :class:`~flotilla.core.flat.FlatModel` and a
:class:`~flotilla.core.client.LocalTrainer`, as in-process) and its own copy of the task: it builds
the data from the task config with the task registry (``build_task(task_config, seed)``), so the
data never travels from the driver.  A task given as objects (``flotilla.train(model, data)``) is
put into Ray's object store once, when the actors start.

One round: the cohort (drawn exactly as :class:`~flotilla.sim.sync.SyncFedAvg` draws it) is split
over the actors greedily by examples (:func:`~flotilla.sim.parallel.split_cohort`); the global
weights go to the object store once; each actor trains its share in cohort order and returns
``sum_i w_i * delta_i`` with ``sum_i w_i`` and its loss sums; the driver adds the partial sums in
actor order and takes the one server step.

* Deterministic for a fixed actor count.  One actor adds deltas in SyncFedAvg's order (equal to
  in-process bit for bit when both train with the same torch thread count); more actors regroup
  the sum, so results differ by float rounding only.
* Faults: a dead actor (killed, its node lost) is restarted by Ray up to ``max_restarts`` times and
  its share of the round is retried on it (``max_task_retries``); training depends only on (weights, seed, round, client),
  so the round's result is the fault-free one.  A client whose training raises fails the round
  with the client id and the error; the round is abandoned (weights and optimizer unchanged).  With
  ``on_client_error="skip"`` the client is left out of its round instead, like a dropout.
* Differential privacy composes through the same Components as in-process (``PrivacyParts``): the
  driver builds what they give, and the actors do the per-client work.  DP-SGD: each actor builds
  its own :class:`~flotilla.privacy.sample.DPLocalTrainer` from the driver trainer's plain
  ``SampleLevelSpec`` and sends back each client's result (its epsilon), which the driver puts into
  its trainer's ``results`` as in-process training would.  User-level DP-FedAvg: each actor clips
  every client's delta to the driver's current S with a DPFedAvg of its own (``add``: the same
  validation and clipping) and returns the partial sum; the driver ``merge``s the partial sums into
  its DPFedAvg, which adds the noise and divides by the expected cohort (``result``), so noise,
  adaptive clipping and accounting are the in-process ones.  A sampler (Poisson) runs on the driver.
* Secure aggregation (SecAgg / SecAgg+, with or without user-level DP): the driver keeps the
  protocol's state (keys, graph, shares, dropouts, unmasking: its SecureAggregator) and gives each
  actor only the mask seeds of the clients it trains; the actor encodes, masks and sums them mod
  2^bits, and the driver unmasks the sum of the partial sums (:mod:`flotilla.sim.ray_secure`).
  Ring sums are exact: the same bits as in-process for any number of actors.
* FedProx: the actors build the same ``FedProxTrainer`` (its ``mu``).  GPUs: ``gpus_per_actor > 0``
  (a fraction shares one) trains on the actor's GPU (its model and flat buffers there).
* Refused when built, never silently skipped: any other client update (SCAFFOLD) or aggregator,
  and a buffer.

Ray is an optional extra; this module imports it only when an algorithm is built.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import traceback

import torch
from torch import nn

from flotilla.core.aggregate import RoundAborted, check_update
from flotilla.core.client import ClientSpec, LocalTrainer, LossFn, client_seed
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.sim.parallel import split_cohort
from flotilla.sim.ray_config import RAY_EXTRA
from flotilla.sim.ray_start import init_ray
from flotilla.sim.sync import SyncFedAvg

NOT_ON_RAY = (
    "each Ray actor builds its client update itself (plain local SGD, DP-SGD or FedProx) and sums plain, "
    "clipped or masked deltas; other client updates (SCAFFOLD: per-client state on the driver) and "
    "aggregators are not supported on runtime: ray; use runtime: {name: in-process}"
)


class ClientTrainingError(RuntimeError):
    """A client's local training raised on an actor; names the client, the round and the error."""

    def __init__(self, client: int, round_: int, error: str, detail: str = ""):
        super().__init__(f"client {client} failed in round {round_}: {error}")
        self.client, self.round, self.error, self.detail = client, round_, error, detail


def import_ray():
    """``ray``, or one ImportError line naming the extra."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"runtime: {{name: ray}} needs Ray, which is not installed here: {RAY_EXTRA}") from None
    return ray


def check_actor_args(actors, cpus_per_actor, gpus_per_actor, max_restarts, on_client_error) -> None:
    """The runtime keys, checked when an algorithm is built from Python (the config checks them too)."""
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise ValueError(f"runtime.actors: must be an integer >= 1, got {actors!r}")
    if not cpus_per_actor > 0:
        raise ValueError(f"runtime.cpus_per_actor: must be > 0, got {cpus_per_actor!r}")
    if not (isinstance(gpus_per_actor, (int, float)) and math.isfinite(gpus_per_actor) and gpus_per_actor >= 0):
        raise ValueError(f"runtime.gpus_per_actor: must be a number >= 0, got {gpus_per_actor!r}")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"runtime.max_restarts: must be an integer >= 0, got {max_restarts!r}")
    if on_client_error not in ("stop", "skip"):
        raise ValueError(f"runtime.on_client_error: must be 'stop' or 'skip', got {on_client_error!r}")


def client_update_spec(trainer) -> tuple | None:
    """What an actor needs to build the driver's client update itself: None (``LocalTrainer``),
    ``("dp", SampleLevelSpec)`` (DP-SGD) or ``("fedprox", mu)``; anything else cannot run on the actors
    (raises ValueError naming it).  Exact types: a subclass may train differently."""
    from flotilla.algorithms.fedprox import FedProxTrainer

    if type(trainer) is LocalTrainer:
        return None
    if type(trainer) is FedProxTrainer:
        return ("fedprox", trainer.mu)
    from flotilla.privacy.sample import DPLocalTrainer

    if type(trainer) is DPLocalTrainer:
        return ("dp", trainer.dp)
    raise ValueError(f"runtime: ray: the client update {type(trainer).__name__} cannot run on Ray actors: {NOT_ON_RAY}")


def build_client_update(model: nn.Module, loss_fn: LossFn, client: ClientSpec, update, device):
    """``(flat, trainer)`` on an actor from :func:`client_update_spec`'s description."""
    kind = update[0] if update is not None else None
    if kind == "dp":
        from flotilla.privacy.sample import DPLocalTrainer, make_dp_compatible

        make_dp_compatible(model)  # recurrent layers -> Opacus' DP layers, before the FlatModel binds them
    flat = FlatModel(model) if device is None else FlatModel(model, device)
    if kind == "dp":
        return flat, DPLocalTrainer(flat, loss_fn, client, update[1])
    if kind == "fedprox":
        from flotilla.algorithms.fedprox import FedProxTrainer

        return flat, FedProxTrainer(flat, loss_fn, client, update[1])
    return flat, LocalTrainer(flat, loss_fn, client)


class ClientActor:
    """One Ray actor: a model trained in place and the task's data, built here once.

    ``kind`` is ``"config"`` (``what`` is the task config, built with the task registry on this actor)
    or ``"objects"`` (``what`` is ``[ref]`` to ``(model, dataset, loss_fn)`` in the object store, resolved
    here after the driver's ``sys.path`` is set, so the task's own modules unpickle).  ``update``
    describes the client update (:func:`client_update_spec`); ``gpu``: train on this node's GPU."""

    def __init__(
        self,
        kind: str,
        what,
        client: ClientSpec,
        weighting: str,
        seed: int,
        threads: int,
        paths: list[str],
        update=None,  # client_update_spec(): plain, DP-SGD or FedProx
        clip: bool = False,  # user-level DP: clip each delta to the S given each round
        gpu: bool = False,
    ):
        for p in reversed(paths):  # the driver's cwd and sys.path: a task.factory module next to the config
            if p not in sys.path:
                sys.path.insert(0, p)
        torch.set_num_threads(threads)
        device = None
        if gpu:  # Ray gave this actor a (fraction of a) GPU: CUDA_VISIBLE_DEVICES names it
            from flotilla.core.device import resolve_device

            device = resolve_device("cuda")
        if kind == "config":
            from flotilla.tasks import build_task

            task = build_task(what, seed)
            model, dataset, loss_fn = task.model, task.dataset, task.loss_fn
        else:  # [ref]: Ray resolves a bare ref before __init__ runs, i.e. before the paths above are set
            import ray

            model, dataset, loss_fn = ray.get(what[0])
        self.dataset, self.weighting, self.seed = dataset, weighting, seed
        self.flat, self.trainer = build_client_update(model, loss_fn, client, update, device)
        self.results = getattr(self.trainer, "results", None)  # DP-SGD: one DPClientResult (epsilon) per client
        self.device = str(self.flat.flat.device)
        self.delta = torch.empty(self.flat.numel)
        self.sum = torch.zeros(self.flat.numel)
        self.clipper = None
        if clip:  # DPFedAvg's own validation and clipping; its noise is never used here (the driver adds it)
            from flotilla.privacy.user import DPFedAvg

            self.clipper = DPFedAvg(self.flat.numel, clip_norm=1.0, noise_multiplier=0.0, expected_cohort=1.0)
        self.masking = None  # secure aggregation: an ActorMasking for the round's encoding parameters

    def info(self) -> dict:
        import ray

        return {
            "numel": self.flat.numel,
            "num_clients": self.dataset.num_clients,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": self.device,
        }

    def _masking(self, spec):
        from flotilla.sim.ray_secure import ActorMasking

        if self.masking is None or self.masking.spec != spec:
            self.masking = ActorMasking(spec, self.flat.numel)
        self.masking.reset()
        return self.masking

    def train(
        self,
        round_: int,
        clients: list[int],
        weights: torch.Tensor,
        skip_failed: bool = False,
        clip_norm: float | None = None,
        masks: dict | None = None,
        masking=None,
    ):
        """Train ``clients`` in order from ``weights``: ``(sum_i w_i delta_i, sum_i w_i, loss_sum, seen, count,
        failed, extra)``, or ``("error", client, error, traceback)`` for the first client whose training raised
        (with ``skip_failed``, such clients are left out and listed in ``failed`` as ``(client, error)``).
        With user-level DP the sum is of deltas clipped to ``clip_norm`` (weight 1); ``extra`` holds the
        clipper's ``unclipped`` count and the DP-SGD trainer's per-client results.  With secure aggregation
        (``masking``, a MaskingSpec, and ``masks[c] = (slot, seeds)`` for the clients that send an input) the
        sum is of their masked ring inputs, mod 2^bits, and ``extra["secure"]`` says which slots it holds."""
        secure = self._masking(masking) if masking is not None else None
        if self.clipper is not None:
            self.clipper.clip_norm = clip_norm
            self.clipper.reset()
            out = self.clipper.sum
        elif secure is not None:
            out = secure.sum
        else:
            out = self.sum.zero_()
        results = self.results
        if results is not None:
            results.clear()
        total_weight = loss_sum = seen = 0.0
        count = 0
        failed = []
        for c in clients:
            try:
                r = self.trainer.train(self.dataset, c, weights, client_seed(self.seed, round_, c), self.delta)
                weight = float(r.num_examples) if self.weighting == "examples" else 1.0
                if r.num_examples > 0:
                    if self.clipper is not None:
                        self.clipper.add(self.delta, weight, c)  # as the driver's DPFedAvg.add in-process
                    else:
                        check_update(self.delta, self.flat.numel, f"update from client {c}")
                        if secure is not None and c in masks:  # as SecureAggregator.add for its slot
                            secure.add(self.delta, weight, *masks[c])
            except Exception as e:
                if skip_failed:
                    failed.append((c, f"{type(e).__name__}: {e}"))
                    continue
                return ("error", c, f"{type(e).__name__}: {e}", traceback.format_exc())
            if r.num_examples > 0:
                if self.clipper is None and secure is None:
                    out.add_(self.delta, alpha=weight)
                total_weight += weight
                count += 1
            loss_sum += r.loss * r.examples_seen
            seen += r.examples_seen
        extra = {
            "unclipped": self.clipper.unclipped if self.clipper is not None else 0,
            "results": list(results) if results is not None else [],
        }
        if secure is not None:
            extra["secure"] = secure.reply()
        return (out, total_weight, loss_sum, seen, count, failed, extra)

    def train_trip(self, trip_id: int, client: int, weights: torch.Tensor):
        """One fleet trip (the async fleet on Ray): ``(ClientResult, delta)`` of ``client`` trained from
        ``weights`` with the trip's seed, as AsyncFleetSim trains it in-process; or
        ``("error", client, error, traceback)`` when its training raised."""
        try:
            r = self.trainer.train(self.dataset, client, weights, client_seed(self.seed, trip_id, client), self.delta)
        except Exception as e:
            return ("error", client, f"{type(e).__name__}: {e}", traceback.format_exc())
        if self.results is not None:
            self.results.clear()  # the DPClientResult is r itself
        return (r, self.delta)


class RayActors:
    """Starting and ending the actors; shared by :class:`RayFedAvg` and the async fleet on Ray
    (:mod:`flotilla.sim.ray_fleet`).  The class using it sets ``_ray``, ``actors``, ``address``,
    ``cpus_per_actor``, ``gpus_per_actor``, ``max_restarts``, ``_task_config``, ``_model``, ``_loss_fn``,
    ``_client_spec``, ``_update`` (:func:`client_update_spec`), ``_dp_aggregator``, ``_handles``, ``_source``,
    ``actor_nodes`` and ``_started_ray``."""

    def _start(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            cpus = math.ceil(self.actors * self.cpus_per_actor - 1e-9)
            init_ray(ray, self.address, cpus, "runtime.address")  # private local Ray, or the cluster
            self._started_ray = True
        resources = ray.cluster_resources()
        need, have = self.actors * self.cpus_per_actor, resources.get("CPU", 0.0)
        if need > have + 1e-9:  # Ray would keep the actors pending and the round would wait forever
            self.close()
            raise ValueError(
                f"runtime.actors: {self.actors} actors x {self.cpus_per_actor:g} CPUs (runtime.cpus_per_actor) "
                f"need {need:g} CPUs, the Ray cluster has {have:g}; add nodes or ask for fewer"
            )
        gpus = self.gpus_per_actor
        need, have = self.actors * gpus, resources.get("GPU", 0.0)
        if gpus and need > have + 1e-9:  # the same: pending for ever
            self.close()
            raise ValueError(
                f"runtime.gpus_per_actor: {self.actors} actors x {gpus:g} GPUs need {need:g} GPUs, the Ray "
                f"cluster has {have:g}" + ("" if have else " (no node has a GPU); use gpus_per_actor: 0")
            )
        if self._task_config is not None:
            kind, what = "config", self._task_config
        else:  # the task came as objects: into the object store once, not every round (kept for restarts)
            # in a list, so the actor resolves it after putting the driver's sys.path on its own
            kind, what = "objects", [ray.put((self._model, self.dataset, self._loss_fn))]
        self._source = what
        paths = [os.getcwd()] + [p for p in sys.path if p]
        remote = ray.remote(ClientActor).options(
            num_cpus=self.cpus_per_actor,
            num_gpus=gpus,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
        )
        threads = max(1, int(self.cpus_per_actor))
        self._handles = [
            remote.remote(
                kind,
                what,
                self._client_spec,
                self.weighting,
                self.seed,
                threads,
                paths,
                self._update,
                self._dp_aggregator is not None,
                gpus > 0,
            )
            for _ in range(self.actors)
        ]
        try:
            infos = ray.get([h.info.remote() for h in self._handles])
        except ray.exceptions.RayActorError as e:  # the task could not be built there (data missing, ...)
            self.close()
            cause = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise RuntimeError(
                f"runtime: ray: an actor could not build the task: {cause[-1] if cause else e}"
            ) from None
        for rank, info in enumerate(infos):
            if info["numel"] != self.flat.numel or info["num_clients"] != self.dataset.num_clients:
                self.close()
                raise ValueError(
                    f"runtime: ray: actor {rank} built a task with {info['numel']} weights and "
                    f"{info['num_clients']} clients, the driver has {self.flat.numel} and "
                    f"{self.dataset.num_clients}; the task config must build the same task everywhere"
                )
        self.actor_nodes = [info["node"] for info in infos]
        devices = sorted({info["device"] for info in infos})
        print(
            f"flotilla: ray: {self.actors} actor(s) on {len(set(self.actor_nodes))} node(s) "
            f"(address: {self.address or 'a private local Ray'}; training on {', '.join(devices)})",
            file=sys.stderr,
        )

    def close(self) -> None:
        """End the actors (and the local Ray this run started); the next ``step`` starts them again."""
        if self._handles:
            for h in self._handles:
                try:
                    self._ray.kill(h, no_restart=True)
                except Exception:  # already gone
                    pass
            self._handles = []
        self._source = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False


class RayFedAvg(RayActors, SyncFedAvg):
    """:class:`SyncFedAvg` whose rounds are trained by ``actors`` Ray actors."""

    @classmethod
    def shape(cls, *, actors: int = 2, **kwargs) -> Shape:
        base = SyncFedAvg.shape(**kwargs)
        # composable: DP's components are built on the driver and carried out by the actors (module
        # docstring); the constructor refuses, naming it, any component the actors could not carry out.
        return dataclasses.replace(base, name=f"RayFedAvg(actors={actors})")

    def __init__(
        self,
        model: nn.Module,
        dataset: FederatedDataset,
        loss_fn: LossFn,
        *,
        cohort: int,
        actors: int = 2,
        address: str | None = None,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        max_restarts: int = 3,
        on_client_error: str = "stop",
        task_config=None,
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        weighting: str = "examples",
        seed: int = 0,
        components: Components | None = None,
    ):
        check_actor_args(actors, cpus_per_actor, gpus_per_actor, max_restarts, on_client_error)
        self._ray = import_ray()  # before anything is built: one line naming the extra
        components = components or Components()
        if components.buffer is not None:
            raise ValueError(
                f"runtime: ray: a buffer component (FedBuff) is not used by synchronous rounds; {NOT_ON_RAY}"
            )
        if components.client_update is not None and task_config is None:
            # the actors get the model as objects: a copy from before the DP-SGD trainer hooks into it
            model_for_actors = copy.deepcopy(model)
        else:
            model_for_actors = model
        super().__init__(
            model,
            dataset,
            loss_fn,
            cohort=cohort,
            client=client,
            server=server,
            weighting=weighting,
            seed=seed,
            components=components,
        )
        self._update, self._dp_aggregator, self._secure = self._parts(components)
        self._dp_trainer = self.trainer if self._update is not None and self._update[0] == "dp" else None
        self.actors, self.address, self.cpus_per_actor = actors, address, float(cpus_per_actor)
        self.gpus_per_actor = float(gpus_per_actor)
        self.max_restarts, self.on_client_error = max_restarts, on_client_error
        self._client_spec, self._loss_fn, self._model = client, loss_fn, model_for_actors
        self._task_config = task_config
        self._total = torch.zeros(self.flat.numel)
        self._masks = self._masking = None  # secure aggregation: the round's {client: (slot, seeds)}, MaskingSpec
        self._handles: list = []
        self._source = None
        self.actor_nodes: list[str] = []  # the Ray node of each actor, once started
        self._started_ray = False

    def _parts(self, components: Components):
        """``(update, dp_aggregator, secure_aggregator)``: how the actors build the client update the
        components gave (:func:`client_update_spec`: plain, DP-SGD, FedProx), and the DP-FedAvg or
        SecureAggregator they built here (None: not given).  Exact types: anything else (SCAFFOLD's
        trainer, another aggregator, a subclass that trains or aggregates differently) would not run
        on the actors, so it is refused."""
        update = dp_aggregator = secure = None
        refused = None
        try:
            update = client_update_spec(self.trainer)
        except ValueError as e:
            refused = e
        if components.aggregator is not None:
            from flotilla.privacy.user import DPFedAvg
            from flotilla.secure.aggregator import SecureAggregator

            if type(self.aggregator) is DPFedAvg:
                dp_aggregator = self.aggregator
            elif type(self.aggregator) is SecureAggregator:
                secure = self.aggregator
            elif refused is None:
                refused = ValueError(
                    f"runtime: ray: the aggregator {type(self.aggregator).__name__} cannot run on Ray actors: {NOT_ON_RAY}"
                )
        if refused is not None:
            if hasattr(self.trainer, "close"):
                self.trainer.close()  # e.g. Opacus' hooks off the user's model
            raise refused
        return update, dp_aggregator, secure

    # -- the round -----------------------------------------------------------------------------
    def _submit(self, rank: int, weights_ref, share: list[int]):
        clip = self._dp_aggregator.clip_norm if self._dp_aggregator is not None else None  # this round's S
        masks, masking = self._masks, self._masking  # secure aggregation: this round's
        if masks is not None:  # only the seeds of this actor's clients
            masks = {c: masks[c] for c in share if c in masks}
        skip = self.on_client_error == "skip"
        return self._handles[rank].train.remote(self.round, share, weights_ref, skip, clip, masks, masking)

    def _gather(self, refs: list) -> list:
        """Each actor's reply.  A call whose actor died is retried by Ray once it has restarted the
        actor (``max_task_retries``); past ``max_restarts`` the round fails, naming the actor."""
        ray = self._ray
        replies = []
        for rank, ref in enumerate(refs):
            try:
                replies.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(
                    f"runtime: ray: actor {rank} died during round {self.round + 1} and was not "
                    f"back after {self.max_restarts} restarts: {str(e).splitlines()[0]}"
                ) from None
        return replies

    def step(self) -> dict[str, float]:
        if not self._handles:
            self._start()
        clients = [int(c) for c in self.sample_cohort(self.seed, self.round, self.dataset.num_clients, self.cohort)]
        masks = aborted = None
        to_train = clients
        if self._secure is not None:  # the protocol's state stays here; each client's masking goes to its actor
            from flotilla.sim.ray_secure import MaskingSpec, admit_cohort

            masks, to_train, aborted = admit_cohort(self._secure, clients, self._secure_weight)
            self._masks, self._masking = masks, MaskingSpec.of(self._secure)
        shares = split_cohort(to_train, [self.dataset.num_train(c) for c in to_train], self.actors)
        weights_ref = self._ray.put(self.weights)
        try:
            refs = [self._submit(rank, weights_ref, share) for rank, share in enumerate(shares)]
            replies = self._gather(refs)
        finally:
            self._masks = self._masking = None  # the seeds of a round are used once
        for reply in replies:  # the round is abandoned: weights, optimizer state and round unchanged
            if isinstance(reply[0], str):
                _, c, error, detail = reply
                raise ClientTrainingError(c, self.round + 1, error, detail)
        if self._secure is not None:
            aborted = self._secure_step(replies, masks, aborted)
        elif self._dp_aggregator is not None:  # partial sums of clipped deltas; noise and 1/m here, as in-process
            dp = self._dp_aggregator
            dp.reset()
            for reply in replies:
                dp.merge(reply[0], reply[4], reply[6]["unclipped"])
            self.server_opt.step(self.weights, dp.result())  # releases (pure noise) even for an empty cohort
        else:
            total = self._total.zero_()
            for reply in replies:
                total.add_(reply[0])
            total_weight = sum(r[1] for r in replies)
            if sum(r[4] for r in replies):
                self.server_opt.step(self.weights, total.div_(total_weight))
        if self._dp_trainer is not None:  # each client's epsilon, read by PrivateAlgorithm as in-process
            self._dp_trainer.results.extend(res for reply in replies for res in reply[6]["results"])
        self.round += 1
        seen = sum(r[3] for r in replies)
        record = {
            "round": self.round,
            "train_loss": sum(r[2] for r in replies) / max(seen, 1),
            "examples_seen": seen,
            "clients": len(clients),
        }
        record.update(self.aggregator.round_metrics())
        if aborted is not None:
            record.update(aborted=True, abort_reason=str(aborted))
        failed = [f for r in replies for f in r[5]]
        if self.on_client_error == "skip":
            record["failed_clients"] = len(failed)
            for c, error in failed:
                print(f"flotilla: ray: client {c} failed in round {self.round}, left out: {error}", file=sys.stderr)
        return record

    # -- secure aggregation (flotilla.sim.ray_secure) ------------------------------------------------
    def _secure_weight(self, c: int) -> float | None:
        """A client's weight as SyncFedAvg's ``add`` would give it; None: no training examples, no ``add``."""
        n = self.dataset.num_train(c)
        if n == 0:
            return None
        return float(n) if self.weighting == "examples" else 1.0

    def _secure_step(self, replies: list, masks: dict, aborted):
        """The actors' partial masked sums into the driver's protocol, unmasked there (``result``) and
        the server step, as SyncFedAvg does with the SecureAggregator; returns the round's abort, if any."""
        from flotilla.sim.ray_secure import receive

        agg = self._secure
        if aborted is not None:  # aborted while admitting (in-process: at that client's add)
            return aborted
        try:
            for reply in replies:
                failed = [masks[c][0] for c, _ in reply[5] if c in masks]  # skipped: dropouts before sending
                receive(agg, reply[0], reply[6]["secure"], failed)
            if agg.count or agg.release_when_empty:
                self.server_opt.step(self.weights, agg.result())
        except RoundAborted as e:
            return e  # no server step: weights and optimizer state untouched
        return None
