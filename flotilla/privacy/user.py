"""User-level DP on the server: DP-FedAvg (McMahan et al., ICLR 2018) as an aggregator.

One release (one server step) of :class:`DPFedAvg`:

    D = ( sum_i clip(d_i, S) + N(0, (z S)^2 I) ) / m,      clip(d, S) = d * min(1, S / ||d||)

where ``m`` is the EXPECTED cohort size (``q * population``), not the realised one, so the
sensitivity of ``D`` to adding or removing one user is ``S / m`` whatever the cohort turned out to
be.  Every user counts once (uniform weights): weighting by example counts would let one user's
influence exceed ``S``.

Adaptive clipping (Andrew et al., NeurIPS 2021, "Differentially private learning with adaptive
clipping"): each user also contributes the bit ``b_i = [||d_i|| <= S]``; the server releases
``b = (sum_i b_i + N(0, sigma_b^2)) / m`` and moves ``S <- S * exp(-eta (b - gamma))`` towards the
``gamma`` quantile of update norms.  The two Gaussian releases together are accounted as ONE
Gaussian mechanism with noise multiplier ``z`` when the delta's noise multiplier is
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (their Theorem 1), so the accountant is unchanged.

The aggregator implements the interface of :mod:`flotilla.core.aggregate` (``reset / add /
count / result``) and plugs into any runtime that uses it: the synchronous round loop and the
FedBuff buffer alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from flotilla.core.aggregate import Aggregator, UpdateRejected, check_update
from flotilla.privacy.accountant import PrivacyError

SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class AdaptiveClippingSpec:
    target_quantile: float = 0.5  # gamma: aim S at this quantile of update norms
    learning_rate: float = 0.2  # eta_S of the geometric update
    count_noise_multiplier: float | None = None  # sigma_b (noise std of the count); default m / 20

    def __post_init__(self):
        if not 0 < self.target_quantile < 1:
            raise PrivacyError(
                f"privacy.user_level.adaptive_clipping.target_quantile: must be in (0, 1), got {self.target_quantile}"
            )
        if not self.learning_rate > 0:
            raise PrivacyError(
                f"privacy.user_level.adaptive_clipping.learning_rate: must be > 0, got {self.learning_rate}"
            )
        if self.count_noise_multiplier is not None and not self.count_noise_multiplier > 0:
            raise PrivacyError(
                f"privacy.user_level.adaptive_clipping.count_noise_multiplier: must be > 0, got {self.count_noise_multiplier}"
            )


@dataclass(frozen=True)
class UserLevelSpec:
    clip_norm: float = 1.0  # S (the initial S with adaptive clipping)
    noise_multiplier: float | None = None  # z; or give target_epsilon
    target_epsilon: float | None = None  # calibrate z so that `rounds` server steps spend exactly this
    max_epsilon: float | None = None  # stop before epsilon would exceed this (default: target_epsilon)
    delta: float | None = None  # default: 1 / population^1.1
    sampling: str = "fixed"  # cohort sampling: fixed size or Poisson(q)
    adaptive_clipping: AdaptiveClippingSpec | None = None
    amplification: bool = True  # account q = cohort/population; False: q = 1 (no sampling assumption)

    def __post_init__(self):
        if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise PrivacyError(f"privacy.user_level.clip_norm: must be a positive finite number, got {self.clip_norm}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyError("privacy.user_level: give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise PrivacyError(f"privacy.user_level.noise_multiplier: must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyError(f"privacy.user_level.target_epsilon: must be > 0, got {self.target_epsilon}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise PrivacyError(f"privacy.user_level.max_epsilon: must be > 0, got {self.max_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyError(f"privacy.user_level.delta: must be in (0, 1), got {self.delta}")
        if self.sampling not in SAMPLINGS:
            raise PrivacyError(f"privacy.user_level.sampling: must be one of {SAMPLINGS}, got {self.sampling!r}")

    def resolved_delta(self, population: int) -> float:
        """``delta`` checked against the population: a delta of 1/N or more allows releasing one
        user's data outright, so it is refused."""
        delta = self.delta if self.delta is not None else 1.0 / population**1.1
        if delta >= 1.0 / population:
            raise PrivacyError(
                f"privacy.user_level.delta: {delta} is not below 1/population = 1/{population} = {1 / population:.3g}; "
                f"such a delta permits publishing a whole user's data (use e.g. {1 / population**1.1:.2g})"
            )
        return delta


def poisson_cohort(seed: int, round_: int, population: int, cohort: int) -> np.ndarray:
    """Poisson cohort sampling: each client independently with probability ``cohort/population``
    (the sampling DP-FedAvg's privacy proof assumes); the cohort size varies, ``cohort`` is its
    mean.  Same signature and seeding scheme as :func:`flotilla.sim.sync.sample_cohort`."""
    rng = np.random.default_rng([seed, round_, 0x9015])
    return np.flatnonzero(rng.random(population) < cohort / population)


