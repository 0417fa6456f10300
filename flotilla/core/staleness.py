"""Staleness weights for asynchronous aggregation (FedBuff, FedAsync).

Staleness ``tau`` = the server's model version when an update arrives minus the version the
client downloaded (0 = fresh).  A weight function ``s(tau)`` in (0, 1] scales the update:

    constant     s = 1
    polynomial   s = (1 + tau)^-a              (a = 0.5: FedBuff's 1/sqrt(1 + tau))
    hinge        s = 1 if tau <= b else 1 / (a (tau - b) + 1)        (FedAsync)

With ``average`` set (FLSim's ``avg_staleness``), weights are divided by ``s(average)``, so an
update of the expected staleness weighs 1 and fresher ones weigh more than 1: the step size
then does not shrink as concurrency (and with it the typical staleness) grows.

An optional ``max_staleness`` (applied by the aggregator, not here) drops updates with
``tau > max_staleness`` altogether.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("constant", "polynomial", "hinge")

# Why user-level DP (whose per-update bound needs s(tau) <= 1) refuses ``average``.
AVERAGE_WITH_DP = (
    "async.staleness.average: normalised staleness weights exceed 1 for fresh updates, which breaks "
    "user-level DP's per-update bound clip_norm; leave average unset with privacy"
)


@dataclass(frozen=True)
class Staleness:
    kind: str = "polynomial"
    exponent: float = 0.5  # polynomial a
    a: float = 10.0  # hinge slope
    b: float = 4.0  # hinge threshold
    average: float | None = None  # normalise: s(tau) / s(average) (FLSim's avg_staleness)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"staleness.kind: unknown {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("exponent", "a", "b"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"staleness.{name}: must be a finite number >= 0, got {v}")
        if self.average is not None and not (math.isfinite(self.average) and self.average >= 0):
            raise ValueError(f"staleness.average: must be a finite number >= 0, got {self.average}")
        # the normaliser 1 / s(average), a constant of the weight function (frozen: set once here)
        object.__setattr__(self, "_scale", 1.0 if self.average is None else 1.0 / self._raw(float(self.average)))

    def _raw(self, tau):
        if self.kind == "constant":
            return np.ones_like(tau) if isinstance(tau, np.ndarray) else 1.0
        if self.kind == "polynomial":
            return (1.0 + tau) ** -self.exponent
        if isinstance(tau, np.ndarray):
            return np.where(tau <= self.b, 1.0, 1.0 / (self.a * (tau - self.b) + 1.0))
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)

    def __call__(self, tau: int | float) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        return self._raw(tau) * self._scale

    def weights(self, tau: np.ndarray) -> np.ndarray:
        """Vectorised ``s(tau)``."""
        tau = np.asarray(tau, dtype=np.float64)
        if (tau < 0).any():
            raise ValueError("staleness must be >= 0")
        return self._raw(tau) * self._scale


def constant() -> Staleness:
    return Staleness("constant")


def polynomial(exponent: float = 0.5) -> Staleness:
    return Staleness("polynomial", exponent=exponent)


def hinge(a: float = 10.0, b: float = 4.0) -> Staleness:
    return Staleness("hinge", a=a, b=b)
