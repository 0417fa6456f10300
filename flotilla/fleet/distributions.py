"""Distributions of device traits and durations, sampled from counter-based uniforms.

Every distribution maps two arrays of uniforms in (0, 1) to samples (``from_uniform``), so a
sample is a pure function of the hash of (seed, stream, counter): reproducible, vectorised
and free of per-device state.  Normal variates use Box-Muller on the two uniforms.

    constant     value
    uniform      low + (high - low) U
    exponential  min + Exp(mean)                          (FLSim: exponential(mean))
    half-normal  min + |N(0, sd)|                          (FLSim per-user half-normal)
    lognormal    median * exp(sigma N(0, 1))               (heavy-tailed)
    empirical    a value drawn uniformly from a file of observed values

Parameters are validated here with the key (``where``) named, so the same checks serve the
config file and direct Python use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("constant", "uniform", "exponential", "half-normal", "lognormal", "empirical")


def normal_from_uniform(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normals by Box-Muller (u1, u2 in the open interval (0, 1))."""
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


class Distribution:
    kind = "?"

    def from_uniform(self, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def mean(self) -> float:
        raise NotImplementedError

    def lower_bound(self) -> float:
        """The smallest value the distribution can produce (its infimum)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Distribution):
    value: float
    kind = "constant"

    def from_uniform(self, u1, u2):
        return np.full(np.shape(u1), float(self.value))

    def mean(self):
        return float(self.value)

    def lower_bound(self):
        return float(self.value)


@dataclass(frozen=True)
class Uniform(Distribution):
    low: float
    high: float
    kind = "uniform"

    def from_uniform(self, u1, u2):
        return self.low + (self.high - self.low) * u1

    def mean(self):
        return 0.5 * (self.low + self.high)

    def lower_bound(self):
        return float(self.low)


@dataclass(frozen=True)
class Exponential(Distribution):
    mean_: float
    min: float = 0.0
    kind = "exponential"

    def from_uniform(self, u1, u2):
        return self.min - self.mean_ * np.log(u1)

    def mean(self):
        return self.min + self.mean_

    def lower_bound(self):
        return float(self.min)


@dataclass(frozen=True)
class HalfNormal(Distribution):
    sd: float
    min: float = 0.0
    kind = "half-normal"

    def from_uniform(self, u1, u2):
        return self.min + self.sd * np.abs(normal_from_uniform(u1, u2))

    def mean(self):
        return self.min + self.sd * math.sqrt(2.0 / math.pi)

    def lower_bound(self):
        return float(self.min)


@dataclass(frozen=True)
class LogNormal(Distribution):
    median: float
    sigma: float
    kind = "lognormal"

    def from_uniform(self, u1, u2):
        return self.median * np.exp(self.sigma * normal_from_uniform(u1, u2))

    def mean(self):
        return self.median * math.exp(0.5 * self.sigma**2)

    def lower_bound(self):
        return 0.0 if self.sigma > 0 else float(self.median)


class Empirical(Distribution):
    """Draws uniformly among observed values (the empirical distribution of a file)."""

    kind = "empirical"

    def __init__(self, values, source: str = "values"):
        v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
        if v.size == 0:
            raise ValueError(f"{source}: no values")
        self.values = v
        self.source = source

    def from_uniform(self, u1, u2):
        idx = np.minimum((np.asarray(u1) * len(self.values)).astype(np.int64), len(self.values) - 1)
        return self.values[idx]

    def mean(self):
        return float(self.values.mean())

    def lower_bound(self):
        return float(self.values[0])

    def __repr__(self):
        return f"Empirical({len(self.values)} values from {self.source})"


def load_values(path: str | Path, where: str = "file") -> np.ndarray:
    """Numbers from a text file (separated by whitespace, commas or newlines; ``#`` comments)
    or a ``.npy`` array."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: file not found: {p}")
    if p.suffix == ".npy":
        values = np.load(p).astype(np.float64).reshape(-1)
    else:
        tokens = []
        for line in p.read_text().splitlines():
            line = line.split("#", 1)[0]
            tokens += [t for t in line.replace(",", " ").split() if t]
        try:
            values = np.array([float(t) for t in tokens], dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"{where}: {p} holds a value that is not a number ({e})") from None
    if values.size == 0:
        raise ValueError(f"{where}: {p} holds no values")
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: {p} holds non-finite values")
    return values


def make_distribution(
    spec: Mapping[str, Any] | float | int | Distribution, where: str = "distribution", positive: bool = False
) -> Distribution:
    """Build a distribution from ``{"dist": kind, ...params}`` (or a bare number = constant).

    All quantities in a fleet (seconds, examples per second, Mbit/s) are non-negative, so
    negative parameters are refused; with ``positive=True`` (rates that divide work) the
    distribution must also be unable to produce 0.
    """
    if isinstance(spec, Distribution):
        dist = spec
    else:
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"dist": "constant", "value": spec}
        if not isinstance(spec, Mapping) or "dist" not in spec:
            raise ValueError(f"{where}: expected a number or a mapping with 'dist' (one of {', '.join(KINDS)})")
        s = {k: v for k, v in spec.items() if v is not None}
        kind = s.pop("dist")
        allowed = {
            "constant": {"value"},
            "uniform": {"low", "high"},
            "exponential": {"mean", "min"},
            "half-normal": {"sd", "min"},
            "lognormal": {"median", "sigma"},
            "empirical": {"file"},
        }
        if kind not in allowed:
            raise ValueError(f"{where}.dist: unknown distribution {kind!r}; choose one of {', '.join(KINDS)}")
        extra = set(s) - allowed[kind]
        if extra:
            raise ValueError(
                f"{where}: {kind} does not take {', '.join(sorted(extra))} (it takes {', '.join(sorted(allowed[kind]))})"
            )
        need = allowed[kind] - {"min"} - set(s)
        if need:
            raise ValueError(f"{where}: {kind} needs {', '.join(sorted(need))}")
        for k, v in s.items():
            if k == "file":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{where}.{k}: must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"{where}.{k}: must be >= 0, got {v}")
        if kind == "constant":
            dist = Constant(float(s["value"]))
        elif kind == "uniform":
            if s["high"] < s["low"]:
                raise ValueError(f"{where}.high: must be >= low ({s['low']}), got {s['high']}")
            dist = Uniform(float(s["low"]), float(s["high"]))
        elif kind == "exponential":
            if s["mean"] <= 0:
                raise ValueError(f"{where}.mean: must be > 0, got {s['mean']}")
            dist = Exponential(float(s["mean"]), float(s.get("min", 0.0)))
        elif kind == "half-normal":
            dist = HalfNormal(float(s["sd"]), float(s.get("min", 0.0)))
        elif kind == "lognormal":
            if s["median"] <= 0:
                raise ValueError(f"{where}.median: must be > 0, got {s['median']}")
            dist = LogNormal(float(s["median"]), float(s["sigma"]))
        else:
            values = load_values(s["file"], f"{where}.file")
            if (values < 0).any():
                raise ValueError(f"{where}.file: {s['file']} holds negative values (min {values.min()})")
            dist = Empirical(values, str(s["file"]))
    if positive and dist.lower_bound() <= 0 and dist.kind not in ("exponential", "lognormal"):
        # exponential and lognormal never produce exactly 0; the others can (or are 0).
        raise ValueError(
            f"{where}: a rate must be > 0, but this {dist.kind} distribution can produce "
            f"{dist.lower_bound()} (raise its lower end / min above 0)"
        )
    return dist
