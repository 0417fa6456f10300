"""Aggregators: turn client deltas into the one delta the server optimizer applies.

Every aggregator has the same small interface so the simulator, the network server, DP and
secure aggregation can be swapped without the round loop knowing:

    agg.reset()                       # start a round / an empty buffer
    agg.add(delta, weight, client)    # one client's flat delta (w_end - w_start)
    agg.count                         # updates accepted so far
    agg.result() -> Tensor            # the aggregated delta (a view into a preallocated buffer)

``add`` must not keep a reference to ``delta``: callers reuse that buffer for the next client.
"""
from __future__ import annotations

import math

import torch


class UpdateRejected(ValueError):
    """An update failed validation; the aggregate is unchanged."""


def check_update(delta: torch.Tensor, numel: int, where: str = "update") -> None:
    """Refuse wrong-shaped, wrong-dtype or non-finite deltas before they touch any state."""
    if not isinstance(delta, torch.Tensor):
        raise UpdateRejected(f"{where}: expected a torch.Tensor, got {type(delta).__name__}")
    if delta.dtype != torch.float32:
        raise UpdateRejected(f"{where}: dtype {delta.dtype}, expected torch.float32")
    if delta.dim() != 1 or delta.numel() != numel:
        raise UpdateRejected(f"{where}: shape {tuple(delta.shape)}, expected ({numel},)")
    # Fast path: a NaN or inf anywhere makes the sum non-finite; only then count exactly.
    if not bool(torch.isfinite(delta.sum())) and not bool(torch.isfinite(delta).all()):
        bad = int((~torch.isfinite(delta)).sum())
        raise UpdateRejected(f"{where}: {bad} non-finite values (NaN or inf)")


class WeightedMean:
    """sum_i w_i d_i / sum_i w_i, accumulated in one preallocated buffer."""

    def __init__(self, numel: int, validate: bool = True):
        self.numel = numel
        self.validate = validate
        self.sum = torch.zeros(numel)
        self._out = torch.zeros(numel)
        self.total_weight = 0.0
        self.count = 0

    def reset(self) -> None:
        self.sum.zero_()
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float = 1.0, client: int | str | None = None) -> None:
        where = f"update from client {client}" if client is not None else "update"
        if self.validate:
            check_update(delta, self.numel, where)
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateRejected(f"{where}: weight must be a positive finite number, got {weight}")
        self.sum.add_(delta, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no updates to aggregate")
        return torch.div(self.sum, self.total_weight, out=self._out)
