"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each client minimises its loss plus a proximal term that keeps it near the model it started from:

    h_k(w) = F_k(w) + mu/2 ||w - w_start||^2,   so every local step uses   g + mu (w - w_start).

The server side is FedAvg (any server optimizer).  ``mu = 0`` is FedAvg exactly: no client update
is swapped in and runs are bit-identical to plain FedAvg.

    client: {algorithm: {name: fedprox, mu: 0.01}}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flotilla.algorithms.base import ClientAlgorithm, Parts, Setting, not_composable
from flotilla.core.client import ClientResult, ClientSpec, LocalTrainer, LossFn
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape
from flotilla.core.schema import Section


class FedProxConfig(Section):
    """FedProx: local SGD on loss + mu/2 ||w - w_global||^2."""

    name: Literal["fedprox"]
    mu: float = Field(0.01, ge=0, description="proximal coefficient mu (0 = FedAvg)")


class FedProxTrainer(LocalTrainer):
    """LocalTrainer whose every step first adds ``mu (w - w_start)`` to the gradient.

    A subclass, so LocalTrainer's own loop stays as fast as it was when FedProx is not used."""

    def __init__(self, flat: FlatModel, loss_fn: LossFn, spec: ClientSpec, mu: float):
        super().__init__(flat, loss_fn, spec)
        self.mu = mu
        self._start: torch.Tensor | None = None
        self._scratch = torch.empty(flat.numel)

    def train(self, dataset, client: int, start: torch.Tensor, seed: int, delta_out: torch.Tensor) -> ClientResult:
        self._start = start
        try:
            return super().train(dataset, client, start, seed, delta_out)
        finally:
            self._start = None

    def _sgd_step(self) -> None:
        torch.sub(self.flat.flat, self._start, out=self._scratch)
        self.flat.grad.add_(self._scratch, alpha=self.mu)
        super()._sgd_step()


class FedProxParts(Parts):
    def __init__(self, cfg: FedProxConfig, shape: Shape):
        self.mu = float(cfg.mu)
        self.components = Components(client_update=self._client_update) if self.mu > 0 else Components()

    def _client_update(self, flat, loss_fn, client_spec) -> FedProxTrainer:
        return FedProxTrainer(flat, loss_fn, client_spec, self.mu)


def _refuse(cfg: FedProxConfig, s: Setting) -> str | None:
    if cfg.mu == 0:
        return None
    if s.sample_level_dp:
        return (
            "client.algorithm: fedprox changes the local step, and privacy.sample_level (DP-SGD) replaces the "
            "local step with its own; the two do not compose (remove one of them)"
        )
    return not_composable("fedprox", s, "trains with its own client update")


# over the network the assignment carries mu and the device trains with FedProxTrainer (flotilla/network/client.py)
ALGORITHM = ClientAlgorithm("fedprox", FedProxConfig, FedProxParts, _refuse)
