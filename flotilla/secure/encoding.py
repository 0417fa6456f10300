"""Fixed-point encoding of float vectors into the ring Z_{2^bits} (and, at the end, the b-bit
quantisation into a narrow ring that ``channels.upload: quantize`` becomes: :class:`QuantizedEncoder`).

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

    def decode_sum(self, ring: np.ndarray, n: int) -> np.ndarray:
        """:meth:`decode` (the interface :class:`QuantizedEncoder` shares; ``n`` is not needed here)."""
        return self.decode(ring)

    def error_bound(self, n: int | None = None) -> float:
        """Worst-case per-coordinate error of a decoded sum of ``n`` encodings (default: the max)."""
        n = self.max_summands if n is None else n
        return n / self.scale


class QuantizedEncoder:
    """``value_bits``-bit quantisation onto one grid shared by every device, into the smallest ring the
    sum needs: what ``channels.upload: [{name: quantize}]`` becomes under secure aggregation.

    Grid: ``k * step`` for integers ``|k| <= K``, ``K = 2^(b-1) - 1``, ``step = clip / K``: the scale is
    the public clip bound, not a per-device min/max (masked vectors are summed before anyone could
    rescale them).  Zero is a level, so rounding toward zero never makes a coordinate larger.  A
    device sends the code ``k + K`` in ``[0, 2K]``; a sum of ``n <= max_summands`` codes is at most
    ``n * 2K < 2^(b + ceil(log2 max_summands))``, so the ring is ``Z_{2^ring_bits}`` with
    ``ring_bits = b + ceil(log2 max_summands)`` (8 bits, 100 summands: 15) and the sum never wraps.
    ``decode_sum(total, n) = (total - n K) * step`` exactly (integers below 2^53 are exact in float64).

    Stochastic rounding (``floor(x / step + U[0, 1))``) is unbiased: each summand is off by less than
    one step, with variance <= step^2 / 4, so ``|decode_sum - sum clip(x_i)| < n * step`` always.
    """

    def __init__(self, clip: float, max_summands: int, value_bits: int, stochastic: bool = True):
        if isinstance(value_bits, bool) or not isinstance(value_bits, int) or not 2 <= value_bits <= 16:
            raise ValueError(
                f"bits: quantising into the ring needs 2-16 bits per value (1 bit has no zero level), got {value_bits!r}"
            )
        if not clip > 0:
            raise ValueError(f"clip: must be positive, got {clip}")
        if max_summands < 1:
            raise ValueError(f"max_summands: must be >= 1, got {max_summands}")
        self.clip = float(clip)
        self.max_summands = max_summands
        self.value_bits = value_bits
        self.stochastic = stochastic
        self.K = (1 << (value_bits - 1)) - 1
        self.scale = self.K / self.clip
        self.ring_bits = value_bits + (max_summands - 1).bit_length()  # + ceil(log2 max_summands)
        self.dtype = np.dtype(container(self.ring_bits))

    @property
    def step(self) -> float:
        return 1.0 / self.scale

    @property
    def bits(self) -> int:
        return self.ring_bits

    def levels(self, values, factor: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Grid indices ``k`` (float64, integral, in [-K, K]) of ``clip(values) * factor``, rounded."""
        if not abs(factor) <= 1.0:
            raise ValueError(f"factor: must be in [-1, 1], got {factor}")
        x = np.array(values, dtype=np.float64)
        np.minimum(x, self.clip, out=x)
        np.maximum(x, -self.clip, out=x)
        x *= self.scale * factor
        if self.stochastic:
            x += (rng if rng is not None else np.random.default_rng()).random(x.shape)
            np.floor(x, out=x)
        else:
            np.rint(x, out=x)
        np.minimum(x, self.K, out=x)  # (float rounding at the edge of the range)
        np.maximum(x, -self.K, out=x)
        return x

    def codes(self, k: np.ndarray) -> np.ndarray:
        """Ring elements of grid indices ``k``."""
        return (k + self.K).astype(self.dtype)

    def encode(self, values, factor: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.codes(self.levels(values, factor, rng))

    def encode_bounded(
        self, values, norm: float, factor: float = 1.0, rng: np.random.Generator | None = None, tries: int = 4
    ) -> tuple[np.ndarray, bool]:
        """``(codes, fell back)``: as :meth:`encode`, but what the codes stand for has L2 norm <= ``norm``
        (user-level DP's sensitivity, so the accountant is unchanged).  Stochastic rounding can grow the
        norm; up to ``tries`` draws are made, then the values are rounded toward zero (never larger in
        any coordinate, so within the norm of the input, which the caller clipped to ``norm``)."""
        limit = (norm * self.scale) ** 2 * (1 - 1e-9)
        for _ in range(tries if self.stochastic else 1):
            k = self.levels(values, factor, rng)
            if float(np.dot(k, k)) <= limit:
                return self.codes(k), False
        x = np.array(values, dtype=np.float64)
        np.minimum(x, self.clip, out=x)
        np.maximum(x, -self.clip, out=x)
        x *= self.scale * factor * (1 - 1e-6)  # (just under: float rounding of the caller's clip stays inside)
        return self.codes(np.trunc(x)), True

    def decode_sum(self, ring: np.ndarray, n: int) -> np.ndarray:
        """Float64 values of the sum of ``n`` encodings (reduced mod 2^ring_bits)."""
        ring = np.asarray(ring)
        if ring.dtype != self.dtype:
            raise ValueError(f"expected a {self.dtype} ring vector, got {ring.dtype}")
        if not 1 <= n <= self.max_summands:
            raise ValueError(f"n: a sum of 1..{self.max_summands} encodings, got {n}")
        return (ring.astype(np.float64) - n * self.K) * self.step

    def error_bound(self, n: int | None = None) -> float:
        """Worst-case per-coordinate error of a decoded sum of ``n`` encodings (less than a step each)."""
        n = self.max_summands if n is None else n
        return n * self.step


def container(bits: int) -> type:
    """The narrowest unsigned numpy type that holds a ring element of ``bits`` bits."""
    for t in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(t).itemsize:
            return t
    raise ValueError(f"bits: a ring of at most 2^64, got 2^{bits}")
