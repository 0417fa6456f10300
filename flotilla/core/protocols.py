"""The seams between layers, as types: what the Runner drives, what a client update and an
aggregator must offer, and what an algorithm declares about itself before it is built.

Privacy and secure aggregation never look at an algorithm's class.  They read its declared
:class:`Shape` (``Algorithm.shape(**kwargs)``, computed from the constructor's own arguments) and
answer with :class:`Components` (factories for a client update, an aggregator, a cohort sampler, a
buffer), which the algorithm's constructor takes.  A combination that cannot work is refused there,
before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ClientUpdate(Protocol):
    """Trains the shared model for one client from ``weights`` and writes ``w_end - w_start`` into
    ``out`` (flotilla.core.client.LocalTrainer; DP-SGD's DPLocalTrainer; client algorithms)."""

    def train(self, dataset, client: int, weights: torch.Tensor, seed: int, out: torch.Tensor) -> Any: ...


@runtime_checkable
class Aggregator(Protocol):
    """Sums weighted client deltas for one release (WeightedMean, DPFedAvg, SecureAggregator).
    flotilla.core.aggregate.Aggregator is the base class with the optional parts' defaults."""

    count: int
    release_when_empty: bool

    def reset(self) -> None: ...

    def add(self, delta: torch.Tensor, weight: float, client: int) -> None: ...

    def result(self) -> torch.Tensor: ...

    def round_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class Algorithm(Protocol):
    """What :class:`flotilla.runner.Runner` drives: one server step at a time, checkpointable."""

    round: int
    weights: torch.Tensor  # the global model as one flat vector
    flat: Any  # the FlatModel bound to the user's module

    def step(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...  # release worker processes, hooks; called once the run ends


class RuntimeAlgorithm(Protocol):
    """A runtime's algorithm class (SyncFedAvg, ParallelFedAvg, RayFedAvg, the fleet simulators): it
    declares its Shape from the constructor's arguments before it is built, and is built once with
    the components privacy, secure aggregation and the client algorithm contribute.  The experiment
    layer's runtime registry (flotilla.experiment.runtimes) says which config selects which."""

    @classmethod
    def shape(cls, **kwargs: Any) -> Shape: ...

    def __call__(self, *, components: Components | None = None, **kwargs: Any) -> Algorithm: ...


Sampler = Callable[[int, int, int, int], np.ndarray]  # (seed, round, population, cohort) -> client ids


@dataclass(frozen=True)
class Shape:
    """What an algorithm declares about itself before it is built (no isinstance anywhere).

    aggregation:  ``round``: a fixed cohort's updates are summed once per round (SyncFedAvg);
                  ``buffer``: any K arriving updates are summed per server step (FedBuff);
                  ``per_update``: every update is applied on its own (FedAsync).
    selection:    ``uniform``: the cohort is a uniform sample the algorithm draws (a sampler can be
                  swapped in); ``first_arrivals``: whoever reports first (over-selection, deadlines).
    composable:   the algorithm trains and aggregates in this process with the components it is
                  given; False when workers sum in their own processes (ParallelFedAvg).
    """

    name: str
    aggregation: Literal["round", "buffer", "per_update"]
    selection: Literal["uniform", "first_arrivals"]
    cohort: int  # clients per round, K per buffer, 1 per update
    population: int
    dataset: Any  # the federated dataset it trains on (sizes: public weight bounds)
    weighting: str
    seed: int
    composable: bool = True
    trains: bool = True  # False for the fleet simulator's null client (timing only)
    why_not_composable: str = ""


@dataclass(frozen=True)
class Components:
    """Factories an algorithm's constructor calls with its own FlatModel; None keeps its default.

    client_update(flat, loss_fn, client_spec) -> ClientUpdate
    aggregator(numel) -> Aggregator                          (round aggregation)
    buffer(fedbuff, version_fn) -> a FedBuff-like buffer     (buffer aggregation)
    sampler: Sampler                                          (uniform selection)
    """

    client_update: Callable | None = None
    aggregator: Callable[[int], Aggregator] | None = None
    buffer: Callable | None = None
    sampler: Sampler | None = None

    def merged(self, other: Components) -> Components:
        """``other``'s factories where it has them, ours elsewhere."""
        return Components(
            **{
                k: getattr(other, k) if getattr(other, k) is not None else getattr(self, k)
                for k in ("client_update", "aggregator", "buffer", "sampler")
            }
        )

    def given(self) -> list[str]:
        return [k for k in ("client_update", "aggregator", "buffer", "sampler") if getattr(self, k) is not None]


def refuse_unused(components: Components | None, name: str, usable: tuple[str, ...]) -> Components:
    """Constructors call this: a component the algorithm would not use is an error, never ignored."""
    components = components or Components()
    unused = [k for k in components.given() if k not in usable]
    if unused:
        raise ValueError(
            f"{name}: does not use the {', '.join(unused)} component(s) it was given; they would be "
            f"silently skipped (usable here: {', '.join(usable) or 'none'})"
        )
    return components
