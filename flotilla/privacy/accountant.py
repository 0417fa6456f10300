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
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

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
    return _prv_epsilon(history, delta)


# PRV's error: Opacus' default ``eps_error=0.01`` is absolute, 4% of an epsilon of 0.25.  We ask for
# 0.1% of the value instead; below epsilon 0.1 the floor (1e-4, i.e. 0.1% at 0.1, 1% at 0.01) keeps the
# cost bounded: Opacus' mesh, and with it the time, grows as 1 / eps_error.
PRV_RELATIVE_ERROR = 1e-3
PRV_MIN_ERROR = 1e-4
_PRV_DEFAULT_ERROR = 0.01  # Opacus' default, used for the first estimate
_TOP_FIRST_LIMIT = 100_000  # max_steps tries the limit first up to here


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' PRV upper bound on epsilon with an error of ``PRV_RELATIVE_ERROR`` of the value: a cheap
    first estimate at Opacus' default error sets the error of a second, finer call."""
    acc = create_accountant("prv")
    acc.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rough = float(acc.get_epsilon(delta=delta, eps_error=_PRV_DEFAULT_ERROR))  # an upper bound itself
        eps_error = max(PRV_RELATIVE_ERROR * rough, PRV_MIN_ERROR)
        if eps_error >= _PRV_DEFAULT_ERROR:  # epsilon >= 10: the first call is already within 0.1%
            return max(rough, 0.0)
        try:
            fine = float(acc.get_epsilon(delta=delta, eps_error=eps_error))
        except ValueError:  # Opacus: the finer mesh is too large for float precision at this delta
            return max(rough, 0.0)
    return max(min(fine, rough), 0.0)  # both are upper bounds: keep the tighter


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    kind: str = "rdp",
    where: str = "privacy.user_level.target_epsilon",
) -> float:
    """The smallest noise multiplier such that ``steps`` steps at ``sample_rate`` stay within
    ``(target_epsilon, delta)`` by :func:`epsilon` itself (so the run's reported epsilon never exceeds
    the target): RDP to Opacus' binary-search tolerance (0.01 in epsilon), PRV to
    ``PRV_RELATIVE_ERROR`` of the target."""
    _check(kind)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"{where}: must be a positive finite number, got {target_epsilon}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # PRV starts from the RDP answer (cheap; PRV is tighter, so it is usually already enough noise)
            z = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                )
            )
        if kind == "prv":
            z = _calibrate_prv(z, target_epsilon, delta, sample_rate, steps)
        return z
    except ValueError as e:  # Opacus gives up past noise multiplier 1e6
        raise PrivacyError(
            f"{where}: epsilon={target_epsilon} at delta={delta} cannot be met in {steps} steps at sampling "
            f"rate q={sample_rate:.4g} (it would need a noise multiplier above 1e6: {e}); raise the target, "
            f"run fewer rounds or sample a smaller cohort"
        ) from None


def _calibrate_prv(z0: float, target: float, delta: float, q: float, steps: int) -> float:
    """The smallest z with PRV ``epsilon(z) <= target``, to ``PRV_RELATIVE_ERROR`` of the target, from
    ``z0``.  Secant steps on log epsilon against log z (nearly a line: epsilon ~ 1/z), always inside a
    bracket ``lo < z <= hi`` with ``epsilon(lo) > target >= epsilon(hi)``; a bisection step whenever the
    same end moved twice running.  Each step is a fine PRV evaluation, so few steps matter (3-5)."""

    def f(z: float) -> float:  # log(epsilon / target), decreasing in z
        e = epsilon(z, q, steps, delta, "prv")
        return math.log(e / target) if e > 0 else -math.inf

    done = math.log1p(-PRV_RELATIVE_ERROR)  # stop once log(1 - tol) <= f(hi) <= 0
    aim = done / 2
    hi, f_hi = z0, f(z0)
    lo, f_lo = None, None
    while f_hi > 0:  # PRV above the target at z0 (unusual): more noise
        lo, f_lo = hi, f_hi
        hi *= 1.25
        if hi > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
        f_hi = f(hi)
    slope, last_moved, bisect = -1.0, None, False
    for _ in range(60):
        if f_hi >= done or (lo is not None and hi - lo <= 1e-9 * hi):
            break
        x_hi = math.log(hi)
        if lo is None:  # no lower end yet: a step along the slope, at most a factor 4 down
            x = x_hi - math.log(4.0)
            if math.isfinite(f_hi):
                x = max(x_hi + (aim - f_hi) / slope, x)
        else:
            x_lo = math.log(lo)
            x = (x_lo + x_hi) / 2
            if not bisect and math.isfinite(f_hi):
                sec = x_hi + (aim - f_hi) * (x_hi - x_lo) / (f_hi - f_lo)
                x = sec if x_lo < sec < x_hi else x
        z = math.exp(x)
        fz = f(z)
        moved = "lo" if fz > 0 else "hi"
        bisect, last_moved = moved == last_moved, moved
        if moved == "lo":
            lo, f_lo = z, fz
        else:
            if lo is None and math.isfinite(fz) and math.isfinite(f_hi) and fz < f_hi:
                slope = (fz - f_hi) / (x - x_hi)  # measured: negative, and always a step down from hi
            hi, f_hi = z, fz
    return hi


def max_steps(
    noise_multiplier: float, sample_rate: float, delta: float, budget: float, kind: str = "rdp", limit: int = 10**7
) -> int:
    """The largest number of steps whose epsilon stays <= ``budget`` (0 if even one step exceeds it)."""

    def within(t: int) -> bool:
        return epsilon(noise_multiplier, sample_rate, t, delta, kind) <= budget

    if not within(1):
        return 0
    # The common cases cost two evaluations, not a search: a budget that does not bind, or a target
    # the noise was calibrated to (limit = rounds + 1).  Not for a huge limit: PRV there takes minutes.
    top_known_over = False
    if limit <= _TOP_FIRST_LIMIT:
        if within(limit - 1):
            return limit if within(limit) else limit - 1
        top_known_over = True
    lo, hi = 1, 2
    while hi < limit and within(hi):
        lo, hi = hi, hi * 2
    if hi >= limit:
        if not top_known_over and within(limit):
            return limit
        hi = limit
    while hi - lo > 1:  # invariant: eps(lo) <= budget < eps(hi)
        mid = (lo + hi) // 2
        if within(mid):
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
