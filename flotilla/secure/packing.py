"""Ring vectors on the wire: ``bits`` bits per element, packed tightly, little-endian.

A ring of 2^8, 2^16, 2^32 or 2^64 is its numpy array's own bytes (no copy on the way out).  Any
other width (a quantised ring, e.g. 15 bits) is packed bit by bit: element i occupies bits
``[i*bits, (i+1)*bits)`` of the byte string, least significant bit first; the last byte's unused
high bits are zero.  ``len(pack(v, bits)) == packed_bytes(len(v), bits)``.
"""

from __future__ import annotations

import numpy as np

from flotilla.secure.encoding import container


def packed_bytes(length: int, bits: int) -> int:
    return -(-length * bits // 8)


def _layout(length: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each element's 64-bit word, its shift in that word, and whether it spills into the next word."""
    o = np.arange(length, dtype=np.uint64) * np.uint64(bits)
    word, shift = o >> np.uint64(6), o & np.uint64(63)
    return word, shift, shift + np.uint64(bits) > 64


def pack(v: np.ndarray, bits: int) -> bytes | memoryview:
    """The wire bytes of ring vector ``v`` (elements < 2^bits)."""
    v = np.ascontiguousarray(v, dtype=np.dtype(container(bits)).newbyteorder("<"))
    if bits == 8 * v.dtype.itemsize:
        return memoryview(v).cast("B")
    n = len(v)
    word, shift, spill = _layout(n, bits)
    x = v.astype(np.uint64)
    words = np.zeros(-(-n * bits // 64) + 1, np.dtype("<u8"))
    starts = np.flatnonzero(np.diff(word, prepend=np.uint64(1 << 63)))  # word is non-decreasing
    if n:  # the bits of different elements never overlap, so OR-ing a word's parts assembles it
        words[word[starts]] = np.bitwise_or.reduceat(x << shift, starts)
        words[word[spill] + np.uint64(1)] |= x[spill] >> (np.uint64(64) - shift[spill])
    return words.view(np.uint8)[: packed_bytes(n, bits)].tobytes()


def unpack(data: bytes | bytearray | memoryview, length: int, bits: int) -> np.ndarray:
    """The ring vector of ``length`` elements in ``data``; ValueError if its size is wrong or the
    padding bits of the last byte are not zero (one encoding per vector)."""
    dt = np.dtype(container(bits))
    want = packed_bytes(length, bits)
    if len(data) != want:
        raise ValueError(f"expected {want} bytes ({length} elements of {bits} bits), got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8 * dt.itemsize:
        return raw.view(dt.newbyteorder("<")).astype(dt, copy=True)
    if (length * bits) % 8 and raw[-1] >> ((length * bits) % 8):
        raise ValueError("the padding bits after the last element are not zero")
    padded = np.zeros((-(-want // 8) + 1) * 8, np.uint8)
    padded[:want] = raw
    words = padded.view(np.dtype("<u8"))
    word, shift, spill = _layout(length, bits)
    x = words[word] >> shift
    x[spill] |= words[word[spill] + np.uint64(1)] << (np.uint64(64) - shift[spill])
    x &= np.uint64((1 << bits) - 1)
    return x.astype(dt)
