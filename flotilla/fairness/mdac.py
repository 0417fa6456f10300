"""RF^2's fairness measure: per-tier relative change and MDAC.

r_t  = (metric with the optimisation - metric without) / metric without, for each tier t;
MDAC = max over tier pairs |r_i - r_j|  (0: every tier gains or loses the same fraction).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations


def relative_changes(with_opt: Mapping[str, float], without: Mapping[str, float]) -> dict[str, float]:
    """r_t for every tier present in both; a tier whose baseline metric is 0 is refused (r undefined)."""
    out = {}
    for t, base in without.items():
        if t not in with_opt:
            continue
        if base == 0:
            raise ValueError(f"tier {t}: the metric without the optimisation is 0; the relative change is undefined")
        out[t] = (with_opt[t] - base) / base
    return out


def mdac(changes: Mapping[str, float]) -> float:
    """Maximum difference of the tiers' relative changes (needs at least two tiers)."""
    if len(changes) < 2:
        raise ValueError(f"MDAC needs at least two tiers, got {len(changes)}")
    return max(abs(a - b) for a, b in combinations(changes.values(), 2))


def tier_values(record: Mapping[str, object], metric: str, tiers=("low", "mid", "high")) -> dict[str, float]:
    """{tier: value} of ``tier_<t>_<metric>`` in one metrics record (tiers without it left out)."""
    out = {}
    for t in tiers:
        v = record.get(f"tier_{t}_{metric}")
        if v is not None:
            out[t] = float(v)
    return out
