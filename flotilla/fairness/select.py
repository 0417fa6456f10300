"""Tier-aware cohort selection for synchronous rounds (a ``Components.sampler``).

* ``exclude_low``: the low tier is never selected (the cohort is drawn from mid and high);
* ``over_select = f``: ``ceil(cohort x (1 + f))`` clients are drawn uniformly, and the slowest are
  dropped until ``cohort`` remain: low-tier clients first, then mid, then high (RF^2).  Inside a
  tier every client has the same speed multiplier, so which of a tier's clients are dropped is
  the draw's order (random).

Reproducible per round from ``(seed, round)`` like :func:`flotilla.sim.sync.sample_cohort`.
"""

from __future__ import annotations

import math

import numpy as np

from flotilla.fairness.tiers import LOW


class TierSampler:
    def __init__(self, tier: np.ndarray, *, exclude_low: bool = False, over_select: float = 0.0):
        if over_select < 0:
            raise ValueError(f"tiers.over_select: must be >= 0, got {over_select}")
        self.tier = np.asarray(tier, dtype=np.int64)
        self.exclude_low = exclude_low
        self.over_select = float(over_select)
        self.eligible = np.flatnonzero(self.tier != LOW) if exclude_low else np.arange(len(self.tier))

    def check_cohort(self, cohort: int) -> None:
        if cohort > len(self.eligible):
            raise ValueError(
                f"cohort: {cohort} is larger than the {len(self.eligible)} clients outside the low tier "
                "(tiers.exclude_low)"
            )

    def __call__(self, seed: int, round_: int, population: int, cohort: int) -> np.ndarray:
        if population != len(self.tier):
            raise ValueError(f"the tier map has {len(self.tier)} clients, the dataset {population}")
        self.check_cohort(cohort)
        n = min(math.ceil(cohort * (1 + self.over_select) - 1e-9), len(self.eligible))
        rng = np.random.default_rng([seed, round_, 0x5EED])
        drawn = rng.choice(self.eligible, size=n, replace=False)
        if n == cohort:
            return drawn
        # Keep the fastest: high before mid before low; a stable sort keeps the draw's order inside a tier.
        order = np.argsort(-self.tier[drawn], kind="stable")
        return drawn[order[:cohort]]
