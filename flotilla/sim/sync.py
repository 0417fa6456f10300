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
    ):
        if not 1 <= cohort <= dataset.num_clients:
            raise ValueError(f"cohort: must be between 1 and the population size {dataset.num_clients}, got {cohort}")
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting: must be 'examples' or 'uniform', got {weighting!r}")
        self.dataset = dataset
        self.flat = FlatModel(model)
        self.weights = self.flat.flat.clone()  # the global model
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
        self.cohort = cohort
        self.weighting = weighting
        self.seed = seed
        self.round = 0
        # How a round's cohort is drawn (user-level DP may give Poisson sampling as a component).
        self.sample_cohort = parts.sampler or sample_cohort

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
            for c in clients.tolist():
                r = self.trainer.train(self.dataset, c, self.weights, client_seed(self.seed, self.round, c), self.delta)
                weight = float(r.num_examples) if self.weighting == "examples" else 1.0
                loss_sum += r.loss * r.examples_seen
                seen += r.examples_seen
                if r.num_examples > 0:
                    self.aggregator.add(self.delta, weight, c)
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
