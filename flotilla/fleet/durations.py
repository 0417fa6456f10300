"""How long a client trip takes in simulated time, and whether it drops out.

A trip is: download the model, train locally, upload the delta.

    duration = latency_s + download_s + compute_s + extra_s + upload_s
    download_s = model_bytes * 8 / (bandwidth_down_mbps * 1e6)       (device trait)
    upload_s   = model_bytes * 8 / (bandwidth_up_mbps * 1e6)         (device trait)
    compute_s  = examples / speed                                     (device trait, examples/s)
               or, with per-example Gaussian durations (FLSim):
                 examples * max(N(mean, sd), min)                     (drawn per trip)
    extra_s    = an optional per-trip draw (e.g. FLSim's per-user half-normal duration)

With device tiers (flotilla.fairness), the client a device trains on has a tier, and that tier's
multipliers scale the device's speed and both bandwidths (a low tier of speed 0.2 computes 5x
slower than the same device draw in the high tier).

``examples`` is the work of the local training the task's client would really do: epochs x
its training examples, or the examples seen in ``steps`` local steps.  A trip drops out with
probability ``dropout`` at a uniform point of its duration, or when the device's session
(drawn per trip) ends first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flotilla.fleet.availability import Availability
from flotilla.fleet.distributions import Distribution, normal_from_uniform
from flotilla.fleet.population import (
    STREAM_DROP,
    STREAM_EXTRA,
    STREAM_PER_EXAMPLE,
    STREAM_SESSION,
    Population,
)


def work_examples(
    train_sizes: np.ndarray, epochs: int = 1, steps: int | None = None, batch_size: int = 10
) -> np.ndarray:
    """Examples processed by one local training of each client (what LocalTrainer would do)."""
    n = np.asarray(train_sizes, dtype=np.int64)
    if steps is None:
        return n * epochs
    per_pass = np.maximum(-(-n // batch_size), 1)  # batches per pass (ceil)
    full, rest = np.divmod(steps, per_pass)
    return np.where(n > 0, full * n + np.minimum(rest * batch_size, n), 0)


@dataclass(frozen=True)
class PerExample:
    """FLSim's per-example Gaussian durations: seconds per example ~ max(N(mean, sd), min)."""

    mean: float
    sd: float
    min: float = 1e-6


@dataclass(frozen=True)
class TierMultipliers:
    """Device tiers: the tier of each task client and each tier's speed / bandwidth multiplier."""

    tier: np.ndarray  # int, one per task client (0 low, 1 mid, 2 high)
    speed: tuple[float, ...]  # per tier
    bandwidth: tuple[float, ...]  # per tier

    def __post_init__(self):
        for name in ("speed", "bandwidth"):
            values = getattr(self, name)
            if not all(np.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"tiers.{name}: multipliers must be > 0, got {list(values)}")

    def of_clients(self, client: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.tier[client]
        return np.asarray(self.speed)[t], np.asarray(self.bandwidth)[t]


@dataclass
class TripBatch:
    """Outcomes of candidate trips ``k0 .. k0+n-1`` if they were started (numpy arrays)."""

    device: np.ndarray
    client: np.ndarray
    duration: np.ndarray  # seconds from start to upload complete
    drop_at: np.ndarray  # seconds from start to dropout, inf if the trip completes
    compute: np.ndarray  # seconds of local training (for reporting)


class DurationModel:
    def __init__(
        self,
        population: Population,
        availability: Availability,
        work: np.ndarray,
        model_bytes: int,
        per_example: PerExample | None = None,
        extra: Distribution | None = None,
        latency_s: float = 0.0,
        download_bytes: int | None = None,
        upload_bytes: int | None = None,
        tiers: TierMultipliers | None = None,
    ):
        if len(work) != population.num_clients:
            raise ValueError(f"work has {len(work)} entries, the task has {population.num_clients} clients")
        if latency_s < 0:
            raise ValueError(f"fleet.latency_s: must be >= 0, got {latency_s}")
        self.population = population
        self.availability = availability
        self.work = np.asarray(work, dtype=np.float64)
        self.model_bytes = int(model_bytes)
        # compressed messages (flotilla.channels): each direction its own size; default the model's
        self.download_bytes = int(model_bytes if download_bytes is None else download_bytes)
        self.upload_bytes = int(model_bytes if upload_bytes is None else upload_bytes)
        self.per_example = per_example
        self.extra = extra
        self.latency_s = float(latency_s)
        if tiers is not None and len(tiers.tier) != population.num_clients:
            raise ValueError(f"the tier map has {len(tiers.tier)} clients, the task has {population.num_clients}")
        self.tiers = tiers

    def trips(self, k0: int, n: int) -> TripBatch:
        return self.trips_for(np.arange(k0, k0 + n, dtype=np.uint64))

    def trips_for(self, k: np.ndarray, device: np.ndarray | None = None) -> TripBatch:
        """Outcomes of candidates ``k`` (uint64 counters); ``device`` = their device ids if known."""
        pop, av = self.population, self.availability
        k = np.asarray(k, dtype=np.uint64)
        n = len(k)
        device = pop.candidates(k) if device is None else device
        client = pop.client_of(device)
        work = self.work[client]
        speed_x = bw_x = 1.0
        if self.tiers is not None:
            speed_x, bw_x = self.tiers.of_clients(client)
        if self.per_example is not None:
            pe = self.per_example
            z = normal_from_uniform(
                pop.trip_uniform(STREAM_PER_EXAMPLE, k), pop.trip_uniform(STREAM_PER_EXAMPLE + 1, k)
            )
            compute = work * np.maximum(pe.mean + pe.sd * z, pe.min)
        else:
            compute = work / (pop.speed(device) * speed_x)
        duration = (
            self.latency_s
            + compute
            + self.download_bytes * 8.0 / (pop.bandwidth_down(device) * bw_x * 1e6)
            + self.upload_bytes * 8.0 / (pop.bandwidth_up(device) * bw_x * 1e6)
        )
        if self.extra is not None:
            duration = duration + self.extra.from_uniform(
                pop.trip_uniform(STREAM_EXTRA, k), pop.trip_uniform(STREAM_EXTRA + 1, k)
            )
        drop_at = np.full(n, np.inf)
        if av.dropout > 0:
            drops = pop.trip_uniform(STREAM_DROP, k) < av.dropout
            drop_at = np.where(drops, pop.trip_uniform(STREAM_DROP + 1, k) * duration, np.inf)
        if av.session is not None:
            session = av.session.from_uniform(
                pop.trip_uniform(STREAM_SESSION, k), pop.trip_uniform(STREAM_SESSION + 1, k)
            )
            drop_at = np.where(session < duration, np.minimum(drop_at, session), drop_at)
        return TripBatch(device, client, duration, drop_at, compute)

    def describe(self, sample: int = 100_000) -> dict[str, float]:
        """Quantiles of trip durations and the dropout rate, from a fixed sample of trips."""
        b = self.trips(0, sample)
        out = {"duration_mean": float(b.duration.mean())}
        for q in (10, 50, 90, 99):
            out[f"duration_p{q}"] = float(np.percentile(b.duration, q))
        out["duration_max_over_median"] = float(b.duration.max() / np.median(b.duration))
        out["drop_rate"] = float(np.isfinite(b.drop_at).mean())
        return out
