"""A fleet = population (device traits) + availability + duration model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flotilla.fleet.availability import Availability
from flotilla.fleet.distributions import Distribution, make_distribution
from flotilla.fleet.durations import DurationModel, PerExample, TierMultipliers, TripBatch, work_examples
from flotilla.fleet.population import Population


@dataclass
class Fleet:
    population: Population
    availability: Availability
    durations: DurationModel

    @property
    def size(self) -> int:
        return self.population.size

    @property
    def model_bytes(self) -> int:
        return self.durations.model_bytes

    @property
    def download_bytes(self) -> int:  # one model download (compressed with channels.download)
        return self.durations.download_bytes

    @property
    def upload_bytes(self) -> int:  # one update upload (compressed with channels.upload)
        return self.durations.upload_bytes

    def trips(self, k0: int, n: int) -> TripBatch:
        return self.durations.trips(k0, n)

    def describe(self, sample: int = 100_000) -> dict[str, float]:
        return {**self.population.describe(sample), **self.durations.describe(sample)}


def make_fleet(
    *,
    population: int,
    seed: int,
    train_sizes: np.ndarray,
    model_bytes: int,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 10,
    speed: Distribution | dict | float = 20.0,
    bandwidth_down_mbps: Distribution | dict | float = 20.0,
    bandwidth_up_mbps: Distribution | dict | float = 5.0,
    per_example_s: PerExample | dict | None = None,
    trip_extra_s: Distribution | dict | float | None = None,
    latency_s: float = 0.0,
    diurnal: list[float] | None = None,
    timezone_spread_h: int = 0,
    session_s: Distribution | dict | float | None = None,
    dropout: float = 0.0,
    device_to_client: str = "modulo",
    download_bytes: int | None = None,
    upload_bytes: int | None = None,
    tiers: TierMultipliers | None = None,
) -> Fleet:
    """Build a fleet from plain values (the Python-API twin of the ``fleet:`` config section)."""
    pop = Population(
        population,
        seed,
        len(train_sizes),
        speed=make_distribution(speed, "fleet.speed", positive=True),
        bandwidth_down=make_distribution(bandwidth_down_mbps, "fleet.bandwidth_down_mbps", positive=True),
        bandwidth_up=make_distribution(bandwidth_up_mbps, "fleet.bandwidth_up_mbps", positive=True),
        timezone_spread_h=timezone_spread_h,
        mapping=device_to_client,
    )
    av = Availability(
        pop,
        diurnal,
        make_distribution(session_s, "fleet.availability.session_s") if session_s is not None else None,
        dropout,
    )
    if isinstance(per_example_s, dict):
        per_example_s = PerExample(**per_example_s)
    work = work_examples(np.asarray(train_sizes), epochs, steps, batch_size)
    durations = DurationModel(
        pop,
        av,
        work,
        model_bytes,
        per_example=per_example_s,
        extra=make_distribution(trip_extra_s, "fleet.trip_extra_s") if trip_extra_s is not None else None,
        latency_s=latency_s,
        tiers=tiers,
        download_bytes=download_bytes,
        upload_bytes=upload_bytes,
    )
    return Fleet(pop, av, durations)


def fleet_from_config(
    fleet_cfg: Any,
    seed: int,
    train_sizes: np.ndarray,
    model_bytes: int,
    client_cfg: Any,
    message_bytes: tuple[int, int] | None = None,
    tiers: TierMultipliers | None = None,
) -> Fleet:
    """Build from a validated :class:`flotilla.fleet.config.FleetConfig` and ``ClientConfig``
    (``tiers``: device tiers scaling speeds and bandwidths, from the ``tiers:`` section)."""
    f, a = fleet_cfg, fleet_cfg.availability
    return make_fleet(
        population=f.population,
        seed=seed,
        train_sizes=train_sizes,
        model_bytes=model_bytes,
        epochs=client_cfg.epochs,
        steps=client_cfg.steps,
        batch_size=client_cfg.batch_size,
        speed=f.speed.spec(),
        bandwidth_down_mbps=f.bandwidth_down_mbps.spec(),
        bandwidth_up_mbps=f.bandwidth_up_mbps.spec(),
        per_example_s=PerExample(f.per_example_s.mean, f.per_example_s.sd, f.per_example_s.min)
        if f.per_example_s
        else None,
        trip_extra_s=f.trip_extra_s.spec() if f.trip_extra_s else None,
        latency_s=f.latency_s,
        diurnal=a.diurnal,
        timezone_spread_h=a.timezone_spread_h,
        session_s=a.session_s.spec() if a.session_s else None,
        dropout=a.dropout,
        device_to_client=f.device_to_client,
        tiers=tiers,
        download_bytes=message_bytes[0] if message_bytes else None,
        upload_bytes=message_bytes[1] if message_bytes else None,
    )
