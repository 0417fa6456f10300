"""User-level DP for the network server: the privacy package's mechanisms, wired into the coordinator.

Sync rounds use :class:`~flotilla.privacy.DPFedAvg` as the round's aggregator (clip each device's
delta to S, one Gaussian noise draw per round on the sum, divide by the expected cohort); async
uses :class:`~flotilla.privacy.DPFedBuff` as the FedBuff buffer (one noise draw per buffer of K).
With secure aggregation the same releases happen where the protocol allows: sync masking noises
the unmasked sum (devices clip), the async secure buffer adds the noise inside.
Nothing is re-implemented here: this module only builds those objects, asks the Opacus accountant
(:func:`flotilla.privacy.epsilon`) for epsilon after each step, and tells the coordinator when the
budget is spent.

Sampling: the server does not choose which devices check in, so privacy amplification by sampling
cannot be assumed.  :func:`network_user_level` defaults ``amplification`` to ``False`` (q = 1);
a deployment may set it only where its check-in process really samples users (docs/privacy.md).
Noise is drawn from ``os.urandom``-seeded generators (``secure_noise``), never from the run seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flotilla.core.fedbuff import FedBuff
from flotilla.privacy import DPFedAvg, DPFedBuff, PrivacyError, UserLevelSpec, epsilon, plan_user_level


def network_user_level(u: UserLevelSpec, amplification_given: bool) -> UserLevelSpec:
    """``u`` with network defaults: amplification off unless the config set it."""
    if u.sampling == "poisson":
        raise PrivacyError(
            "privacy.user_level.sampling: poisson needs the server to draw each user independently; "
            "in flotilla serve devices choose when to check in, so use sampling: fixed"
        )
    return u if amplification_given else dataclasses.replace(u, amplification=False)


class NetworkPrivacy:
    """The plan (z, q, delta, budget), the mechanism, and epsilon by step count."""

    def __init__(
        self,
        user: UserLevelSpec,
        *,
        population: int,
        mode: str,
        cohort: int,
        buffer_size: int,
        total_steps: int,
        accountant: str = "rdp",
        seed: int = 0,
    ):
        expected = cohort if mode == "sync" else buffer_size
        if expected > population:
            raise PrivacyError(
                f"privacy.user_level: the expected {'cohort' if mode == 'sync' else 'buffer size'} "
                f"{expected} is larger than the {population} enrolled devices (token table)"
            )
        self.user = user
        self.accountant = accountant
        self.population = population
        self.plan = plan_user_level(
            user, population=population, expected_cohort=expected, rounds=total_steps, accountant=accountant
        )
        self.mode = mode
        self.seed = seed

    @property
    def limit(self) -> int:
        """Server steps the budget allows (the run's own total_steps when the budget does not bind)."""
        return self.plan.rounds

    def aggregator(self, numel: int, fedbuff: FedBuff | None = None):
        p, u = self.plan, self.user
        if self.mode == "sync":
            agg = DPFedAvg(
                numel,
                clip_norm=u.clip_norm,
                noise_multiplier=p.noise_multiplier,
                expected_cohort=p.expected_cohort,
                seed=self.seed,
                adaptive=u.adaptive_clipping,
                validate=False,
                secure_noise=True,
            )
            self.mechanism = agg
        else:
            agg = DPFedBuff(
                fedbuff,
                clip_norm=u.clip_norm,
                noise_multiplier=p.noise_multiplier,
                seed=self.seed,
                adaptive=u.adaptive_clipping,
            )
            agg.mechanism.secure_noise = True  # a deployment: noise nobody can replay from the seed
            self.mechanism = agg.mechanism
        return agg

    def _secure_plan(self):
        """(user spec, plan) for a secure composition, which needs a fixed clip norm."""
        from flotilla.secure.wiring import ADAPTIVE_CLIPPING_REFUSED

        if self.user.adaptive_clipping is not None:
            raise PrivacyError(ADAPTIVE_CLIPPING_REFUSED)
        return self.user, self.plan

    def secure_aggregator(self, numel: int, settings, version_fn, max_norm: float | None = None):
        """Async secure buffer with DP (as flotilla.secure.wiring wires the simulator): devices clip
        to S before sealing, the buffer enforces ||d|| <= S, keeps one update per device per release
        and adds N(0, (z S)^2) inside, before the sum leaves; the server divides by K."""
        from flotilla.privacy import GaussianSumNoise
        from flotilla.secure.fedbuff import SecureFedBuff
        from flotilla.secure.wiring import SecureDPMechanism

        u, p = self._secure_plan()
        noise = GaussianSumNoise(u.clip_norm, p.noise_multiplier, seed=self.seed, secure_noise=True)
        buf = SecureFedBuff(
            numel,
            settings.buffer_size,
            settings.staleness,
            version_fn=version_fn,
            normalize=settings.normalize,
            max_staleness=settings.max_staleness,
            max_norm=max_norm,
            dp_clip=u.clip_norm,
            noise_fn=noise,
        )
        self.mechanism = SecureDPMechanism(u.clip_norm, noise, lambda: buf.last_metrics)
        return buf

    def masked_release(self):
        """Sync masking with DP (as flotilla.secure.wiring wires the simulator): devices clip to S and
        weigh 1; the server adds N(0, (z S)^2) to the unmasked sum and divides by the expected cohort.
        Returns (noise_fn, denominator) for flotilla.network.secagg.SecAggRound.finish."""
        from flotilla.privacy import GaussianSumNoise
        from flotilla.secure.wiring import SecureDPMechanism

        u, p = self._secure_plan()
        noise = GaussianSumNoise(u.clip_norm, p.noise_multiplier, seed=self.seed, secure_noise=True)
        self.mechanism = SecureDPMechanism(u.clip_norm, noise, lambda: {})
        return noise, float(p.expected_cohort)

    def epsilon(self, steps: int) -> float:
        p = self.plan
        return epsilon(p.noise_multiplier, p.sample_rate, steps, p.delta, self.accountant)

    def report(self, steps: int) -> dict[str, Any]:
        """What status and metrics show after ``steps`` releases."""
        eps = self.epsilon(steps)
        p = self.plan
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "sample_rate": p.sample_rate,
            "amplification": self.user.amplification,
            "budget": p.budget,
            "steps_allowed": self.limit,
            "clip_norm": self.mechanism.clip_norm,
            "accountant": self.accountant,
            "budget_spent": p.budget is not None and steps >= self.limit,
        }

    def metrics(self, steps: int) -> dict[str, Any]:
        """The privacy fields of a metrics record (as the simulator writes them; epsilon None when
        unbounded, never a bare Infinity)."""
        r = self.report(steps)
        return {k: r[k] for k in ("epsilon", "delta", "noise_multiplier", "clip_norm")}

    # -- persisted with each snapshot (adaptive clip norm, release counter) -----------------------------
    def state(self) -> dict[str, Any]:
        return {"clip_norm": self.mechanism.clip_norm, "releases": self.mechanism.releases}

    def load(self, state: dict[str, Any]) -> None:
        if state:
            self.mechanism.clip_norm = float(state["clip_norm"])
            self.mechanism.releases = int(state["releases"])
