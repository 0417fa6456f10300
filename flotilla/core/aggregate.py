"""Aggregators: turn client deltas into the one delta the server optimizer applies.

Every aggregator has the same small interface so the simulator, the network server, DP and
secure aggregation can be swapped without the round loop knowing:

    agg.reset()                       # start a round / an empty buffer
    agg.add(delta, weight, client)    # one client's flat delta (w_end - w_start)
    agg.count                         # updates accepted so far
    agg.result() -> Tensor            # the aggregated delta (a view into a preallocated buffer)

``add`` must not keep a reference to ``delta``: callers reuse that buffer for the next client.
The optional parts (a release with no update, per-round metrics, checkpointed state) have
defaults in :class:`Aggregator`, the base every aggregator derives from, so round loops call
them directly instead of probing for them.
"""

from __future__ import annotations

import math

import torch


class UpdateRejected(ValueError):
    """An update failed validation; the aggregate is unchanged."""


class RoundAborted(RuntimeError):
    """An aggregator gave up on this round (e.g. secure aggregation with too few survivors): the
    round makes no server step, and its metrics record says why."""


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


class Aggregator:
    """Base of every aggregator (see the module docstring for the four required methods)."""

    release_when_empty = False  # True: result() is released even with no update (DP: pure noise)
    count = 0

    def round_metrics(self) -> dict[str, float]:
        """Extra metrics of the round just aggregated (secure aggregation's dropouts, ...)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that must survive a checkpoint (beyond one round)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, the checkpoint has {sorted(state)}")


class WeightedMean(Aggregator):
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
