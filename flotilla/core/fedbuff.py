"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022) and FedAsync (Xie et al. 2019).

Pure server-side code on flat vectors, with no notion of time or transport: the fleet
simulator calls it, and so can a network server.

FedBuff
-------
A client downloads ``(w, version v0)``, trains, and returns its delta ``d = w_end - w_start``
with ``v0``.  Its staleness is ``tau = version_now - v0``.  The server adds
``s(tau) * weight * d`` into a buffer (``weight`` = the client's example count, or 1); when
``K`` updates are in, it takes one :class:`~flotilla.core.server_opt.ServerOptimizer` step
with the buffer, clears it and increments the version.

Normalisation (``normalize``):

* ``"mean"`` (default): ``D = sum_i s(tau_i) w_i d_i / sum_i w_i``.  The example weights are
  normalised, the staleness weights are not, so stale updates shrink the step instead of only
  re-weighting it.  With fresh updates ``D`` is exactly the FedAvg weighted mean, so the
  server learning rate means the same as in synchronous FedAvg and does not depend on ``K``
  (FedAvg: lr 1; the FedBuff paper's 0.7 with momentum 0.9 is also on this scale).
* ``"sum"``: ``D = K * sum_i s(tau_i) w_i d_i / sum_i w_i`` (with uniform weights: the plain
  sum ``sum_i s(tau_i) d_i``, as FLSim does).  This is ``K`` times the mean, so ``sum`` with
  server lr ``eta`` equals ``mean`` with lr ``K * eta``: with ``sum`` scale the server lr as ~1/K.

Updates with ``tau > max_staleness`` are dropped (counted, never added).

FedAsync
--------
Every update is applied at once: ``w <- (1 - a) w + a w_client`` with ``a = min(alpha * s(tau), 1)``
and ``w_client = w_v0 + d``.  The cap matters only with ``staleness.average``, whose
normalised weights exceed 1 for fresh updates: ``a > 1`` would move the model past the client's
model (further from it than before), so the mix stays a convex combination, as FLSim asserts.  This needs the weights the client started from, which the
caller keeps (the simulator's version store does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flotilla.core.aggregate import UpdateRejected, check_update
from flotilla.core.server_opt import ServerOptimizer
from flotilla.core.staleness import Staleness


@dataclass(frozen=True)
class Submitted:
    accepted: bool  # False: dropped because tau > max_staleness
    staleness: int
    weight: float  # the staleness weight s(tau) applied (0 if dropped)
    stepped: bool  # True if this update completed a server step
    version: int  # server version after handling the update


def _check_weight(weight: float, where: str) -> None:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise UpdateRejected(f"{where}: weight must be a positive finite number, got {weight}")


class FedBuff:
    """The buffer of K updates (aggregator half of FedBuff)."""

    def __init__(
        self,
        numel: int,
        buffer_size: int,
        staleness: Staleness = Staleness(),
        *,
        normalize: str = "mean",
        max_staleness: int | None = None,
        validate: bool = True,
    ):
        if buffer_size < 1:
            raise ValueError(f"async.buffer_size: K must be >= 1, got {buffer_size}")
        if normalize not in ("mean", "sum"):
            raise ValueError(f"async.normalize: must be 'mean' or 'sum', got {normalize!r}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"async.max_staleness: must be >= 0, got {max_staleness}")
        self.numel = numel
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.normalize = normalize
        self.max_staleness = max_staleness
        self.validate = validate
        self.sum = torch.zeros(numel)
        self._out = torch.zeros(numel)
        self.total_weight = 0.0
        self.count = 0
        self.dropped_stale = 0

    def too_stale(self, tau: int) -> bool:
        return self.max_staleness is not None and tau > self.max_staleness

    def add(self, delta: torch.Tensor, weight: float, tau: int, client=None) -> float:
        """Add one update; return the staleness weight applied (0.0 if dropped as too stale).

        Raises :class:`UpdateRejected` (buffer unchanged) for a malformed delta or weight.
        """
        where = f"update from client {client}" if client is not None else "update"
        if tau < 0:
            raise UpdateRejected(f"{where}: staleness {tau} < 0 (the client claims a future model version)")
        if self.validate:
            check_update(delta, self.numel, where)
        _check_weight(weight, where)
        if self.too_stale(tau):
            self.dropped_stale += 1
            return 0.0
        s = self.staleness(tau)
        self.sum.add_(delta, alpha=s * weight)
        self.total_weight += weight
        self.count += 1
        return s

    @property
    def full(self) -> bool:
        return self.count >= self.buffer_size

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no updates in the buffer")
        # Division (not multiplication by a reciprocal) so that "mean" with K=1 is bit-identical
        # to the synchronous WeightedMean of one client.
        denom = self.total_weight if self.normalize == "mean" else self.total_weight / self.count
        return torch.div(self.sum, denom, out=self._out)

    def reset(self) -> None:
        self.sum.zero_()
        self.total_weight = 0.0
        self.count = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "sum": self.sum.clone(),
            "total_weight": torch.tensor(self.total_weight, dtype=torch.float64),
            "count": torch.tensor(self.count),
            "dropped_stale": torch.tensor(self.dropped_stale),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["sum"].shape != self.sum.shape:
            raise ValueError(f"buffer state has {state['sum'].numel()} values, expected {self.numel}")
        self.sum.copy_(state["sum"])
        self.total_weight = float(state["total_weight"])
        self.count = int(state["count"])
        self.dropped_stale = int(state["dropped_stale"])


class FedBuffServer:
    """Global weights + version + buffer + server optimizer: ``submit`` one update at a time."""

    def __init__(self, weights: torch.Tensor, buffer: FedBuff, server_opt: ServerOptimizer, version: int = 0):
        self.weights = weights
        self.buffer = buffer
        self.server_opt = server_opt
        self.version = version

    def submit(self, delta: torch.Tensor, weight: float, base_version: int, client=None) -> Submitted:
        tau = self.version - base_version
        s = self.buffer.add(delta, weight, tau, client)
        if s == 0.0:
            return Submitted(False, tau, 0.0, False, self.version)
        stepped = False
        if self.buffer.full:
            self.step()
            stepped = True
        return Submitted(True, tau, s, stepped, self.version)

    def step(self) -> None:
        """One server step with what the buffer holds (full, or a round closed early by a deadline)."""
        self.server_opt.step(self.weights, self.buffer.result())
        self.buffer.reset()
        self.version += 1


class FedAsyncServer:
    """FedAsync: apply each update at once with mixing weight ``a = min(alpha * s(tau), 1)``."""

    def __init__(
        self,
        weights: torch.Tensor,
        mixing: float = 0.6,
        staleness: Staleness = Staleness(),
        *,
        max_staleness: int | None = None,
        validate: bool = True,
        version: int = 0,
    ):
        if not (math.isfinite(mixing) and 0 < mixing <= 1):
            raise ValueError(f"async.mixing: alpha must be in (0, 1], got {mixing}")
        self.weights = weights
        self.mixing = mixing
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.validate = validate
        self.version = version
        self.dropped_stale = 0
        self._scratch = torch.empty_like(weights)

    def too_stale(self, tau: int) -> bool:
        return self.max_staleness is not None and tau > self.max_staleness

    def mixing_weight(self, s: float) -> float:
        """``a = alpha * s`` kept in [0, 1]: normalised staleness (``average``) makes s(0) > 1."""
        return min(self.mixing * s, 1.0)

    @torch.no_grad()
    def submit(self, delta: torch.Tensor, base_weights: torch.Tensor, base_version: int, client=None) -> Submitted:
        """``w <- w + a (w_v0 + d - w)``, i.e. ``(1 - a) w + a w_client``."""
        where = f"update from client {client}" if client is not None else "update"
        tau = self.version - base_version
        if tau < 0:
            raise UpdateRejected(f"{where}: staleness {tau} < 0 (the client claims a future model version)")
        if self.validate:
            check_update(delta, self.weights.numel(), where)
        if self.too_stale(tau):
            self.dropped_stale += 1
            return Submitted(False, tau, 0.0, False, self.version)
        s = self.staleness(tau)
        a = self.mixing_weight(s)
        torch.add(base_weights, delta, out=self._scratch).sub_(self.weights)
        self.weights.add_(self._scratch, alpha=a)
        self.version += 1
        return Submitted(True, tau, s, True, self.version)
