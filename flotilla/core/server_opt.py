"""Server optimizers acting on flat vectors (Reddi et al., "Adaptive Federated Optimization").

Sign convention (used everywhere in Flotilla): a client's delta is ``w_end - w_start``; the
server receives the aggregated delta ``D`` (a descent direction, i.e. minus a pseudo-gradient)
and moves ``w <- w + lr * step(D)``.  FedAvg is SGD with lr 1.

State is a dict of flat tensors so it can be checkpointed with safetensors and restored
bit-identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class ServerOptimizerSpec:
    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9      # fedavgm only
    beta1: float = 0.9         # adaptive optimizers
    beta2: float = 0.99        # fedadam / fedyogi
    tau: float = 1e-3          # adaptivity / numerical floor
    initial_accumulator: float = 0.0  # starting value of v (Reddi et al. use tau^2 for some runs)


class ServerOptimizer:
    """Applies one server step in place to the global flat weights."""

    def __init__(self, spec: ServerOptimizerSpec, numel: int):
        if spec.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {spec.name!r}; choose one of {OPTIMIZERS}")
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
