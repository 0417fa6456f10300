"""Accountant precision (issue 11 item 17): PRV epsilon to 0.1% of its value, checked against Google's
dp-accounting PLD accountant; PRV calibration consistent with the epsilon the run reports; max_steps
equal to a plain scan."""

import pytest

from flotilla.privacy.accountant import calibrate_noise, epsilon, max_steps

PRV_RELATIVE_ERROR = 1e-3  # flotilla.privacy.accountant.PRV_RELATIVE_ERROR: what the issue asks for

dp_accounting = pytest.importorskip("dp_accounting")


def pld_epsilon(z, q, steps, delta):
    """dp-accounting's PLD accountant, pessimistic, at a fine discretisation (1e-4: ~0.05% here)."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("z, q, steps, delta", [(3.0, 0.05, 20, 1e-5), (2.0, 0.01, 100, 1e-5)])
def test_prv_epsilon_below_half_agrees_with_dp_accounting(z, q, steps, delta):
    """At epsilon ~0.2-0.3 Opacus' default absolute error (0.01) was 3.5-5% of the value (0.3012 vs
    PLD's 0.2911; 0.1998 vs 0.1898); docs/privacy.md promises 2%.  Now PRV is an upper bound within
    0.1% (+ PLD's own discretisation) of PLD."""
    ours, theirs = epsilon(z, q, steps, delta, "prv"), pld_epsilon(z, q, steps, delta)
    assert ours < 0.5
    assert ours == pytest.approx(theirs, rel=0.02)  # the documented promise
    assert 0.998 * theirs < ours < theirs * (1 + 3 * PRV_RELATIVE_ERROR)  # what we measure: ~0.11% above


def test_prv_calibration_meets_the_target_by_the_reported_epsilon():
    """target_epsilon with the PRV accountant: the calibrated z gives an epsilon (as the run reports it)
    within 0.1% below the target, agrees with PLD, and the budget check keeps every round."""
    target, q, steps, delta = 0.3, 0.05, 20, 1e-5
    z = calibrate_noise(target, delta, q, steps, "prv")
    eps = epsilon(z, q, steps, delta, "prv")
    assert target * (1 - PRV_RELATIVE_ERROR) <= eps <= target
    assert pld_epsilon(z, q, steps, delta) == pytest.approx(target, rel=0.02)
    assert max_steps(z, q, delta, target, "prv", limit=steps + 1) == steps  # the run is not cut short
    # less noise than Opacus' own calibration at its 0.01 absolute tolerance (z = 3.047, 3.5% over)
    assert z < 2.95


@pytest.mark.parametrize("budget", [1.5, 2.0, 2.76, 4.0, 7.0])  # epsilon(1) = 1.77, (9) = 2.76, (101) = 6.64
@pytest.mark.parametrize("limit", [1, 2, 9, 40, 101])
def test_max_steps_is_the_largest_affordable_step_count(budget, limit):
    """The searched answer equals a plain scan (RDP: exact and cheap), whatever the budget and limit."""
    z, q, delta = 1.1, 0.1, 1e-5
    affordable = [t for t in range(1, limit + 1) if epsilon(z, q, t, delta) <= budget]
    assert max_steps(z, q, delta, budget, limit=limit) == (max(affordable) if affordable else 0)