def delta_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """Andrew et al. (2021), Thm 1: the delta's noise multiplier that, together with the clipped-count
    release of noise std ``count_noise_multiplier``, composes to one Gaussian of ``noise_multiplier``."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise PrivacyError(
            f"privacy.user_level.adaptive_clipping.count_noise_multiplier: {count_noise_multiplier} is too small for "
            f"noise multiplier {noise_multiplier:.4g}: the count release alone would spend the budget "
            f"(need count_noise_multiplier > noise_multiplier / 2 = {noise_multiplier / 2:.4g})"
        )
    return rest**-0.5


class DPFedAvg(Aggregator):
    """Clip, sum, add Gaussian noise, divide by the expected cohort size (one preallocated buffer).

    ``noise_multiplier`` is the one the accountant sees; with adaptive clipping part of it goes
    to the clipped-count release (see module docstring).  Noise is drawn from a generator seeded
    by ``(seed, release index)``, so runs replay exactly: right for a simulator, wrong for a
    deployment, where anyone who knows the seed could subtract the noise.  ``secure_noise=True``
    seeds every release from ``os.urandom`` instead (not reproducible).
    """

    release_when_empty = True  # a round with no participant still releases (pure noise)

    def __init__(
        self,
        numel: int,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_cohort: float,
        seed: int = 0,
        adaptive: AdaptiveClippingSpec | None = None,
        validate: bool = True,
        secure_noise: bool = False,
    ):
        if not clip_norm > 0:
            raise PrivacyError(f"privacy.user_level.clip_norm: must be > 0, got {clip_norm}")
        if not expected_cohort > 0:
            raise PrivacyError(f"expected cohort size must be > 0, got {expected_cohort}")
        self.numel = numel
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_cohort = float(expected_cohort)
        self.seed = seed
        self.adaptive = adaptive
        self.validate = validate
        self.secure_noise = secure_noise
        self.count_noise_multiplier = None
        self.delta_noise_multiplier = self.noise_multiplier
        if adaptive is not None:
            self.count_noise_multiplier = adaptive.count_noise_multiplier or self.expected_cohort / 20
            self.delta_noise_multiplier = delta_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier)
        self.sum = torch.zeros(numel)
        self._out = torch.zeros(numel)
        self.count = 0
        self.unclipped = 0  # updates with norm <= S this release (the adaptive-clipping bits)
        self.releases = 0  # server steps released so far (seeds the noise)
        self.last_metrics: dict[str, float] = {}

    def reset(self) -> None:
        self.sum.zero_()
        self.count = 0
        self.unclipped = 0

    @torch.no_grad()
    def add(self, delta: torch.Tensor, weight: float = 1.0, client: int | str | None = None) -> None:
        where = f"update from client {client}" if client is not None else "update"
        if self.validate:
            check_update(delta, self.numel, where)
        if weight != 1.0:
            raise UpdateRejected(
                f"{where}: user-level DP gives every user weight 1 (got {weight}); use weighting='uniform'"
            )
        self.accumulate(delta)

    @torch.no_grad()
    def accumulate(self, delta: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale * clip(delta, S)`` (``0 < scale <= 1``, e.g. a staleness weight), unvalidated."""
        if not 0 < scale <= 1:
            raise UpdateRejected(f"update scale must be in (0, 1] to keep the sensitivity <= S, got {scale}")
        norm = float(torch.linalg.vector_norm(delta))
        self.sum.add_(delta, alpha=scale * min(1.0, self.clip_norm / norm) if norm > 0 else scale)
        self.count += 1
        self.unclipped += norm <= self.clip_norm

    @torch.no_grad()
    def merge(self, partial: torch.Tensor, count: int, unclipped: int) -> None:
        """Add a partial sum that another DPFedAvg built with :meth:`add` at this ``clip_norm`` (a Ray actor's
        share of the round): its ``sum``, ``count`` and ``unclipped``.  The noise stays here, on the sum."""
        self.sum.add_(partial)
        self.count += count
        self.unclipped += unclipped

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """The noised, normalised sum; also updates S when clipping is adaptive."""
        g = _release_generator(self.seed, self.releases, 0xD1FF, self.secure_noise)
        out = torch.randn(self.numel, generator=g, out=self._out)
        out.mul_(self.delta_noise_multiplier * self.clip_norm).add_(self.sum).div_(self.expected_cohort)
        metrics = {
            "clip_norm": self.clip_norm,
            "dp_updates": self.count,
            # Simulator diagnostic, NOT released under DP (the realised count and clip fraction):
            "clipped_fraction": 1 - self.unclipped / self.count if self.count else 0.0,
        }
        if self.adaptive is not None:
            a = self.adaptive
            b = (
                self.unclipped + float(torch.randn((), generator=g)) * self.count_noise_multiplier
            ) / self.expected_cohort
            self.clip_norm *= math.exp(-a.learning_rate * (b - a.target_quantile))
            metrics["noised_unclipped_fraction"] = b
        self.releases += 1
        self.last_metrics = metrics
        return out


class GaussianSumNoise:
    """``noise_fn`` for the secure aggregators (flotilla.secure): adds N(0, (z S)^2 I) to a clipped
    SUM, in place, once per call (one call = one release, accounted like one DP-FedAvg step).

    The caller must make every contribution to the sum have L2 norm <= S and weight 1 (the secure
    buffer's ``max_norm=S``, the secure aggregator with ``weight = max_weight = 1``), and divide by
    the expected cohort size afterwards if it wants the mean.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, seed: int = 0, secure_noise: bool = False):
        if not clip_norm > 0:
            raise PrivacyError(f"privacy.user_level.clip_norm: must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise PrivacyError(f"privacy.user_level.noise_multiplier: must be >= 0, got {noise_multiplier}")
        self.std = float(clip_norm) * float(noise_multiplier)
        self.seed = seed
        self.secure_noise = secure_noise
        self.releases = 0

    @torch.no_grad()
    def __call__(self, total: torch.Tensor) -> torch.Tensor:
        g = _release_generator(self.seed, self.releases, 0x5EC0, self.secure_noise)
        self.releases += 1
        return total.add_(torch.randn(total.shape, generator=g, dtype=total.dtype), alpha=self.std)


def _release_generator(seed: int, release: int, tag: int, secure: bool) -> torch.Generator:
    """Noise generator of one release: reproducible from (seed, release), or seeded from os.urandom."""
    if secure:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, release, tag]).generate_state(1, np.uint64)[0] >> 1)
    )
