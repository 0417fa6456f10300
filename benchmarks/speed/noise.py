"""Is a speed ratio beyond the harness's own noise?  (Pure functions; run.py and tests use them.)

Rule: over repeats, framework A's steady s/round values span [min_a, max_a] and B's span
[min_b, max_b].  The ratio of medians A/B is called *beyond noise* only when the two ranges do
not overlap (every A repeat faster than every B repeat, or every one slower); otherwise it is
*within noise*.  With 3 repeats each, non-overlap has a chance of 2/20 = 10% when A and B are
really equal (any of the 20 interleavings of 6 exchangeable values, 2 of them separated); with
5 repeats 2/252 < 1%.  Conservative and assumption-free: a ratio that survives it is real.
"""

from __future__ import annotations

import math
import statistics


def spread(values: list[float]) -> dict:
    """Median, min, max of ``values`` (an empty list gives Nones)."""
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def verdict(a: list[float], b: list[float]) -> dict:
    """Ratio of medians a/b with its noise verdict: ``{"ratio", "lo", "hi", "beyond_noise", "text"}``.

    ``lo``/``hi`` are the extreme ratios the ranges allow (min_a/max_b, max_a/min_b).
    """
    sa, sb = spread(a), spread(b)
    if not sa["n"] or not sb["n"] or not sb["median"] or not sb["min"]:
        return {"ratio": None, "lo": None, "hi": None, "beyond_noise": False, "text": "no data"}
    ratio = sa["median"] / sb["median"]
    lo, hi = sa["min"] / sb["max"], sa["max"] / sb["min"]
    beyond = sa["max"] < sb["min"] or sa["min"] > sb["max"]
    if sa["n"] < 2 or sb["n"] < 2:
        beyond, why = False, "within noise (fewer than 2 repeats each: no spread to judge)"
    elif beyond:
        why = "beyond noise (ranges do not overlap)"
    else:
        why = "within noise (ranges overlap)"
    return {
        "ratio": ratio,
        "lo": lo,
        "hi": hi,
        "beyond_noise": beyond,
        "text": f"{ratio:.2f}x [{lo:.2f}-{hi:.2f}], {why}",
    }


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median: order statistics chosen by the
    binomial (sign-test) rule, so it assumes nothing about the shape of the noise.  ``None`` when
    there are too few values for any interval at that confidence (fewer than 6 at 95%)."""
    vals = sorted(float(v) for v in values)
    n = len(vals)
    alpha = 1.0 - confidence
    # k = the largest count with P(Binomial(n, 1/2) < k) <= alpha / 2; the interval is the k-th
    # smallest to the k-th largest value.
    k, cdf = 0, 0.0
    for j in range(n + 1):
        p = math.comb(n, j) / 2.0**n
        if cdf + p > alpha / 2:
            break
        cdf += p
        k = j + 1
    if k < 1:
        return None
    return vals[k - 1], vals[n - k]


def paired_verdict(ratios: list[float], limit: float, confidence: float = 0.95) -> dict:
    """Per-pair ratios A/B (A and B timed back to back, many times) against a ``limit``.

    ``at_most_limit`` is True only when the whole confidence interval of the median ratio lies at
    or under ``limit``; ``above_limit`` only when it lies wholly above; otherwise the data cannot
    tell, and the text says so."""
    ci = median_ci(ratios, confidence)
    med = statistics.median(ratios) if ratios else None
    if ci is None:
        return {
            "median": med,
            "lo": None,
            "hi": None,
            "at_most_limit": False,
            "above_limit": False,
            "text": f"too few pairs ({len(ratios)}) for a {confidence:.0%} interval",
        }
    lo, hi = ci
    at_most, above = hi <= limit, lo > limit
    why = (
        f"at most {limit:g}x shown"
        if at_most
        else f"above {limit:g}x shown"
        if above
        else f"not resolved against {limit:g}x"
    )
    return {
        "median": med,
        "lo": lo,
        "hi": hi,
        "at_most_limit": at_most,
        "above_limit": above,
        "text": f"{med:.3f}x, {confidence:.0%} CI [{lo:.3f}-{hi:.3f}] over {len(ratios)} pairs: {why}",
    }
