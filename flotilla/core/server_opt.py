"""Server optimizers acting on flat vectors (Reddi et al., "Adaptive Federated Optimization").

Sign convention (used everywhere in Flotilla): a client's delta is ``w_end - w_start``; the
server receives the aggregated delta ``D`` (a descent direction, i.e. minus a pseudo-gradient)
and moves ``w <- w + lr * step(D)``.  FedAvg is SGD with lr 1.

State is a dict of flat tensors so it can be checkpointed with safetensors and restored
bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """Server optimizer settings (YAML: the ``server`` section).

    ``initial_accumulator`` is the starting value ``v_0`` of the adaptive optimizers' second
    moment.  Reddi et al. (Algorithm 2) start at ``v_{-1} >= tau^2``; Flotilla's default is 0
    because that is what every run before the key existed used, and changing it would change
    their results.  The choice only matters where ``sqrt(v)`` is not well above ``tau``: the
    denominator ``sqrt(v) + tau`` then grows by at most 2x (``v = 0`` gives ``tau``, ``v = tau^2``
    gives ``2 tau``), i.e. on coordinates whose updates stay below ~``tau / sqrt(1 - beta2)``
    (FedAdam, FedYogi; it fades as ``beta2^t``) or for all rounds (FedAdagrad, which never
    forgets).  To follow the paper set ``initial_accumulator = tau ** 2`` (1e-6 for the default
    ``tau``).
    """

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9  # fedavgm only
    beta1: float = 0.9  # adaptive optimizers
    beta2: float = 0.99  # fedadam / fedyogi
    tau: float = 1e-3  # adaptivity / numerical floor
    initial_accumulator: float = 0.0  # v_0 (Reddi et al.: tau^2); 0 keeps earlier runs unchanged


# --- the update rules: one small class each, in a registry keyed by the YAML name ---------------
class UpdateRule:
    """One server optimizer: its state (flat tensors) and its in-place step."""

    def init_state(self, spec: ServerOptimizerSpec, numel: int) -> dict[str, torch.Tensor]:
        return {}

    def step(
        self, spec: ServerOptimizerSpec, state: dict[str, torch.Tensor], weights: torch.Tensor, delta: torch.Tensor
    ) -> None:
        raise NotImplementedError


SERVER_OPTIMIZERS: dict[str, UpdateRule] = {}


def register(name: str):
    """Add a server optimizer under ``name`` (the value of ``server.optimizer``)."""

    def add(cls):
        SERVER_OPTIMIZERS[name] = cls()
        return cls

    return add


@register("fedavg")
class FedAvg(UpdateRule):
    def step(self, spec, state, weights, delta):
        weights.add_(delta, alpha=spec.lr)


@register("fedavgm")
class FedAvgM(UpdateRule):
    def init_state(self, spec, numel):
        return {"momentum": torch.zeros(numel)}

    def step(self, spec, state, weights, delta):
        mom = state["momentum"]
        mom.mul_(spec.momentum).add_(delta)
        weights.add_(mom, alpha=spec.lr)


class Adaptive(UpdateRule):
    """FedAdam / FedYogi / FedAdagrad: m and v moments, ``w += lr m / (sqrt(v) + tau)``."""

    def init_state(self, spec, numel):
        # "_scratch" is working memory, not state: it is left out of checkpoints.
        return {
            "m": torch.zeros(numel),
            "v": torch.full((numel,), float(spec.initial_accumulator)),
            "_scratch": torch.empty(numel),
        }

    def second_moment(self, spec, v, d2) -> None:
        raise NotImplementedError

    def step(self, spec, state, weights, delta):
        m, v, d2 = state["m"], state["v"], state["_scratch"]
        m.mul_(spec.beta1).add_(delta, alpha=1 - spec.beta1)
        torch.mul(delta, delta, out=d2)
        self.second_moment(spec, v, d2)
        torch.sqrt(v, out=d2).add_(spec.tau)
        weights.addcdiv_(m, d2, value=spec.lr)


@register("fedadam")
class FedAdam(Adaptive):
    def second_moment(self, spec, v, d2):
        v.mul_(spec.beta2).add_(d2, alpha=1 - spec.beta2)


@register("fedyogi")
class FedYogi(Adaptive):
    def second_moment(self, spec, v, d2):  # v <- v - (1-b2) * d^2 * sign(v - d^2)
        sign = torch.sign(v - d2)
        v.sub_(d2.mul_(sign), alpha=1 - spec.beta2)


@register("fedadagrad")
class FedAdagrad(Adaptive):
    def second_moment(self, spec, v, d2):
        v.add_(d2)


OPTIMIZERS = tuple(SERVER_OPTIMIZERS)


class ServerOptimizer:
    """Applies one server step in place to the global flat weights."""

    def __init__(self, spec: ServerOptimizerSpec, numel: int):
        if spec.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {spec.name!r}; choose one of {tuple(SERVER_OPTIMIZERS)}")
        v0 = spec.initial_accumulator
        if not (isinstance(v0, (int, float)) and math.isfinite(v0) and v0 >= 0):
            raise ValueError(f"server.initial_accumulator: must be a finite number >= 0 (sqrt(v) is taken), got {v0!r}")
        self.spec = spec
        self.rule = SERVER_OPTIMIZERS[spec.name]
        self._all = self.rule.init_state(spec, numel)
        self.state = {k: t for k, t in self._all.items() if not k.startswith("_")}

    @torch.no_grad()
    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> None:
        """``weights += lr * direction(delta)``; ``delta`` is the aggregated client delta."""
        self.rule.step(self.spec, self._all, weights, delta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"server optimizer state has keys {sorted(state)}, expected {sorted(self.state)}")
        for k, t in state.items():
            if t.shape != self.state[k].shape:
                raise ValueError(
                    f"server optimizer state {k!r} has shape {tuple(t.shape)}, expected {tuple(self.state[k].shape)}"
                )
            self.state[k].copy_(t)
