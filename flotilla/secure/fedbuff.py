"""FedBuff with its buffer inside the secure buffer (the enclave stand-in of ``buffer.py``).

:class:`SecureFedBuff` has the interface of :class:`flotilla.core.fedbuff.FedBuff` (``add(delta,
weight, tau, client) / full / count / result / reset / state_dict``), so
:class:`~flotilla.core.fedbuff.FedBuffServer` and the fleet simulator use it unchanged
(``server.buffer = SecureFedBuff(...)``).  Each ``add`` plays the three parties of one trip:

* the buffer issues the assignment for the model version the client trained from
  (``version_now - tau``; in a deployment this happens when the client downloads the model);
* the client (optionally) clips its delta to L2 norm ``dp_clip`` and seals ``(weight, delta)`` to
  the buffer's public key;
* the untrusted server relays the ciphertext; the buffer opens it, validates it, applies the
  staleness weight ``s(tau)`` inside and accumulates.

``result()`` is the only place the server gets anything: the released sum of >= K updates (noised
inside the buffer when ``noise_fn`` is set), which it normalises exactly as FedBuff does:

* without DP, ``"mean"``: ``sum_i s(tau_i) w_i d_i / sum_i w_i``; ``"sum"``: ``K x`` that (the
  buffer releases ``sum_i w_i`` alongside the sum for this), so a run is bit-identical to plaintext
  FedBuff;
* with user-level DP (``dp_clip = S``, weights 1, one update per client per release, the buffer
  enforcing ``max_norm = S``): ``(sum_i s(tau_i) clip(d_i, S) + N(0, (z S)^2 I)) / K``, DP-FedBuff's
  release, with the noise added inside the buffer so that the server never sees an un-noised sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flotilla.core.aggregate import UpdateRejected
from flotilla.core.staleness import AVERAGE_WITH_DP
from flotilla.secure.buffer import SecureBuffer, seal_update
from flotilla.secure.errors import DuplicateContribution

# Clients clip to just under S so that float32 rounding can never push a clipped update over the
# buffer's max_norm = S check (a relative 1e-6 of S: far below any noise that matters).
_CLIP_MARGIN = 1.0 - 1e-6


class SecureFedBuff:
    """A FedBuff buffer whose sum lives in a :class:`SecureBuffer` (see module docstring)."""

    def __init__(
        self,
        numel: int,
        buffer_size: int,
        staleness,
        *,
        version_fn: Callable[[], int],
        normalize: str = "mean",
        max_staleness: int | None = None,
        max_norm: float | None = None,
        dp_clip: float | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if buffer_size < 2:
            raise ValueError(
                f"async.buffer_size: the secure buffer releases sums of K >= 2 updates, got K={buffer_size}"
            )
        if normalize not in ("mean", "sum"):
            raise ValueError(f"async.normalize: must be 'mean' or 'sum', got {normalize!r}")
        if dp_clip is not None and getattr(staleness, "average", None) is not None:
            raise ValueError(AVERAGE_WITH_DP)
        if dp_clip is not None and max_norm is not None and max_norm < dp_clip:
            raise ValueError(
                f"secure_aggregation.max_norm: {max_norm} is below privacy.user_level.clip_norm {dp_clip}; "
                f"with user-level DP the buffer enforces clip_norm (leave max_norm unset)"
            )
        self.numel = numel
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.normalize = normalize
        self.max_staleness = max_staleness
        self.version_fn = version_fn
        self.dp_clip = dp_clip
        self.secure = SecureBuffer(
            numel,
            buffer_size,
            staleness_weight=staleness,
            max_norm=dp_clip if dp_clip is not None else max_norm,
            max_staleness=max_staleness,
            noise_fn=noise_fn,
            one_per_client=dp_clip is not None,
        )
        self._out = torch.zeros(numel)
        self._clipped = torch.empty(numel) if dp_clip is not None else None
        self.dropped_stale = 0
        self.duplicates_dropped = 0
        self.l2_clipped = 0  # this buffer's updates scaled down to dp_clip (client side)
        self.last_metrics: dict[str, float] = {}

    # -- FedBuff's interface --------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.secure.count

    @property
    def full(self) -> bool:
        return self.secure.ready

    def too_stale(self, tau: int) -> bool:
        return self.max_staleness is not None and tau > self.max_staleness

    @torch.no_grad()
    def add(self, delta: torch.Tensor, weight: float, tau: int, client=None) -> float:
        """One trip's update through the secure buffer; returns the staleness weight applied (0.0 if
        dropped: too stale, or, with DP, a second update from a client already in this buffer).
        Raises :class:`UpdateRejected` (buffer unchanged) for anything the buffer refuses."""
        where = f"update from client {client}" if client is not None else "update"
        if tau < 0:
            raise UpdateRejected(f"{where}: staleness {tau} < 0 (the client claims a future model version)")
        if self.too_stale(tau):
            self.dropped_stale += 1
            return 0.0
        if self.dp_clip is not None and weight != 1.0:
            raise UpdateRejected(
                f"{where}: user-level DP gives every user weight 1 (got {weight}); use weighting='uniform'"
            )
        now = self.version_fn()
        assignment = self.secure.assign(client, now - tau)  # buffer: at the client's download
        x, clipped = delta, False
        if self.dp_clip is not None:  # client: bound the update's norm
            norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            if norm > self.dp_clip:
                x = torch.mul(delta, self.dp_clip * _CLIP_MARGIN / norm, out=self._clipped)
                clipped = True
        try:
            sealed = seal_update(x, weight, assignment)  # client: encrypt to the buffer
            self.secure.receive(sealed, now)  # server relays; buffer opens and adds
        except DuplicateContribution:
            self.secure.cancel(assignment)
            self.duplicates_dropped += 1
            return 0.0
        except BaseException:
            self.secure.cancel(assignment)
            raise
        self.l2_clipped += clipped
        return float(self.staleness(tau))

    def result(self) -> torch.Tensor:
        """The server's view: the released sum of >= K updates, normalised as FedBuff does."""
        if self.count == 0:
            raise RuntimeError("no updates in the buffer")
        rel = self.secure.release()  # the buffer is empty afterwards
        if self.dp_clip is not None:
            torch.div(rel.sum, self.buffer_size, out=self._out)
            if self.normalize == "sum":
                self._out.mul_(self.buffer_size)
            self.last_metrics = {
                "clip_norm": self.dp_clip,
                "dp_updates": rel.count,
                # simulator diagnostics, NOT released under DP:
                "clipped_fraction": self.l2_clipped / rel.count,
                "dp_duplicates_dropped": self.duplicates_dropped,
            }
        else:
            denom = rel.weight_sum if self.normalize == "mean" else rel.weight_sum / rel.count
            torch.div(rel.sum, denom, out=self._out)
        self.l2_clipped = 0
        return self._out

    def reset(self) -> None:
        self.secure.reset()
        self.l2_clipped = 0

    # -- checkpoints (saved by the fleet simulator under "buffer.") -------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"secure.{k}": v for k, v in self.secure.state_dict().items()}
        state.update(
            {"dropped_stale": torch.tensor(self.dropped_stale), "duplicates": torch.tensor(self.duplicates_dropped)}
        )
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        inner = {k.removeprefix("secure."): v for k, v in state.items() if k.startswith("secure.")}
        if not inner:
            raise ValueError(
                "checkpoint holds a plaintext FedBuff buffer, not a secure one: it was not written by a "
                "run with secure_aggregation"
            )
        self.secure.load_state_dict(inner)
        self.dropped_stale = int(state["dropped_stale"])
        self.duplicates_dropped = int(state["duplicates"])
