"""When devices may train: a diurnal eligibility curve, session lengths, dropout.

* ``diurnal``: 24 fractions, ``curve[h]`` = probability that a device is eligible (charging,
  idle, unmetered network) during hour ``h`` of its local day.  Eligibility is redrawn every
  hour per device from the hash of (seed, device, local hour slot), so the eligible set at
  any time is a deterministic function of the time, with the right fraction.  Devices live in
  time zones spread over ``0..timezone_spread_h`` whole hours (0: one time zone, the fleet-wide
  curve is the diurnal curve itself).
* ``session``: how long a device stays eligible once it has checked in; a trip longer than
  the session ends in a dropout when the session ends.
* ``dropout``: probability that a trip is abandoned (the device leaves), at a uniformly random
  point of the trip.  A dropped trip's result never arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flotilla.fleet.distributions import Distribution
from flotilla.fleet.population import STREAM_AVAIL, Population, hash_array, spread_fraction

HOUR_S = 3600.0


def check_curve(curve: Sequence[float] | None, where: str = "fleet.availability.diurnal") -> list[float] | None:
    if curve is None:
        return None
    values = [float(v) for v in curve]
    if len(values) != 24:
        raise ValueError(f"{where}: needs 24 hourly fractions, got {len(values)}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"{where}: fractions must be in [0, 1], got {bad[0]}")
    if max(values) == 0.0:
        raise ValueError(f"{where}: never admits a device (all 24 hourly fractions are 0)")
    return values


class Availability:
    def __init__(
        self,
        population: Population,
        diurnal: Sequence[float] | None = None,
        session: Distribution | None = None,
        dropout: float = 0.0,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"fleet.availability.dropout: must be in [0, 1), got {dropout}")
        self.population = population
        self.curve = check_curve(diurnal)
        self.always = self.curve is None  # every device eligible at all times
        self.session = session
        self.dropout = float(dropout)
        spread = population.timezone_spread_h
        # Fleet-wide eligible fraction at each global hour of the day (depends on the spread).
        self.fraction_by_hour = (
            [1.0] * 24 if self.curve is None else [spread_fraction(self.curve, h, spread) for h in range(24)]
        )
        self._curve_np = None if self.curve is None else np.asarray(self.curve)

    def fraction(self, t: float) -> float:
        """Expected fraction of the fleet eligible at simulated time ``t``."""
        return self.fraction_by_hour[int(t // HOUR_S) % 24]

    def next_hour(self, t: float) -> float:
        return (int(t // HOUR_S) + 1) * HOUR_S

    def next_open(self, t: float) -> float:
        """The first hour boundary after ``t`` at which some devices are eligible."""
        h = int(t // HOUR_S) + 1
        for i in range(25):
            if self.fraction_by_hour[(h + i) % 24] > 0:
                return (h + i) * HOUR_S
        raise RuntimeError("fleet.availability.diurnal never admits a device")  # refused at config time

    def eligible(self, devices: np.ndarray, t: float) -> np.ndarray:
        """Boolean mask: which ``devices`` are eligible at time ``t`` (vectorised)."""
        d = np.asarray(devices, dtype=np.int64)
        if self.curve is None:
            return np.ones(d.shape, dtype=bool)
        slot = int(t // HOUR_S) + self.population.timezone(d)  # local hour index
        key = self.population.key(STREAM_AVAIL)
        h = hash_array(key, d.astype(np.uint64))
        h = hash_array(key, h ^ slot.astype(np.uint64))
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        return u < self._curve_np[slot % 24]
