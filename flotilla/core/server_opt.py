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

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


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
    momentum: float = 0.9      # fedavgm only
    beta1: float = 0.9         # adaptive optimizers
    beta2: float = 0.99        # fedadam / fedyogi
    tau: float = 1e-3          # adaptivity / numerical floor
    initial_accumulator: float = 0.0  # v_0 (Reddi et al.: tau^2); 0 keeps earlier runs unchanged


class ServerOptimizer:
    """Applies one server step in place to the global flat weights."""

    def __init__(self, spec: ServerOptimizerSpec, numel: int):
        if spec.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {spec.name!r}; choose one of {OPTIMIZERS}")
        v0 = spec.initial_accumulator
        if not (isinstance(v0, (int, float)) and math.isfinite(v0) and v0 >= 0):
            raise ValueError(f"server.initial_accumulator: must be a finite number >= 0 (sqrt(v) is taken), got {v0!r}")
        self.spec = spec
        self.state: dict[str, torch.Tensor] = {}
        if spec.name == "fedavgm":
            self.state["momentum"] = torch.zeros(numel)
        elif spec.name in ("fedadam", "fedyogi", "fedadagrad"):
            self.state["m"] = torch.zeros(numel)
            self.state["v"] = torch.full((numel,), float(spec.initial_accumulator))
        self._scratch = torch.empty(numel) if spec.name in ("fedadam", "fedyogi", "fedadagrad") else None

    @torch.no_grad()
    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> None:
        """``weights += lr * direction(delta)``; ``delta`` is the aggregated client delta."""
        s = self.spec
        if s.name == "fedavg":
            weights.add_(delta, alpha=s.lr)
        elif s.name == "fedavgm":
            mom = self.state["momentum"]
            mom.mul_(s.momentum).add_(delta)
            weights.add_(mom, alpha=s.lr)
        else:
            m, v, d2 = self.state["m"], self.state["v"], self._scratch
            m.mul_(s.beta1).add_(delta, alpha=1 - s.beta1)
            torch.mul(delta, delta, out=d2)
            if s.name == "fedadagrad":
                v.add_(d2)
            elif s.name == "fedadam":
                v.mul_(s.beta2).add_(d2, alpha=1 - s.beta2)
            else:  # fedyogi: v <- v - (1-b2) * d^2 * sign(v - d^2)
                sign = torch.sign(v - d2)
                v.sub_(d2.mul_(sign), alpha=1 - s.beta2)
            torch.sqrt(v, out=d2).add_(s.tau)
            weights.addcdiv_(m, d2, value=s.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"server optimizer state has keys {sorted(state)}, expected {sorted(self.state)}")
        for k, t in state.items():
            if t.shape != self.state[k].shape:
                raise ValueError(f"server optimizer state {k!r} has shape {tuple(t.shape)}, expected {tuple(self.state[k].shape)}")
            self.state[k].copy_(t)
