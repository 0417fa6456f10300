"""Who is calling, and how often: per-device tokens and a per-device request-rate limit."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flotilla.network.certs import token_hash


@dataclass(frozen=True)
class Identity:
    device: str
    role: str  # "device" (may train) or "admin" (status only)
    index: int  # stable integer id of a device (its position in the table), for seeds


class TokenTable:
    """``sha256(token) -> Identity``, read from a tokens.json written by ``flotilla certs``."""

    def __init__(self, entries: dict[str, dict[str, str]]):
        self._by_hash: dict[str, Identity] = {}
        index = 0
        for device, e in entries.items():
            role = e.get("role", "device")
            if role not in ("device", "admin"):
                raise ValueError(f"tokens: {device}: role must be 'device' or 'admin', got {role!r}")
            digest = e.get("sha256", "")
            if len(digest) != 64:
                raise ValueError(f"tokens: {device}: 'sha256' must be the 64-hex-digit SHA-256 of the token")
            self._by_hash[digest] = Identity(device, role, index)
            index += role == "device"
        self._index = {i.device: i.index for i in self._by_hash.values()}

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenTable:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"network.tokens: {path} not found (make one with `flotilla certs DIR`)")
        try:
            data = json.loads(path.read_text())
            return cls(data["devices"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"network.tokens: {path} is not a tokens.json written by `flotilla certs` ({e})") from None

    @classmethod
    def from_tokens(cls, tokens: dict[str, str], admins: tuple[str, ...] = ("admin",)) -> TokenTable:
        """Build from plain ``device -> token`` (tests, programmatic servers)."""
        return cls(
            {d: {"sha256": token_hash(t), "role": "admin" if d in admins else "device"} for d, t in tokens.items()}
        )

    def identify(self, token: str | None) -> Identity | None:
        if not token:
            return None
        return self._by_hash.get(token_hash(token))

    def index(self, device: str) -> int:
        return self._index.get(device, 0)

    @property
    def devices(self) -> int:
        """Enrolled devices (role 'device'): the population user-level DP accounts over."""
        return sum(i.role == "device" for i in self._by_hash.values())

    def __len__(self) -> int:
        return len(self._by_hash)


class RateLimiter:
    """A token bucket per device: ``rate`` requests per second on average, bursts up to ``burst``.

    Buckets idle long enough to be full again are dropped, so memory follows the devices active
    in the last few seconds, not the population."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit: rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, last time)
        self._last_sweep = clock()

    def allow(self, device: str) -> bool:
        now = self.clock()
        tokens, last = self._buckets.get(device, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[device] = (tokens - 1.0 if ok else tokens, now)
        if now - self._last_sweep > 10.0:
            full = self.burst / self.rate
            self._buckets = {d: b for d, b in self._buckets.items() if now - b[1] < full}
            self._last_sweep = now
        return ok
