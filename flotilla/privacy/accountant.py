"""Privacy accounting: thin helpers over Opacus' own accountants (nothing re-derived here).

Both sample-level DP-SGD and user-level DP-FedAvg are *subsampled Gaussian mechanisms*: each step
samples every unit (an example, a user) independently with probability ``q``, clips each unit's
contribution to L2 norm C, and adds N(0, (z C)^2) to the sum.  Opacus' RDP accountant
(Mironov et al. 2019) and PRV accountant (Gopi et al. 2021) bound the (epsilon, delta) of ``steps``
such compositions; we only choose ``(z, q, steps)`` and ask them.

    q = batch / client examples   (sample level, one client's local training)
    q = cohort / population       (user level, one server step)
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as analysis
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


class PrivacyError(ValueError):
    """A privacy setting that cannot be honoured; the message names the key and the reason."""


def _check(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise PrivacyError(f"privacy.accountant: must be one of {ACCOUNTANTS}, got {kind!r}")


_ALPHAS = list(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ALPHAS)


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str = "rdp") -> float:
    """epsilon at ``delta`` after ``steps`` subsampled Gaussian steps (Opacus accountant ``kind``).

    ``noise_multiplier == 0`` (no noise) gives ``inf``; ``steps == 0`` gives 0.
    """
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, kind)


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float, kind: str = "rdp") -> float:
    """epsilon at ``delta`` of a composition of ``(noise_multiplier, sample_rate, steps)`` runs of the
    subsampled Gaussian (e.g. one device's DP-SGD over several participations)."""
    _check(kind)
    history = [(float(z), float(q), int(t)) for z, q, t in history if int(t) > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    if kind == "rdp":
        # Exactly RDPAccountant.get_epsilon, with the per-step RDP curve cached: T steps cost T x one step.
        rdp = sum(_rdp_one_step(z, q) * t for z, q, t in history)
        eps, _ = analysis.get_privacy_spent(orders=_ALPHAS, rdp=rdp, delta=delta)
        return max(float(eps), 0.0)  # the RDP conversion can dip below 0 at large delta: (0, delta)-DP holds
    acc = create_accountant(kind)
    acc.history = history
    with warnings.catch_warnings():
        # RDP: "optimal order is the largest alpha" only means the bound could be a bit tighter.
        warnings.simplefilter("ignore")
        return max(float(acc.get_epsilon(delta=delta)), 0.0)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    kind: str = "rdp", where: str = "privacy.user_level.target_epsilon") -> float:
    """The smallest noise multiplier (to Opacus' binary-search tolerance, 0.01 in epsilon) such
    that ``steps`` steps at ``sample_rate`` stay within ``(target_epsilon, delta)``."""
    _check(kind)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"{where}: must be a positive finite number, got {target_epsilon}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=kind))
    except ValueError as e:  # Opacus gives up past noise multiplier 1e6
        raise PrivacyError(
            f"{where}: epsilon={target_epsilon} at delta={delta} cannot be met in {steps} steps at sampling "
            f"rate q={sample_rate:.4g} (it would need a noise multiplier above 1e6: {e}); raise the target, "
            f"run fewer rounds or sample a smaller cohort") from None


def max_steps(noise_multiplier: float, sample_rate: float, delta: float, budget: float,
              kind: str = "rdp", limit: int = 10**7) -> int:
    """The largest number of steps whose epsilon stays <= ``budget`` (0 if even one step exceeds it)."""
    if epsilon(noise_multiplier, sample_rate, 1, delta, kind) > budget:
        return 0
    lo, hi = 1, 2
    while hi < limit and epsilon(noise_multiplier, sample_rate, hi, delta, kind) <= budget:
        lo, hi = hi, hi * 2
    if hi >= limit and epsilon(noise_multiplier, sample_rate, limit, delta, kind) <= budget:
        return limit
    while hi - lo > 1:  # invariant: eps(lo) <= budget < eps(hi)
        mid = (lo + hi) // 2
        if epsilon(noise_multiplier, sample_rate, mid, delta, kind) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def dpsgd_schedule(num_examples: int, batch_size: int, epochs: int = 1, steps: int | None = None) -> tuple[float, int]:
    """Sampling rate and step count of DP-SGD over ``num_examples`` as Opacus' ``make_private``
    sets them up for a DataLoader of ``batch_size``: ``q = 1 / ceil(n / B)`` (expected batch
    ``q n ~ B``) and ``ceil(n / B)`` steps per epoch, or exactly ``steps``."""
    if num_examples <= 0:
        raise ValueError("dpsgd_schedule: a client with no examples has no DP-SGD schedule")
    per_epoch = math.ceil(num_examples / batch_size)
    return 1.0 / per_epoch, (steps if steps is not None else epochs * per_epoch)
