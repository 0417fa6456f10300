"""Config sections ``fleet:`` and ``async:`` (pydantic; imported by :mod:`flotilla.config`).

Kept import-light (no torch) so that validating a config stays instant.  Every check names
its dotted key: ``fleet.speed.sigma: must be >= 0``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flotilla.core.schema import Section
from flotilla.fleet.availability import check_curve
from flotilla.fleet.distributions import make_distribution


class _Strict(Section):
    """Every fleet/async key: see flotilla.core.schema."""


class DistConfig(_Strict):
    """A distribution: ``{dist: lognormal, median: 20, sigma: 1}``; a bare number means constant."""

    dist: Literal["constant", "uniform", "exponential", "half-normal", "lognormal", "empirical"] = Field(
        description="distribution family; its parameters are the keys below (a bare number, e.g. speed: 20, means constant)"
    )
    value: float | None = Field(None, description="constant: the value")
    low: float | None = Field(None, description="uniform: lower end")
    high: float | None = Field(None, description="uniform: upper end")
    mean: float | None = Field(None, description="exponential: mean (added to min)")
    sd: float | None = Field(None, description="half-normal: standard deviation")
    min: float | None = Field(None, description="exponential / half-normal: shift (smallest value)")
    median: float | None = Field(None, description="lognormal: median")
    sigma: float | None = Field(None, description="lognormal: sigma of the log (heavier tail when larger)")
    file: str | None = Field(None, description="empirical: file of observed values (text or .npy)")

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, data: Any):
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"dist": "constant", "value": data}
        return data

    @model_validator(mode="after")
    def _params(self):
        # make_distribution's messages start with "distribution...": re-anchor them on this key.
        try:
            make_distribution(self.spec(), where="@")
        except ValueError as e:
            raise ValueError(str(e).removeprefix("@.").removeprefix("@: ").removeprefix("@")) from None
        return self

    def spec(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def _lognormal(median: float, sigma: float) -> DistConfig:
    return DistConfig(dist="lognormal", median=median, sigma=sigma)


class PerExampleConfig(_Strict):
    """FLSim per-example Gaussian durations: each trip takes examples x max(N(mean, sd), min) s."""

    mean: float = Field(..., gt=0, description="seconds per example")
    sd: float = Field(0.0, ge=0, description="standard deviation of seconds per example")
    min: float = Field(1e-6, gt=0, description="floor of seconds per example")


class AvailabilityConfig(_Strict):
    diurnal: list[float] | None = Field(
        None, description="24 fractions: probability a device is eligible in each local hour (default: always)"
    )
    timezone_spread_h: int = Field(0, ge=0, le=23, description="device clocks are offset by 0..N whole hours")
    session_s: DistConfig | None = Field(
        None, description="how long a device stays eligible once checked in; longer trips drop out"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a trip is abandoned (the result never arrives)")

    @field_validator("diurnal")
    @classmethod
    def _curve(cls, v):
        try:
            return check_curve(v, where="@")
        except ValueError as e:
            raise ValueError(str(e).removeprefix("@: ")) from None


class FleetConfig(_Strict):
    population: int = Field(1_000_000, ge=1, le=10**12, description="number of devices (no per-device memory)")
    device_to_client: Literal["modulo", "hash"] = Field(
        "modulo", description="device d trains on task client d % num_clients, or on a seeded hash of d"
    )
    speed: DistConfig = Field(
        default_factory=lambda: _lognormal(20.0, 1.0), description="device compute speed, examples per second"
    )
    bandwidth_down_mbps: DistConfig = Field(
        default_factory=lambda: _lognormal(20.0, 0.5), description="device download bandwidth, Mbit/s"
    )
    bandwidth_up_mbps: DistConfig = Field(
        default_factory=lambda: _lognormal(5.0, 0.5), description="device upload bandwidth, Mbit/s"
    )
    per_example_s: PerExampleConfig | None = Field(
        None, description="FLSim per-example Gaussian durations (replace speed)"
    )
    trip_extra_s: DistConfig | None = Field(
        None, description="extra seconds drawn per trip (e.g. FLSim's half-normal durations)"
    )
    latency_s: float = Field(0.0, ge=0, description="fixed seconds per trip (check-in, setup)")
    availability: AvailabilityConfig = AvailabilityConfig()
    over_selection: float = Field(1.3, ge=1, description="mode sync: select cohort x this many devices per round")
    deadline_s: float | None = Field(
        None, gt=0, description="mode sync: close a round after this many seconds (late results are discarded)"
    )
    max_sim_time_s: float | None = Field(None, gt=0, description="stop the run when the simulated clock passes this")

    @field_validator("speed", "bandwidth_down_mbps", "bandwidth_up_mbps")
    @classmethod
    def _rates_positive(cls, v: DistConfig, info):
        try:
            make_distribution(v.spec(), where="@", positive=True)
        except ValueError as e:
            raise ValueError(str(e).removeprefix("@: ")) from None
        return v


class StalenessConfig(_Strict):
    kind: Literal["constant", "polynomial", "hinge"] = Field("polynomial", description="staleness weight s(tau)")
    exponent: float = Field(0.5, ge=0, description="polynomial: s = 1/(1+tau)^exponent (0.5: FedBuff's 1/sqrt(1+tau))")
    a: float = Field(10.0, ge=0, description="hinge: s = 1/(a (tau - b) + 1) for tau > b")
    b: float = Field(4.0, ge=0, description="hinge: s = 1 for tau <= b")
    average: float | None = Field(
        None,
        ge=0,
        description="normalise the weights to 1 at this staleness: s(tau) / s(average) (FLSim's avg_staleness; fresher updates then weigh more than 1)",
    )


class AsyncConfig(_Strict):
    algorithm: Literal["fedbuff", "fedasync"] = Field(
        "fedbuff", description="buffered (FedBuff) or per-update mixing (FedAsync)"
    )
    concurrency: int = Field(
        100,
        ge=1,
        description="clients kept in flight (must not exceed fleet.population); with arrival_rate: the most in flight",
    )
    arrival_rate: float | None = Field(
        None,
        gt=0,
        description="clients check in as a Poisson process of this many per simulated second (FLSim's async model); an arrival finding `concurrency` in flight or no eligible device is lost. Default: a new trip starts as soon as one ends",
    )
    buffer_size: int = Field(10, ge=1, description="fedbuff: K, updates per server step")
    normalize: Literal["mean", "sum"] = Field(
        "mean", description="fedbuff: divide the buffer by its total example weight (mean) or not (sum = K x mean)"
    )
    staleness: StalenessConfig = StalenessConfig()
    max_staleness: int | None = Field(None, ge=0, description="drop updates staler than this (server versions)")
    mixing: float = Field(
        0.6, gt=0, le=1, description="fedasync: alpha in w = (1 - a) w + a w_client, a = min(alpha s(tau), 1)"
    )
