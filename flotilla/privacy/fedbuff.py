"""DP-FedBuff: DP-FedAvg's mechanism applied once per FedBuff buffer of K updates.

:class:`DPFedBuff` is a drop-in for :class:`flotilla.core.fedbuff.FedBuff` (same ``add(delta,
weight, tau, client) / full / result / reset / state_dict``), so :class:`~flotilla.core.fedbuff.
FedBuffServer` and the fleet simulator use it unchanged (``server.buffer = DPFedBuff(...)``).
Per buffer:

    D = ( sum_i s(tau_i) clip(d_i, S) + N(0, (z S)^2 I) ) / K        ("mean"; "sum" is K x that)

* each update is clipped to S BEFORE its staleness weight ``s(tau) in (0, 1]`` is applied, so one
  user moves the sum by at most S;
* every user weighs 1 (no example-count weights);
* a user contributes at most once per buffer: a second update from the same client while its
  first is still in the buffer is dropped (counted in ``dp_duplicates_dropped``).  With the fleet
  simulator several devices can map onto one client's data, so this matters;
* the buffer releases exactly when K updates are in, so dividing by K is dividing by the expected
  (and realised) count.

What the accountant assumes is stated in docs/privacy.md ("DP-FedBuff: the sampling assumption").
"""

from __future__ import annotations

import torch

from flotilla.core.aggregate import UpdateRejected, check_update
from flotilla.core.staleness import AVERAGE_WITH_DP
from flotilla.privacy.accountant import PrivacyError
from flotilla.privacy.user import AdaptiveClippingSpec, DPFedAvg


class DPFedBuff:
    """FedBuff's buffer with user-level DP (see module docstring)."""

    def __init__(
        self,
        buffer,
        *,
        clip_norm: float,
        noise_multiplier: float,
        seed: int = 0,
        adaptive: AdaptiveClippingSpec | None = None,
    ):
        # Take over the plain buffer's settings (K, staleness function, normalisation, max staleness).
        if getattr(buffer.staleness, "average", None) is not None:
            raise PrivacyError(AVERAGE_WITH_DP)
        self.numel = buffer.numel
        self.buffer_size = buffer.buffer_size
        self.staleness = buffer.staleness
        self.normalize = buffer.normalize
        self.max_staleness = buffer.max_staleness
        self.validate = buffer.validate
        self.dropped_stale = buffer.dropped_stale
        self.mechanism = DPFedAvg(
            self.numel,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_cohort=self.buffer_size,
            seed=seed,
            adaptive=adaptive,
            validate=False,
        )
        self.contributors: set = set()
        self.duplicates_dropped = 0

    # -- FedBuff's interface --------------------------------------------------------------------
    def too_stale(self, tau: int) -> bool:
        return self.max_staleness is not None and tau > self.max_staleness

    @property
    def count(self) -> int:
        return self.mechanism.count

    @property
    def full(self) -> bool:
        return self.mechanism.count >= self.buffer_size

    def add(self, delta: torch.Tensor, weight: float, tau: int, client=None) -> float:
        """Clip and add one update; return its staleness weight (0.0 if dropped: too stale, or a
        second update from a client already in this buffer)."""
        where = f"update from client {client}" if client is not None else "update"
        if tau < 0:
            raise UpdateRejected(f"{where}: staleness {tau} < 0 (the client claims a future model version)")
        if self.validate:
            check_update(delta, self.numel, where)
        if weight != 1.0:
            raise UpdateRejected(
                f"{where}: user-level DP gives every user weight 1 (got {weight}); use weighting='uniform'"
            )
        if self.too_stale(tau):
            self.dropped_stale += 1
            return 0.0
        key = client if client is not None else object()
        if key in self.contributors:
            self.duplicates_dropped += 1
            return 0.0
        s = float(self.staleness(tau))
        self.mechanism.accumulate(delta, s)
        self.contributors.add(key)
        return s

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no updates in the buffer")
        out = self.mechanism.result()  # (clipped sum + noise) / K
        if self.normalize == "sum":
            out.mul_(self.buffer_size)
        self.mechanism.last_metrics["dp_duplicates_dropped"] = self.duplicates_dropped
        return out

    def reset(self) -> None:
        self.mechanism.reset()
        self.contributors.clear()

    # -- checkpoints (saved by the fleet simulator under "buffer.") -------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        m = self.mechanism
        clients = [c for c in self.contributors if isinstance(c, int)]
        return {
            "sum": m.sum.clone(),
            "count": torch.tensor(m.count),
            "unclipped": torch.tensor(m.unclipped),
            "dropped_stale": torch.tensor(self.dropped_stale),
            "duplicates": torch.tensor(self.duplicates_dropped),
            "clip_norm": torch.tensor(m.clip_norm, dtype=torch.float64),
            "releases": torch.tensor(m.releases),
            "contributors": torch.tensor(sorted(clients), dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        m = self.mechanism
        if "clip_norm" not in state:
            raise ValueError(
                "checkpoint holds a plain FedBuff buffer, not a DP-FedBuff one: it was not written by a private run"
            )
        if state["sum"].shape != m.sum.shape:
            raise ValueError(f"buffer state has {state['sum'].numel()} values, expected {self.numel}")
        m.sum.copy_(state["sum"])
        m.count = int(state["count"])
        m.unclipped = int(state["unclipped"])
        m.clip_norm = float(state["clip_norm"])
        m.releases = int(state["releases"])
        self.dropped_stale = int(state["dropped_stale"])
        self.duplicates_dropped = int(state["duplicates"])
        self.contributors = set(state["contributors"].tolist())
