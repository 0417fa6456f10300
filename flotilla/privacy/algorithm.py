"""Turn a training algorithm into a private one: wiring, accounting, budget, metrics, state.

    prepare_model(model, spec)                      # before the algorithm binds the model (DPLSTM swap)
    algorithm = SyncFedAvg(model, dataset, loss, cohort=..., weighting="uniform", ...)
    private = make_private(algorithm, spec, rounds=R, eval_every=E)
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
            raise PrivacyError("privacy: give sample_level and/or user_level (an empty privacy section protects nothing)")

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
            user = dict(user)
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
    noise_multiplier: float   # z (calibrated from target_epsilon, or as given)
    sample_rate: float        # q = expected cohort (or buffer) / population
    delta: float
    expected_cohort: float    # m: the sum is divided by this
    budget: float | None      # epsilon at which training stops (None: no budget, just report)
    max_steps: int | None     # steps affordable within the budget (capped at rounds + 1: "does not bind")
    rounds: int               # steps the run will take: min(requested rounds, max_steps)


@lru_cache(maxsize=64)
def plan_user_level(u: UserLevelSpec, *, population: int, expected_cohort: float, rounds: int, accountant: str = "rdp") -> UserLevelPlan:
    """Check ``u`` against the population and the schedule, calibrate z, and size the budget.

    Raises :class:`PrivacyError` naming the key for: delta >= 1/population, a target epsilon that
    no noise multiplier can meet in ``rounds`` steps, a budget below one step's epsilon, an adaptive
    clipping count noise too small for z.  Called by the config path before any work starts and
    again by :func:`make_private`.
    """
    if not 0 < expected_cohort <= population:
        raise PrivacyError(f"privacy.user_level: expected cohort {expected_cohort} must be in (0, population={population}]")
    q = expected_cohort / population if u.amplification else 1.0
    delta = u.resolved_delta(population)
    z = u.noise_multiplier if u.noise_multiplier is not None else calibrate_noise(u.target_epsilon, delta, q, rounds, accountant)
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
                f"noise multiplier {z:.4g}, q={q:.4g}, delta={delta:.3g}); raise it or the noise")
    return UserLevelPlan(z, q, delta, expected_cohort, budget, steps, min(rounds, steps) if steps is not None else rounds)


def prepare_model(model: nn.Module, spec: PrivacySpec | None) -> nn.Module:
    """In place, before any FlatModel is built on ``model``: swap recurrent layers for Opacus' DP
    layers when sample-level DP is on (no-op otherwise)."""
    if spec is not None and spec.sample_level is not None:
        make_dp_compatible(model)
    return model


def _kind(algorithm) -> str:
    """Which mechanism covers ``algorithm``: 'sync' rounds, or the 'fedbuff' buffer."""
    from flotilla.sim.sync import SyncFedAvg
    if isinstance(algorithm, SyncFedAvg):
        return "sync"
    try:
        from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim
    except ImportError:  # pragma: no cover - the fleet simulator is part of Flotilla
        AsyncFleetSim = SyncFleetSim = ()
    if isinstance(algorithm, AsyncFleetSim):
        if algorithm.algorithm != "fedbuff":
            raise PrivacyError(f"privacy.user_level: async.algorithm={algorithm.algorithm} is not covered: it applies every "
                               f"client update on its own; user-level DP here is DP-FedBuff (one noise release per buffer of K)")
        if algorithm.null_client:
            raise PrivacyError("privacy: the null client trains nothing, there is nothing to privatise")
        return "fedbuff"
    if isinstance(algorithm, SyncFleetSim):
        raise PrivacyError("privacy.user_level: a sync fleet round keeps the first arrivals (over-selection, deadline), a "
                           "cohort sampling the accountant does not cover; use SyncFedAvg or FedBuff")
    raise PrivacyError(
        f"privacy.user_level: {type(algorithm).__name__} is not covered: user-level DP here is DP-FedAvg over "
        f"synchronous rounds (SyncFedAvg) or DP-FedBuff over a buffer of K updates; an algorithm that applies each "
        f"client's update on its own (e.g. FedAsync) would need one noise release per client update")


class PrivateAlgorithm:
    """A training algorithm with sample- and/or user-level DP (see module docstring)."""

    def __init__(self, inner, spec: PrivacySpec, *, rounds: int, eval_every: int = 1,
                 aggregator: DPFedAvg | None = None, plan: UserLevelPlan | None = None,
                 trainer: DPLocalTrainer | None = None):
        if (aggregator is None) != (plan is None):
            raise ValueError("PrivateAlgorithm: user-level DP needs both the aggregator and its plan")
        self.inner = inner
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

    # -- the algorithm interface the Runner drives ---------------------------------------------
    @property
    def round(self) -> int:
        return self.inner.round

    @property
    def weights(self) -> torch.Tensor:
        return self.inner.weights

    @property
    def flat(self):
        return self.inner.flat

    def __getattr__(self, name):  # anything else (sim clocks, dataset, ...) is the inner algorithm's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        """Remove Opacus' hooks from the model and close the wrapped algorithm (if it has close())."""
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def budget_spent(self, record: Mapping[str, Any] | None = None) -> bool:
        """Runner ``stop`` callback: True once another step would exceed the privacy budget."""
        return self.max_steps is not None and self.inner.round >= self.max_steps

    def step(self) -> dict[str, Any]:
        if self.budget_spent():
            raise PrivacyError(f"privacy budget spent: {self.max_steps} steps reach epsilon {self.epsilon():.4g} "
                               f"<= {self.plan.budget} at delta {self.delta:.3g}; no further step is allowed")
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
        return epsilon(p.noise_multiplier, p.sample_rate, self.round if steps is None else steps, p.delta, self.spec.accountant)

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
            raise ValueError("checkpoint has no user-level DP state (privacy.clip_norm, privacy.releases): it was not written by a private run")
        self.inner.load_state_dict(state)
        if self.aggregator is not None:
            self.aggregator.clip_norm = float(clip)
            self.aggregator.releases = int(releases)


