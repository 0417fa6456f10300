"""Synchronous federated rounds in one process: the default runtime.

One round: sample a cohort uniformly without replacement, train each client in turn on the
one shared model (in place), add its delta into the aggregator, then take one server step.
An aggregator may abort a round by raising :class:`~flotilla.core.aggregate.RoundAborted`
(secure aggregation's ``SecAggAborted`` when too few clients survive): that round makes no server
step, the model and server-optimizer state stay as they were, and its metrics record carries
``aborted: True`` and the reason.
All randomness is derived from (seed, round, client), so any round can be replayed and a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flotilla.core.aggregate import RoundAborted, WeightedMean
from flotilla.core.client import ClientSpec, LocalTrainer, LossFn, client_seed
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import resolve_device
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape, refuse_unused
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec


def sample_cohort(seed: int, round_: int, population: int, cohort: int) -> np.ndarray:
    """``cohort`` distinct clients out of ``population``, uniformly, reproducible per round."""
    rng = np.random.default_rng([seed, round_, 0x5EED])
    return rng.choice(population, size=cohort, replace=False)


class SyncFedAvg:
    """The FedAvg family: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad (by server optimizer)."""

    def __init__(
        self,
        model: nn.Module,
        dataset: FederatedDataset,
        loss_fn: LossFn,
        *,
        cohort: int,
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        weighting: str = "examples",
        seed: int = 0,
        aggregator=None,
        components: Components | None = None,
        device: str | torch.device = "cpu",
        vectorize: int = 1,
    ):
        if not 1 <= cohort <= dataset.num_clients:
            raise ValueError(f"cohort: must be between 1 and the population size {dataset.num_clients}, got {cohort}")
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting: must be 'examples' or 'uniform', got {weighting!r}")
        self.dataset = dataset
        # Clients train on the device; the global model and the server side stay on the CPU.
        self.device = resolve_device(device)
        self.flat = FlatModel(model, self.device)
        self.weights = self.flat.flat.to("cpu", copy=True)  # the global model
        self.delta = torch.empty(self.flat.numel)  # reused by every client
        self.server_opt = ServerOptimizer(server, self.flat.numel)
        parts = refuse_unused(components, "SyncFedAvg", ("client_update", "aggregator", "sampler"))
        if aggregator is not None and parts.aggregator is not None:
            raise ValueError("SyncFedAvg: give an aggregator or an aggregator component, not both")
        if aggregator is None:
            aggregator = parts.aggregator(self.flat.numel) if parts.aggregator else WeightedMean(self.flat.numel)
        self.aggregator = aggregator
        make_update = parts.client_update or LocalTrainer
        self.trainer = make_update(self.flat, loss_fn, client)
        self.vectorized = self._vectorized(vectorize, parts, loss_fn, client)
        self.cohort = cohort
        self.weighting = weighting
        self.seed = seed
        self.round = 0
        # How a round's cohort is drawn (user-level DP may give Poisson sampling as a component).
        self.sample_cohort = parts.sampler or sample_cohort

    def _vectorized(self, k: int, parts: Components, loss_fn: LossFn, client: ClientSpec):
        """``client.vectorize: k``: a trainer of k clients at once, or None (k = 1)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"client.vectorize: must be an integer >= 1 (1: one client after another), got {k!r}")
        if k == 1:
            return None
        if parts.client_update is not None:
            raise ValueError(
                "client.vectorize: stacks plain local SGD; a custom client update (DP-SGD, FedProx, SCAFFOLD) "
                "trains one client at a time; set client.vectorize: 1"
            )
        from flotilla.core.vectorized import VectorizedTrainer

        trainer = VectorizedTrainer(self.flat, loss_fn, client, k)
        self._deltas = torch.empty(k, self.flat.numel, device=self.device)
        return trainer

    def _train_cohort(self, clients: list[int]):
        """Each client's (client, result, delta) in cohort order; the delta is valid until the next one is yielded."""
        if self.vectorized is None:
            for c in clients:
                seed = client_seed(self.seed, self.round, c)
                yield c, self.trainer.train(self.dataset, c, self.weights, seed, self.delta), self.delta
            return
        k = self.vectorized.k
        for lo in range(0, len(clients), k):
            group = clients[lo : lo + k]
            seeds = [client_seed(self.seed, self.round, c) for c in group]
            results = self.vectorized.train(self.dataset, group, self.weights, seeds, self._deltas)
            for i, r in enumerate(results):
                self.delta.copy_(self._deltas[i])  # the aggregator sees one CPU delta at a time, as sequentially
                yield group[i], r, self.delta

    @classmethod
    def shape(cls, *, dataset: FederatedDataset, cohort: int, weighting: str = "examples", seed: int = 0, **_) -> Shape:
        return Shape("SyncFedAvg", "round", "uniform", cohort, dataset.num_clients, dataset, weighting, seed)

    def step(self) -> dict[str, float]:
        """Run one round; return its training metrics."""
        clients = self.sample_cohort(self.seed, self.round, self.dataset.num_clients, self.cohort)
        self.aggregator.reset()
        loss_sum = seen = 0.0
        aborted = None
        try:
            for c, r, delta in self._train_cohort(clients.tolist()):
                weight = float(r.num_examples) if self.weighting == "examples" else 1.0
                loss_sum += r.loss * r.examples_seen
                seen += r.examples_seen
                if r.num_examples > 0:
                    self.aggregator.add(delta, weight, c)
            # A DP aggregator releases (pure noise) even for an empty cohort: skipping would leak it.
            if self.aggregator.count or self.aggregator.release_when_empty:
                update = self.aggregator.result()
                self.server_opt.step(self.weights, update)
        except RoundAborted as e:
            aborted = e  # no server step: weights and optimizer state untouched
        self.round += 1
        record = {
            "round": self.round,
            "train_loss": loss_sum / max(seen, 1),
            "examples_seen": seen,
            "clients": len(clients),
        }
        record.update(self.aggregator.round_metrics())
        if aborted is not None:
            record.update(aborted=True, abort_reason=str(aborted))
        return record

    def close(self) -> None:
        """Release what the run holds outside this object (nothing here; worker processes in ParallelFedAvg)."""

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weights": self.weights.clone(), "round": torch.tensor(self.round)}
        state.update({f"server_opt.{k}": v for k, v in self.server_opt.state_dict().items()})
        # e.g. secure aggregation's round counter
        state.update({f"aggregator.{k}": v for k, v in self.aggregator.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["weights"].shape != self.weights.shape:
            raise ValueError(f"checkpoint has {state['weights'].numel()} weights, model has {self.weights.numel()}")
        opt = {k.removeprefix("server_opt."): v for k, v in state.items() if k.startswith("server_opt.")}
        self.server_opt.load_state_dict(opt)
        agg = {k.removeprefix("aggregator."): v for k, v in state.items() if k.startswith("aggregator.")}
        self.aggregator.load_state_dict(agg)
        self.weights.copy_(state["weights"])
        self.round = int(state["round"])


def check_device_keys(cfg) -> None:
    """``device`` and ``client.vectorize`` against the rest of the config (config.py's validator calls
    this with the whole ExperimentConfig); raises ValueError with one line naming the key."""
    from flotilla.core.device import CUDA_FORK, CUDA_MISSING

    runtime = cfg.runtime.name if cfg.runtime is not None else None
    processes = cfg.workers > 1 or runtime == "processes"
    # On Ray the GPUs are the actors' (gpus_per_actor): the driver may have none.
    if cfg.device == "cuda" and runtime != "ray" and not torch.cuda.is_available():
        raise ValueError(CUDA_MISSING)
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if on_gpu and processes:
        raise ValueError(f"workers: {CUDA_FORK}")
    if on_gpu and cfg.client.algorithm is not None:
        raise ValueError(
            f"device: client.algorithm {cfg.client.algorithm.name} keeps its state on the CPU and runs there only "
            "for now; use device: cpu"
        )
    if cfg.device != "cpu" and cfg.network is not None:
        raise ValueError(
            "device: flotilla serve evaluates on the server's CPU; each device picks its own with "
            "flotilla join --device; remove device"
        )
    if cfg.client.vectorize > 1:
        p = cfg.privacy
        why = (
            "privacy.sample_level (DP-SGD clips each example's gradient with Opacus, one client at a time)"
            if p is not None and p.sample_level is not None
            else f"client.algorithm {cfg.client.algorithm.name} (its client update is not plain local SGD)"
            if cfg.client.algorithm is not None
            else "mode: async or fleet (the fleet trains each trip as its event fires)"
            if cfg.mode == "async" or cfg.fleet is not None
            else "worker processes (each trains its share one client at a time)"
            if processes
            else "runtime: ray (actors train one client at a time)"
            if runtime == "ray"
            else "flotilla serve (devices train themselves)"
            if cfg.network is not None
            else None
        )
        if why:
            raise ValueError(
                f"client.vectorize: stacks clients of one in-process round; it cannot run with {why}; "
                "set client.vectorize: 1"
            )
