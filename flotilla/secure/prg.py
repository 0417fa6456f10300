"""Pseudo-random masks: AES-256-CTR keystream read as a ring vector.

With AES-NI this expands several GB/s, so masking a 1M-parameter vector costs well under a
millisecond per seed.  Every seed is a fresh 32-byte secret used for exactly one expansion in one
round, so a fixed all-zero counter block is safe (key and counter never repeat together).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_IV = bytes(16)


class PRG:
    """Expands seeds into ``length`` ring elements of ``dtype``, reusing one output buffer."""

    def __init__(self, length: int, dtype=np.uint32):
        self.length = length
        self.dtype = np.dtype(dtype)
        nbytes = length * self.dtype.itemsize
        self._zeros = bytes(nbytes)  # keystream = AES-CTR encryption of zeros
        self._buf = bytearray(nbytes + 15)  # update_into wants block_size - 1 spare bytes
        self._view = np.frombuffer(self._buf, dtype=self.dtype, count=length)

    def expand(self, seed: bytes) -> np.ndarray:
        """The mask for ``seed``; a view into an internal buffer, valid until the next call."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed: expected {SEED_BYTES} bytes, got {len(seed)}")
        enc = Cipher(algorithms.AES(seed), modes.CTR(_IV)).encryptor()
        enc.update_into(self._zeros, self._buf)
        return self._view

    def add_into(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """``acc += sign * PRG(seed)`` modulo 2^bits, in place."""
        mask = self.expand(seed)
        if sign > 0:
            np.add(acc, mask, out=acc)
        else:
            np.subtract(acc, mask, out=acc)


def expand(seed: bytes, length: int, dtype=np.uint32) -> np.ndarray:
    """One-off expansion (a fresh array)."""
    return PRG(length, dtype).expand(seed).copy()