def make_private(algorithm, spec: PrivacySpec | Mapping[str, Any], *, rounds: int, eval_every: int = 1) -> PrivateAlgorithm:
    """Wire DP into ``algorithm`` (a SyncFedAvg or a FedBuff-style algorithm) and wrap it.

    ``rounds`` is the number of server steps planned (``target_epsilon`` is calibrated for it).
    Refuses, with the reason, settings it cannot honour; ``algorithm`` is modified only after
    every check has passed.
    """
    spec = PrivacySpec.from_dict(spec)
    kind = None
    if getattr(algorithm, "workers", 1) > 1:
        raise PrivacyError("workers: DP trains every client in one process (per-client clipping, noise and "
                           "accounting in the parent); use workers=1")
    aggregator = plan = None
    if spec.user_level is not None:
        u = spec.user_level
        kind = _kind(algorithm)
        if getattr(algorithm, "weighting", "uniform") != "uniform":
            raise PrivacyError(f"weighting: user-level DP needs weighting='uniform' (got {algorithm.weighting!r}): "
                               f"weighting users by example count breaks the per-user sensitivity bound S")
        if kind == "fedbuff" and u.sampling == "poisson":
            raise PrivacyError("privacy.user_level.sampling: 'poisson' is for synchronous rounds; in FedBuff the buffer "
                               "fills with whichever K updates arrive first (see docs/privacy.md)")
        expected = float(algorithm.cohort if kind == "sync" else algorithm.buffer_size)
        plan = plan_user_level(u, population=algorithm.dataset.num_clients, expected_cohort=expected,
                               rounds=rounds, accountant=spec.accountant)
        if kind == "sync":
            aggregator = DPFedAvg(algorithm.flat.numel, clip_norm=u.clip_norm, noise_multiplier=plan.noise_multiplier,
                                  expected_cohort=expected, seed=algorithm.seed, adaptive=u.adaptive_clipping)
        else:
            from flotilla.privacy.fedbuff import DPFedBuff
            dp_buffer = DPFedBuff(algorithm.server.buffer, clip_norm=u.clip_norm, noise_multiplier=plan.noise_multiplier,
                                  seed=algorithm.seed, adaptive=u.adaptive_clipping)
            aggregator = dp_buffer.mechanism
    trainer = None
    if spec.sample_level is not None:
        old = algorithm.trainer
        dp = dataclasses.replace(spec.sample_level, accountant=spec.accountant)
        trainer = DPLocalTrainer(algorithm.flat, old.loss_fn, old.spec, dp)   # the last check; attaches hooks
    # All checks passed: now modify the algorithm.
    if aggregator is not None and kind == "fedbuff":
        algorithm.server.buffer = dp_buffer
    elif aggregator is not None:
        algorithm.aggregator = aggregator
        if spec.user_level.sampling == "poisson":
            algorithm.sample_cohort = poisson_cohort
    if trainer is not None:
        algorithm.trainer = trainer
    return PrivateAlgorithm(algorithm, spec, rounds=rounds, eval_every=eval_every, aggregator=aggregator, plan=plan, trainer=trainer)


def with_privacy(cfg, task, build):
    """Config-driven runtimes: ``build()`` the algorithm for ``cfg`` with ``cfg.privacy`` wired in.

    Returns ``(algorithm, rounds)``: the algorithm itself and ``cfg.rounds`` when there is no
    ``privacy:`` section; otherwise the :class:`PrivateAlgorithm` and the rounds the budget allows.
    The model is prepared (DPLSTM swap) before ``build`` binds it to a flat vector.
    """
    if getattr(cfg, "privacy", None) is None:
        return build(), cfg.rounds
    spec = PrivacySpec.from_dict(cfg.privacy.model_dump())
    prepare_model(task.model, spec)
    private = make_private(build(), spec, rounds=cfg.rounds, eval_every=cfg.eval.every)
    return private, private.rounds


def describe(private: PrivateAlgorithm) -> str:
    """One line about the guarantee, for logs."""
    parts = []
    if private.aggregator is not None:
        a, p = private.aggregator, private.plan
        eps = private.epsilon(private.rounds)
        parts.append(f"user-level DP-FedAvg: S={a.clip_norm:g}{' (adaptive)' if a.adaptive else ''}, z={p.noise_multiplier:.4g}, "
                     f"q={p.sample_rate:.4g}, {private.rounds} steps -> epsilon {eps:.4g} at delta {p.delta:.3g} "
                     f"({private.spec.accountant.upper()})")
    if private.trainer is not None:
        d = private.trainer.dp
        parts.append(f"sample-level DP-SGD: C={d.max_grad_norm:g}, sigma={d.noise_multiplier:g}")
    return "; ".join(parts) if parts else "no DP"


__all__ = ["PrivacySpec", "PrivateAlgorithm", "UserLevelPlan", "describe", "make_private", "plan_user_level", "prepare_model",
           "with_privacy"]
