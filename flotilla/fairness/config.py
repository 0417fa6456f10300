"""The ``tiers:`` config section (pydantic; imported by :mod:`flotilla.config`, kept torch-free).

```yaml
tiers:
  assignment: dirichlet        # random (client index mod 3) | dirichlet (RF^2)
  alpha: 0.005                 # dirichlet concentration (RF^2's default)
  items: auto                  # what a client holds for dirichlet: auto | labels | plays | clicks
  speed: benchmarkme           # or {low: 0.2, mid: 0.5, high: 1.0}: multipliers of fleet.speed
  bandwidth: {low: 1, mid: 1, high: 1}   # multipliers of fleet.bandwidth_*_mbps
  # tier-aware system optimisations (combinable; none by default)
  exclude_low: false           # never select the low tier
  over_select: 0.0             # select cohort x (1 + this), drop the slowest (low first, then mid)
  quantize_bits: {low: 4, mid: 8}        # stochastic quantisation of a tier's updates (tiers not named: full precision)
  prune_keep: {low: 0.25, mid: 0.5}      # random gradient pruning: fraction of a tier's update kept
  heterofl_width: {low: 0.25, mid: 0.5}  # HeteroFL: fraction of an MLP's hidden units a tier trains
```
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from flotilla.core.schema import Section

TIER_NAMES = ("low", "mid", "high")


def _per_tier(v: Any, *, full: bool, low: float, high: float | None, integer: bool = False, low_open: bool = True):
    """Validate a {tier: number} mapping: known tier names, numbers in range; ``full``: all three given."""
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping of tier to value, e.g. {{low: ..., mid: ..., high: ...}}, got {v!r}")
    for k, x in v.items():
        if k not in TIER_NAMES:
            raise ValueError(f"unknown tier {k!r} (the tiers are {', '.join(TIER_NAMES)})")
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)):
            raise ValueError(f"{k}: must be {'an integer' if integer else 'a number'}, got {x!r}")
        if (x <= low if low_open else x < low) or (high is not None and x > high):
            rng = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise ValueError(f"{k}: must be {rng}, got {x}")
    if full and set(v) != set(TIER_NAMES):
        missing = [t for t in TIER_NAMES if t not in v]
        raise ValueError(f"give all of {', '.join(TIER_NAMES)} (missing {', '.join(missing)})")
    return {t: v[t] for t in TIER_NAMES if t in v}


class TiersConfig(Section):
    assignment: Literal["random", "dirichlet"] = Field(
        "random", description="random: tier = client index mod 3; dirichlet: RF^2's data-correlated assignment"
    )
    alpha: float = Field(
        0.005,
        description="dirichlet: concentration of the per-item tier shares (small: clients sharing items share a tier)",
    )
    items: Literal["auto", "labels", "plays", "clicks"] = Field(
        "auto",
        description="dirichlet: what a client holds (auto: clicks for movielens, plays for shakespeare, else labels)",
    )
    speed: Any = Field(
        "benchmarkme",
        description="tier speed multipliers {low, mid, high} (of fleet.speed), or benchmarkme: terciles of 1,736 real machines",
    )
    bandwidth: Any = Field(
        default_factory=lambda: {"low": 1.0, "mid": 1.0, "high": 1.0},
        description="tier bandwidth multipliers {low, mid, high} (of fleet.bandwidth_*_mbps)",
    )
    exclude_low: bool = Field(False, description="optimisation: never select a low-tier client")
    over_select: float = Field(
        0.0, ge=0, le=10, description="optimisation: select cohort x (1 + this) and drop the slowest (low, then mid)"
    )
    quantize_bits: Any = Field(
        None, description="optimisation: {tier: bits 1..8} stochastic quantisation of that tier's updates"
    )
    prune_keep: Any = Field(
        None, description="optimisation: {tier: fraction in (0, 1]} of that tier's update kept (random pruning)"
    )
    heterofl_width: Any = Field(
        None,
        description="optimisation: {tier: fraction in (0, 1]} of an MLP's hidden units that tier trains (HeteroFL)",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if not v > 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("speed")
    @classmethod
    def _speed(cls, v):
        if v == "benchmarkme":
            return v
        if isinstance(v, str):
            raise ValueError(f"must be benchmarkme or a mapping {{low, mid, high}} of multipliers, got {v!r}")
        return _per_tier(v, full=True, low=0.0, high=None)

    @field_validator("bandwidth")
    @classmethod
    def _bandwidth(cls, v):
        return _per_tier(v, full=True, low=0.0, high=None)

    @field_validator("quantize_bits")
    @classmethod
    def _bits(cls, v):
        return None if v is None else _per_tier(v, full=False, low=1, high=8, integer=True, low_open=False)

    @field_validator("prune_keep", "heterofl_width")
    @classmethod
    def _fraction(cls, v):
        return None if v is None else _per_tier(v, full=False, low=0.0, high=1.0)

    def optimisations(self) -> list[str]:
        """The keys of the optimisations switched on (empty: a baseline run)."""
        on = []
        if self.exclude_low:
            on.append("exclude_low")
        if self.over_select > 0:
            on.append("over_select")
        for k in ("quantize_bits", "prune_keep", "heterofl_width"):
            if getattr(self, k):
                on.append(k)
        return on


def check_experiment(cfg) -> None:
    """What the tiers section needs from the rest of the experiment config (raises naming the key)."""
    t = cfg.tiers
    if t is None:
        return
    on = t.optimisations()
    if not on:
        return
    fleet = cfg.fleet is not None or cfg.mode == "async"
    for key in ("exclude_low", "over_select"):
        if key in on and fleet:
            raise ValueError(
                f"tiers.{key}: selection by tier is for sync rounds without a fleet; on a fleet the round "
                "keeps the first arrivals, so slow tiers drop out by their trip time (fleet.over_selection)"
            )
    if "heterofl_width" in on and cfg.mode == "async":
        raise ValueError("tiers.heterofl_width: needs round aggregation (mode: sync); the async buffer has no masks")
    if cfg.workers > 1 or cfg.runtime is not None:
        raise ValueError(f"tiers.{on[0]}: the tier optimisations run in-process only; remove workers / runtime")
    for section in ("privacy", "secure_aggregation"):
        if getattr(cfg, section) is not None:
            raise ValueError(f"tiers.{on[0]}: not combined with {section} (both would change the cohort or updates)")
    if cfg.client.algorithm is not None:
        raise ValueError(f"tiers.{on[0]}: not combined with client.algorithm (both replace the client update)")
