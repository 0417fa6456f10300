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


def _columns(bits: int):
    """For each element position j in a group of 8 (8 elements fill ``bits`` bytes exactly): its first
    byte in the group, its bit shift there, and how many bytes it touches."""
    return [((j * bits) // 8, (j * bits) % 8, -(-((j * bits) % 8 + bits) // 8)) for j in range(8)]


def pack(v: np.ndarray, bits: int) -> bytes | memoryview:
    """The wire bytes of ring vector ``v`` (elements < 2^bits)."""
    v = np.ascontiguousarray(v, dtype=np.dtype(container(bits)).newbyteorder("<"))
    if bits == 8 * v.dtype.itemsize:
        return memoryview(v).cast("B")
    n = len(v)
    if bits > 56:  # (no quantised ring is this wide) an element and its shift overflow 64 bits: bit by bit
        planes = np.unpackbits(v.view(np.uint8).reshape(n, 8), axis=1, count=bits, bitorder="little")
        return np.packbits(planes.reshape(-1), bitorder="little").tobytes()
    groups = -(-n // 8)
    wide = np.uint64 if bits > 24 else np.uint32  # an element shifted by up to 7 bits fits this type
    x = np.zeros(groups * 8, wide)
    x[:n] = v
    out = np.zeros(groups * bits + 8, np.uint8)
    # column by column (strided views, no per-bit work): the bits of different elements never
    # overlap, so OR-ing each element's bytes into place assembles the stream
    for j, (first, shift, touched) in enumerate(_columns(bits)):
        col = x[j::8] << wide(shift)
        for b in range(touched):
            out[first + b :: bits][:groups] |= (col >> wide(8 * b)).astype(np.uint8)
    return out[: packed_bytes(n, bits)].tobytes()


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
    if bits > 56:
        planes = np.unpackbits(raw, count=length * bits, bitorder="little").reshape(length, bits)
        full = np.zeros((length, 64), np.uint8)
        full[:, :bits] = planes
        return np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(length).astype(dt)
    groups = -(-length // 8)
    padded = np.zeros(groups * bits + 8, np.uint8)
    padded[:want] = raw
    wide = np.uint64 if bits > 24 else np.uint32  # an element's bytes, shifted, fit this type
    out = np.empty(groups * 8, dt)
    mask = wide((1 << bits) - 1)
    for j, (first, shift, touched) in enumerate(_columns(bits)):
        col = padded[first::bits][:groups].astype(wide)
        for b in range(1, touched):
            col |= padded[first + b :: bits][:groups].astype(wide) << wide(8 * b)
        col >>= wide(shift)
        col &= mask
        out[j::8] = col
    return out[:length]
