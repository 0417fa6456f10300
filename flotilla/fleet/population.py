"""A population of N devices with no per-device Python object.

Every device trait (compute speed, bandwidth, time zone, which task client holds its data)
is a pure function of ``(seed, device id)`` computed on demand with a counter-based hash
(SplitMix64), vectorised over numpy ``uint64`` arrays.  Nothing is stored per device, so a
population of 10^8 costs the same memory as one of 10^3: the arrays that exist are sized by
the number of devices being *looked at* (a batch of candidates, the clients in flight).

Per-trip randomness (dropout, per-example durations, session lengths) uses the same hash
keyed by the trip's counter, so a simulation is reproducible event for event from its seed
and can be resumed from a counter without replaying anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flotilla.fleet.distributions import Distribution

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB

# Stream labels: every independent random quantity gets its own key.
STREAM_DEVICE = 1  # candidate k -> device id
STREAM_SPEED = 2  # device -> compute speed (two uniforms: 2, 3)
STREAM_BW_DOWN = 4  # device -> download bandwidth (4, 5)
STREAM_BW_UP = 6  # device -> upload bandwidth (6, 7)
STREAM_TZ = 8  # device -> time zone offset
STREAM_CLIENT = 9  # device -> task client (mapping "hash")
STREAM_AVAIL = 10  # (device, local hour slot) -> eligible?
STREAM_DROP = 11  # trip -> drops out?  (11: whether, 12: when)
STREAM_SESSION = 13  # trip -> session length (13, 14)
STREAM_PER_EXAMPLE = 15  # trip -> per-example duration (15, 16)
STREAM_EXTRA = 17  # trip -> extra duration (17, 18)
STREAM_ARRIVAL = 19  # arrival k -> gap to arrival k + 1 (Poisson arrivals)


def mix64(x: int) -> int:
    """SplitMix64 on one Python int (the scalar twin of :func:`hash_array`)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int, *more: int) -> int:
    """A 64-bit key for one (seed, stream, ...) combination."""
    k = mix64(seed & _M64)
    for v in (stream, *more):
        k = mix64(k ^ (v & _M64))
    return k


def hash_array(key: int, x: np.ndarray) -> np.ndarray:
    """SplitMix64 of ``key ^ x`` for a uint64 array (wrapping arithmetic, no Python loop)."""
    z = np.asarray(x, dtype=np.uint64) ^ np.uint64(key)
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


def uniform_array(key: int, x: np.ndarray) -> np.ndarray:
    """Uniforms in the open interval (0, 1), 53 bits, one per counter in ``x``."""
    h = hash_array(key, x)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def uniform_scalar(key: int, x: int) -> float:
    return ((mix64(key ^ (x & _M64)) >> 11) + 0.5) * (1.0 / (1 << 53))


class Population:
    """N devices; traits derived on demand from ``(seed, device id)``.

    ``speed``: examples per second of local training; ``bandwidth_down`` / ``bandwidth_up``:
    Mbit/s; ``timezone_spread_h``: each device's local clock is offset by a whole number of
    hours drawn uniformly from ``0..timezone_spread_h``; ``num_clients`` task clients hold the
    data, and device ``d`` trains on client ``d % num_clients`` (``mapping="modulo"``) or on a
    seeded hash of ``d`` (``mapping="hash"``).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        num_clients: int,
        speed: Distribution,
        bandwidth_down: Distribution,
        bandwidth_up: Distribution,
        timezone_spread_h: int = 0,
        mapping: str = "modulo",
    ):
        if size < 1:
            raise ValueError(f"fleet.population: must be >= 1, got {size}")
        if num_clients < 1:
            raise ValueError("the task has no clients to map devices onto")
        if mapping not in ("modulo", "hash"):
            raise ValueError(f"fleet.device_to_client: must be 'modulo' or 'hash', got {mapping!r}")
        if not 0 <= timezone_spread_h <= 23:
            raise ValueError(f"fleet.availability.timezone_spread_h: must be in 0..23, got {timezone_spread_h}")
        self.size = int(size)
        self.seed = int(seed)
        self.num_clients = int(num_clients)
        self.speed_dist = speed
        self.bw_down_dist = bandwidth_down
        self.bw_up_dist = bandwidth_up
        self.timezone_spread_h = int(timezone_spread_h)
        self.mapping = mapping
        k = lambda s: stream_key(self.seed, s)  # noqa: E731
        self._keys = {s: k(s) for s in range(1, 19)}

    def key(self, stream: int) -> int:
        return self._keys[stream]

    # -- devices ---------------------------------------------------------------------------
    def candidates(self, k: np.ndarray) -> np.ndarray:
        """Device id of candidate number ``k`` (uniform over the population, with repeats)."""
        u = uniform_array(self._keys[STREAM_DEVICE], k)
        return np.minimum((u * self.size).astype(np.int64), self.size - 1)

    def client_of(self, devices: np.ndarray) -> np.ndarray:
        d = np.asarray(devices, dtype=np.int64)
        if self.mapping == "modulo":
            return d % self.num_clients
        h = hash_array(self._keys[STREAM_CLIENT], d.astype(np.uint64))
        return (h % np.uint64(self.num_clients)).astype(np.int64)

    def _trait(self, dist: Distribution, s: int, devices: np.ndarray) -> np.ndarray:
        d = np.asarray(devices, dtype=np.uint64)
        return dist.from_uniform(uniform_array(self._keys[s], d), uniform_array(self._keys[s + 1], d))

    def speed(self, devices: np.ndarray) -> np.ndarray:
        """Examples per second."""
        return self._trait(self.speed_dist, STREAM_SPEED, devices)

    def bandwidth_down(self, devices: np.ndarray) -> np.ndarray:
        """Mbit/s."""
        return self._trait(self.bw_down_dist, STREAM_BW_DOWN, devices)

    def bandwidth_up(self, devices: np.ndarray) -> np.ndarray:
        """Mbit/s."""
        return self._trait(self.bw_up_dist, STREAM_BW_UP, devices)

    def timezone(self, devices: np.ndarray) -> np.ndarray:
        """Whole-hour offset of each device's local clock, in ``0..timezone_spread_h``."""
        d = np.asarray(devices, dtype=np.uint64)
        if self.timezone_spread_h == 0:
            return np.zeros(d.shape, dtype=np.int64)
        u = uniform_array(self._keys[STREAM_TZ], d)
        return np.minimum((u * (self.timezone_spread_h + 1)).astype(np.int64), self.timezone_spread_h)

    def trip_uniform(self, stream: int, trips: np.ndarray) -> np.ndarray:
        """A per-trip uniform from ``stream`` (trip = candidate counter)."""
        return uniform_array(self._keys[stream], np.asarray(trips, dtype=np.uint64))

    def describe(self, sample: int = 100_000) -> dict[str, float]:
        """Quantiles of the device traits, from a fixed sample of devices (for docs and logs)."""
        d = self.candidates(np.arange(sample, dtype=np.uint64))
        out = {}
        for name, fn in (
            ("speed", self.speed),
            ("bandwidth_down", self.bandwidth_down),
            ("bandwidth_up", self.bandwidth_up),
        ):
            v = fn(d)
            for q in (10, 50, 90, 99):
                out[f"{name}_p{q}"] = float(np.percentile(v, q))
        return out


def spread_fraction(curve: Sequence[float], hour: int, spread: int) -> float:
    """Fraction of devices eligible at global hour ``hour`` when time zones are spread evenly."""
    return float(np.mean([curve[(hour + o) % 24] for o in range(spread + 1)]))
