"""Fixed-point encoding of float vectors into the ring Z_{2^bits}.

Masks only cancel in modular arithmetic, so inputs are integers mod R = 2^bits. numpy's uint32 /
uint64 arithmetic wraps modulo R for free.  Values are clipped to [-clip, clip] and scaled so that
each encodes to an integer of magnitude <= q with q = floor((2^(bits-1) - 1) / max_summands): the
sum of up to ``max_summands`` encodings then stays inside the signed range and decodes without
wrap-around.

Error bound (per coordinate), for n <= max_summands summands:

    |decode(sum_i encode(v_i)) - sum_i clip(v_i)| <= n / scale  = n * clip / q

Each summand is rounded to the nearest integer (<= 0.5 step) after a float64 product whose own
rounding is <= q * 2^-53 <= 1/8 step (q is capped at 2^50 for that reason); converting the integer
sum back to float64 adds <= n * clip * 2^-52 <= n/4 steps.  Total < 0.875 n steps of 1/scale.
"""

from __future__ import annotations

import numpy as np

_Q_CAP = 1 << 50  # keeps float64 products exact to 1/8 of a step (see module docstring)


class FixedPointEncoder:
    """Encode floats in [-clip, clip] to Z_{2^bits}; sums of up to ``max_summands`` never overflow."""

    def __init__(self, clip: float, max_summands: int, bits: int = 32):
        if bits not in (32, 64):
            raise ValueError(f"bits: ring must be 2^32 or 2^64, got 2^{bits}")
        if not clip > 0:
            raise ValueError(f"clip: must be positive, got {clip}")
        if max_summands < 1:
            raise ValueError(f"max_summands: must be >= 1, got {max_summands}")
        self.bits = bits
        self.clip = float(clip)
        self.max_summands = max_summands
        self.dtype = np.dtype(np.uint32 if bits == 32 else np.uint64)
        self._signed = np.dtype(np.int32 if bits == 32 else np.int64)
        self.q = min(((1 << (bits - 1)) - 1) // max_summands, _Q_CAP)
        if self.q < 1:
            raise ValueError(f"{max_summands} summands do not fit in a 2^{bits} ring")
        self.scale = self.q / self.clip

    @property
    def step(self) -> float:
        """The quantisation step: the value of one ring unit."""
        return 1.0 / self.scale

    def encode(self, values, factor: float = 1.0) -> np.ndarray:
        """Ring vector of ``clip(values) * factor`` (|factor| <= 1 keeps the overflow guarantee)."""
        if not abs(factor) <= 1.0:
            raise ValueError(f"factor: must be in [-1, 1], got {factor}")
        x = np.array(values, dtype=np.float64)  # a float64 copy: exact to 1/8 step (see above)
        np.minimum(x, self.clip, out=x)  # (np.clip is several times slower)
        np.maximum(x, -self.clip, out=x)
        x *= self.scale * factor
        np.rint(x, out=x)
        # |x| <= q fits the signed type of the ring's width; viewing it as unsigned is reduction
        # modulo 2^bits (two's complement), with no extra pass over the data.
        return x.astype(self._signed).view(self.dtype)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Float64 values of a ring vector (a single encoding or a sum of <= max_summands)."""
        ring = np.asarray(ring)
        if ring.dtype != self.dtype:
            raise ValueError(f"expected a {self.dtype} ring vector, got {ring.dtype}")
        return ring.view(self._signed).astype(np.float64) / self.scale

    def error_bound(self, n: int | None = None) -> float:
        """Worst-case per-coordinate error of a decoded sum of ``n`` encodings (default: the max)."""
        n = self.max_summands if n is None else n
        return n / self.scale
