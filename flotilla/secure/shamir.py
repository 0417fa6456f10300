"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

2^521 - 1 is a Mersenne prime larger than any 256-bit secret, so a seed or an X25519 private key
is one field element: no chunking.  Share i is f(x_i) for a random polynomial f of degree t - 1 with
f(0) = secret; any t shares give f(0) by Lagrange interpolation, fewer reveal nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from functools import lru_cache

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` at the nonzero points ``xs``; any ``threshold`` of them recover it."""
    xs = list(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    s = int.from_bytes(secret, "big")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


@lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # The same responder set reconstructs many secrets in one round: compute the weights once.
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, int], length: int = 32) -> bytes:
    """The secret from (at least threshold) shares {x: y}. Inconsistent shares raise ValueError."""
    if not shares:
        raise ValueError("no shares")
    xs = tuple(sorted(shares))
    weights = _lagrange_at_zero(xs)
    s = sum(w * shares[x] for w, x in zip(weights, xs)) % PRIME
    if s >= 1 << (8 * length):
        raise ValueError("shares are inconsistent (reconstructed value is out of range)")
    return s.to_bytes(length, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ValueError(f"share: expected {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ValueError("share is not a field element")
    return y
