"""Turn a training algorithm into a private one: wiring, accounting, budget, metrics, state.

    kwargs = dict(model=model, dataset=dataset, loss_fn=loss, cohort=..., weighting="uniform", ...)
    private = make_private(SyncFedAvg, kwargs, spec, rounds=R, eval_every=E)   # DP composed in when built
    Runner(private, evaluate, rounds=private.rounds, stop=private.budget_spent, ...).run()

:class:`PrivateAlgorithm` is itself an algorithm for the Runner (``step / round / weights / flat /
state_dict / load_state_dict``): it delegates training to the wrapped one, and adds epsilon to the
metrics, refuses to step past the privacy budget, and checkpoints the DP state (adaptive clip norm,
noise seed counter) so a resumed run continues bit-identically.

What is accounted (user level): ``steps`` server releases of the subsampled Gaussian mechanism with
noise multiplier ``z`` and sampling rate ``q = cohort / population`` (sync) or
``q = buffer_size / population`` (FedBuff; see docs/privacy.md for the assumption this makes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from flotilla.core.protocols import Components, Shape
from flotilla.core.wrapper import AlgorithmWrapper
from flotilla.privacy.accountant import ACCOUNTANTS, PrivacyError, calibrate_noise, epsilon, max_steps
from flotilla.privacy.sample import DPLocalTrainer, SampleLevelSpec, make_dp_compatible
from flotilla.privacy.user import AdaptiveClippingSpec, DPFedAvg, UserLevelSpec, delta_noise_multiplier, poisson_cohort


@dataclass(frozen=True)
class PrivacySpec:
    sample_level: SampleLevelSpec | None = None
    user_level: UserLevelSpec | None = None
    accountant: str = "rdp"

    def __post_init__(self):
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"privacy.accountant: must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.sample_level is None and self.user_level is None:
            raise PrivacyError(
                "privacy: give sample_level and/or user_level (an empty privacy section protects nothing)"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | PrivacySpec | None) -> PrivacySpec | None:
        """From the ``privacy:`` config section (or an equivalent plain dict)."""
        if d is None or isinstance(d, PrivacySpec):
            return d
        d = dict(d)
        acc = d.get("accountant", "rdp")
        sample = d.get("sample_level")
        user = d.get("user_level")
        if sample is not None and not isinstance(sample, SampleLevelSpec):
            sample = SampleLevelSpec(**{**sample, "accountant": acc})
        if user is not None and not isinstance(user, UserLevelSpec):
            user = {
                k: v for k, v in dict(user).items() if not (k == "amplification" and v is None)
            }  # None: the default
            ad = user.get("adaptive_clipping")
            if ad is not None and not isinstance(ad, AdaptiveClippingSpec):
                user["adaptive_clipping"] = AdaptiveClippingSpec(**ad)
            user = UserLevelSpec(**user)
        unknown = set(d) - {"accountant", "sample_level", "user_level"}
        if unknown:
            raise PrivacyError(f"privacy: unknown keys {sorted(unknown)}")
        return cls(sample, user, acc)


@dataclass(frozen=True)
class UserLevelPlan:
    """The resolved user-level mechanism: what the accountant composes and when to stop."""

    noise_multiplier: float  # z (calibrated from target_epsilon, or as given)
    sample_rate: float  # q = expected cohort (or buffer) / population
    delta: float
    expected_cohort: float  # m: the sum is divided by this
    budget: float | None  # epsilon at which training stops (None: no budget, just report)
    max_steps: int | None  # steps affordable within the budget (capped at rounds + 1: "does not bind")
    rounds: int  # steps the run will take: min(requested rounds, max_steps)


@lru_cache(maxsize=64)
def plan_user_level(
    u: UserLevelSpec, *, population: int, expected_cohort: float, rounds: int, accountant: str = "rdp"
) -> UserLevelPlan:
    """Check ``u`` against the population and the schedule, calibrate z, and size the budget.

    Raises :class:`PrivacyError` naming the key for: delta >= 1/population, a target epsilon that
    no noise multiplier can meet in ``rounds`` steps, a budget below one step's epsilon, an adaptive
    clipping count noise too small for z.  Called by the config path before any work starts and
    again by :func:`make_private`.
    """
    if not 0 < expected_cohort <= population:
        raise PrivacyError(
            f"privacy.user_level: expected cohort {expected_cohort} must be in (0, population={population}]"
        )
    q = expected_cohort / population if u.amplification else 1.0
    delta = u.resolved_delta(population)
    z = (
        u.noise_multiplier
        if u.noise_multiplier is not None
        else calibrate_noise(u.target_epsilon, delta, q, rounds, accountant)
    )
    if u.adaptive_clipping is not None:
        delta_noise_multiplier(z, u.adaptive_clipping.count_noise_multiplier or expected_cohort / 20)
    budget = u.max_epsilon if u.max_epsilon is not None else u.target_epsilon
    steps = None
    if budget is not None:
        steps = max_steps(z, q, delta, budget, accountant, limit=rounds + 1)  # rounds + 1: the budget does not bind
        if steps == 0:
            eps1 = epsilon(z, q, 1, delta, accountant)
            key = "max_epsilon" if u.max_epsilon is not None else "target_epsilon"
            raise PrivacyError(
                f"privacy.user_level.{key}: budget {budget} is below the epsilon of a single round ({eps1:.4g} at "
                f"noise multiplier {z:.4g}, q={q:.4g}, delta={delta:.3g}); raise it or the noise"
            )
    return UserLevelPlan(
        z, q, delta, expected_cohort, budget, steps, min(rounds, steps) if steps is not None else rounds
    )


def prepare_model(model: nn.Module, spec: PrivacySpec | None) -> nn.Module:
    """In place, before any FlatModel is built on ``model``: swap recurrent layers for Opacus' DP
    layers when sample-level DP is on (no-op otherwise)."""
    if spec is not None and spec.sample_level is not None:
        make_dp_compatible(model)
    return model


def _user_level_kind(shape: Shape) -> str:
    """Which mechanism covers an algorithm of this shape: 'sync' rounds, or the 'fedbuff' buffer."""
    if shape.aggregation == "round" and shape.selection == "uniform":
        return "sync"
    if shape.aggregation == "buffer":
        if not shape.trains:
            raise PrivacyError("privacy: the null client trains nothing, there is nothing to privatise")
        return "fedbuff"
    if shape.aggregation == "round":
        raise PrivacyError(
            "privacy.user_level: a sync fleet round keeps the first arrivals (over-selection, deadline), a "
            "cohort sampling the accountant does not cover; use SyncFedAvg or FedBuff"
        )
    raise PrivacyError(
        f"privacy.user_level: {shape.name} is not covered: it applies every client update on its own "
        f"(async.algorithm=fedasync is not covered); user-level DP here is DP-FedAvg over synchronous "
        f"rounds or DP-FedBuff (one noise release per buffer of K)"
    )


class PrivacyParts:
    """What privacy contributes to an algorithm that is about to be built.

        parts = PrivacyParts(spec, SyncFedAvg.shape(**kwargs), rounds=R)   # every check happens here
        private = parts.wrap(SyncFedAvg(**kwargs, components=parts.components))

    ``components`` are factories the algorithm's constructor calls (DP-SGD client update, DP-FedAvg
    aggregator or DP-FedBuff buffer, Poisson sampler); each records what it built, so :meth:`wrap`
    can account, meter and checkpoint it.  Secure aggregation may build the user-level mechanism
    instead (it then sets :attr:`mechanism` itself; see flotilla.secure.wiring).
    """

    def __init__(self, spec: PrivacySpec | Mapping[str, Any], shape: Shape, *, rounds: int, eval_every: int = 1):
        spec = PrivacySpec.from_dict(spec)
        if not shape.composable:
            raise PrivacyError(
                "workers: DP trains every client in one process (per-client clipping, noise and "
                f"accounting in the parent), but {shape.name}: {shape.why_not_composable}; use the "
                f"in-process runtime (workers: 1, no runtime section)"
            )
        self.spec, self.shape, self.rounds, self.eval_every = spec, shape, rounds, eval_every
        self.kind = self.plan = None
        if spec.user_level is not None:
            u = spec.user_level
            self.kind = _user_level_kind(shape)
            if shape.weighting != "uniform":
                raise PrivacyError(
                    f"weighting: user-level DP needs weighting='uniform' (got {shape.weighting!r}): "
                    f"weighting users by example count breaks the per-user sensitivity bound S"
                )
            if self.kind == "fedbuff" and u.sampling == "poisson":
                raise PrivacyError(
                    "privacy.user_level.sampling: 'poisson' is for synchronous rounds; in FedBuff the buffer "
                    "fills with whichever K updates arrive first (see docs/privacy.md)"
                )
            self.plan = plan_user_level(
                u,
                population=shape.population,
                expected_cohort=float(shape.cohort),
                rounds=rounds,
                accountant=spec.accountant,
            )
        self.mechanism = None  # the user-level DP aggregator once built (metrics, clip norm, noise counter)
        self.trainer = None  # the DP-SGD client update once built

    @property
    def components(self) -> Components:
        u = self.spec.user_level
        return Components(
            client_update=self._client_update if self.spec.sample_level is not None else None,
            aggregator=self._aggregator if self.kind == "sync" else None,
            buffer=self._buffer if self.kind == "fedbuff" else None,
            sampler=poisson_cohort if u is not None and u.sampling == "poisson" else None,
        )

    def _client_update(self, flat, loss_fn, client_spec) -> DPLocalTrainer:
        dp = dataclasses.replace(self.spec.sample_level, accountant=self.spec.accountant)
        self.trainer = DPLocalTrainer(flat, loss_fn, client_spec, dp)
        return self.trainer

    def _aggregator(self, numel: int) -> DPFedAvg:
        u = self.spec.user_level
        self.mechanism = DPFedAvg(
            numel,
            clip_norm=u.clip_norm,
            noise_multiplier=self.plan.noise_multiplier,
            expected_cohort=float(self.shape.cohort),
            seed=self.shape.seed,
            adaptive=u.adaptive_clipping,
        )
        return self.mechanism

    def _buffer(self, buffer, version_fn):
        from flotilla.privacy.fedbuff import DPFedBuff

        u = self.spec.user_level
        dp_buffer = DPFedBuff(
            buffer,
            clip_norm=u.clip_norm,
            noise_multiplier=self.plan.noise_multiplier,
            seed=self.shape.seed,
            adaptive=u.adaptive_clipping,
        )
        self.mechanism = dp_buffer.mechanism
        return dp_buffer

    def wrap(self, algorithm) -> PrivateAlgorithm:
        """The built algorithm with accounting, the budget stop, DP metrics and DP state in checkpoints."""
        if self.plan is not None and self.mechanism is None:
            raise PrivacyError(f"privacy.user_level: {self.shape.name} did not build the DP aggregator it was given")
        return PrivateAlgorithm(
            algorithm,
            self.spec,
            rounds=self.rounds,
            eval_every=self.eval_every,
            aggregator=self.mechanism,
            plan=self.plan,
            trainer=self.trainer,
        )


class PrivateAlgorithm(AlgorithmWrapper):
    """A training algorithm with sample- and/or user-level DP (see module docstring)."""

    def __init__(
        self,
        inner,
        spec: PrivacySpec,
        *,
        rounds: int,
        eval_every: int = 1,
        aggregator: DPFedAvg | None = None,
        plan: UserLevelPlan | None = None,
        trainer: DPLocalTrainer | None = None,
    ):
        if (aggregator is None) != (plan is None):
            raise ValueError("PrivateAlgorithm: user-level DP needs both the aggregator and its plan")
        super().__init__(inner)
        self.spec = spec
        self.aggregator = aggregator
        self.plan = plan
        self.trainer = trainer
        self.eval_every = eval_every
        self.max_steps = plan.max_steps if plan is not None else None
        # The Runner should run this many steps: the requested rounds, or fewer if the budget ends first.
        self.rounds = min(rounds, self.max_steps) if self.max_steps is not None else rounds

    @property
    def delta(self) -> float | None:
        return self.plan.delta if self.plan is not None else None

    def close(self) -> None:
        """Remove Opacus' hooks from the model and close the wrapped algorithm."""
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        self.inner.close()

    def budget_spent(self, record: Mapping[str, Any] | None = None) -> bool:
        """Runner ``stop`` callback: True once another step would exceed the privacy budget."""
        return self.max_steps is not None and self.inner.round >= self.max_steps

    def step(self) -> dict[str, Any]:
        if self.budget_spent():
            raise PrivacyError(
                f"privacy budget spent: {self.max_steps} steps reach epsilon {self.epsilon():.4g} "
                f"<= {self.plan.budget} at delta {self.delta:.3g}; no further step is allowed"
            )
        if self.trainer is not None:
            self.trainer.results.clear()
        record = self.inner.step()
        if self.aggregator is not None:
            record.update(self.aggregator.last_metrics)
            if self.round % self.eval_every == 0 or self.round >= self.rounds:
                record.update(epsilon=self.epsilon(), delta=self.delta, noise_multiplier=self.plan.noise_multiplier)
            if self.budget_spent():
                record["privacy_budget_spent"] = True
        if self.trainer is not None and self.trainer.results:
            eps = [r.epsilon for r in self.trainer.results]
            record.update(sample_epsilon_max=max(eps), sample_epsilon_mean=sum(eps) / len(eps))
        return record

    def epsilon(self, steps: int | None = None) -> float:
        """User-level epsilon at ``self.delta`` after ``steps`` server steps (default: those taken)."""
        if self.plan is None:
            raise PrivacyError("no user-level DP in this run: there is no user-level epsilon")
        p = self.plan
        return epsilon(
            p.noise_multiplier, p.sample_rate, self.round if steps is None else steps, p.delta, self.spec.accountant
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.inner.state_dict()
        if self.aggregator is not None:
            state["privacy.clip_norm"] = torch.tensor(self.aggregator.clip_norm, dtype=torch.float64)
            state["privacy.releases"] = torch.tensor(self.aggregator.releases)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        clip = state.pop("privacy.clip_norm", None)
        releases = state.pop("privacy.releases", None)
        if self.aggregator is not None and (clip is None or releases is None):
            raise ValueError(
                "checkpoint has no user-level DP state (privacy.clip_norm, privacy.releases): it was not written by a private run"
            )
        self.inner.load_state_dict(state)
        if self.aggregator is not None:
            self.aggregator.clip_norm = float(clip)
            self.aggregator.releases = int(releases)


def make_private(
    algorithm_class,
    kwargs: Mapping[str, Any],
    spec: PrivacySpec | Mapping[str, Any],
    *,
    rounds: int,
    eval_every: int = 1,
) -> PrivateAlgorithm:
    """Build ``algorithm_class(**kwargs)`` with DP composed in, and wrap it (see :class:`PrivacyParts`).

    Refuses, with the reason, settings it cannot honour, before anything is built.  The model is
    prepared for DP-SGD (recurrent layers -> Opacus' DP layers) before the algorithm binds it.
    """
    parts = PrivacyParts(spec, algorithm_class.shape(**kwargs), rounds=rounds, eval_every=eval_every)
    prepare_model(kwargs["model"], parts.spec)
    return parts.wrap(algorithm_class(**kwargs, components=parts.components))


def describe(private: PrivateAlgorithm) -> str:
    """One line about the guarantee, for logs."""
    parts = []
    if private.aggregator is not None:
        a, p = private.aggregator, private.plan
        eps = private.epsilon(private.rounds)
        parts.append(
            f"user-level DP-FedAvg: S={a.clip_norm:g}{' (adaptive)' if a.adaptive else ''}, z={p.noise_multiplier:.4g}, "
            f"q={p.sample_rate:.4g}, {private.rounds} steps -> epsilon {eps:.4g} at delta {p.delta:.3g} "
            f"({private.spec.accountant.upper()})"
        )
    if private.trainer is not None:
        d = private.trainer.dp
        parts.append(f"sample-level DP-SGD: C={d.max_grad_norm:g}, sigma={d.noise_multiplier:g}")
    return "; ".join(parts) if parts else "no DP"


__all__ = [
    "PrivacyParts",
    "PrivacySpec",
    "PrivateAlgorithm",
    "UserLevelPlan",
    "describe",
    "make_private",
    "plan_user_level",
    "prepare_model",
]
