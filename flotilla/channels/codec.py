"""A chain of channels over a flat vector: what the receiver reconstructs, its exact wire bytes, and
the byte count by FLSim's conventions (flsim/channels), tensor by tensor.

A chain holds at most one *value encoding* (``fp16``, ``bf16`` or ``quantize``) and at most one
*sparsification* (``topk`` or ``random``), in either order.  Per parameter tensor (the shapes come
from the model's :class:`~flotilla.core.flat.FlatModel`):

- no step: fp32, 4 bytes per element.
- ``fp16`` / ``bf16``: 2 bytes per element (every tensor).
- ``quantize`` (bits b): tensors of 2+ dimensions send ``ceil(count * b / 8)`` bytes of packed codes
  plus an 8-byte scale (float64) and a 4-byte zero point (the float32 minimum) per group (the tensor,
  or each output channel with ``per_channel``); 1-D tensors (biases, norms) stay fp32.
- ``topk`` / ``random`` (keep fraction p, every tensor): ``nnz = round(p * numel)`` values (in the
  encoding above) plus the positions as a bitmap (``ceil(numel / 8)`` bytes) or as COO coordinates
  (``nnz * ndim * 8`` bytes, int64), whichever is smaller (the bitmap on a tie).

Sparsify-then-quantise quantises the masked tensor (its zeros inside the range) and sends the kept
codes; quantise-then-sparsify picks the kept coordinates among the dequantised values.  The byte
count depends only on the shapes and the chain, never on the data, so it is known before training
(the fleet's trip durations use it).  The wire format *is* this count: ``len(encode(x)) ==
message_bytes``, and ``decode(encode(x)) == apply(x)`` bit for bit on every runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flotilla.channels.quantize import check_bits, quantize_codes
from flotilla.channels.sparsify import keep_count, random_mask, topk_mask

ENCODINGS = ("fp16", "bf16", "quantize")
SPARSIFIERS = ("topk", "random")


@dataclass(frozen=True)
class Step:
    """One channel: ``name`` in fp16 | bf16 | quantize | topk | random."""

    name: str
    bits: int = 8  # quantize
    per_channel: bool = False  # quantize
    stochastic: bool = True  # quantize
    keep: float = 1.0  # topk / random

    def __post_init__(self):
        if self.name not in ENCODINGS + SPARSIFIERS:
            raise ValueError(f"channel name must be one of {ENCODINGS + SPARSIFIERS}, got {self.name!r}")
        if self.name == "quantize":
            check_bits(self.bits)
        if self.name in SPARSIFIERS:
            keep_count(1, self.keep)  # validates the fraction


def check_steps(steps: tuple[Step, ...] | list[Step], where: str = "channels") -> None:
    """At most one value encoding and one sparsification per direction."""
    enc = [s.name for s in steps if s.name in ENCODINGS]
    spa = [s.name for s in steps if s.name in SPARSIFIERS]
    if len(enc) > 1:
        raise ValueError(f"{where}: at most one of fp16, bf16, quantize per direction, got {enc}")
    if len(spa) > 1:
        raise ValueError(f"{where}: at most one of topk, random per direction, got {spa}")


def _pack(codes: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    bitplanes = (codes.astype(np.uint8)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count]
    flat = np.unpackbits(raw, bitorder="little", count=count * bits).reshape(count, bits)
    return (flat << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


class _Reader:
    def __init__(self, data: bytes):
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise ValueError(f"compressed payload too short: needs {self.pos + n} bytes, has {len(self.view)}")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out


class Codec:
    """A chain of channel steps over a model's parameter shapes (one direction)."""

    def __init__(self, steps: list[Step] | tuple[Step, ...], shapes: list[tuple[int, ...]]):
        check_steps(steps)
        self.steps = tuple(steps)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.numel = sum(math.prod(s) for s in self.shapes)
        self.encoding = next((s for s in self.steps if s.name in ENCODINGS), None)
        self.sparsifier = next((s for s in self.steps if s.name in SPARSIFIERS), None)
        self.sparsify_first = self.sparsifier is not None and (
            self.encoding is None or self.steps.index(self.sparsifier) < self.steps.index(self.encoding)
        )
        self._layout = [self._tensor_layout(s) for s in self.shapes]
        self.message_bytes = sum(sum(parts.values()) for parts in self._layout)

    @property
    def lossless(self) -> bool:
        return not self.steps

    @property
    def stochastic(self) -> bool:
        return (
            self.sparsifier is not None
            and self.sparsifier.name == "random"
            or (self.encoding is not None and self.encoding.name == "quantize" and self.encoding.stochastic)
        )

    # -- byte accounting ------------------------------------------------------------------
    def _quantised(self, shape: tuple[int, ...]) -> bool:
        return self.encoding is not None and self.encoding.name == "quantize" and len(shape) >= 2

    def _groups(self, shape: tuple[int, ...]) -> int:
        return shape[0] if self.encoding.per_channel else 1

    def _nnz(self, shape: tuple[int, ...]) -> int:
        n = math.prod(shape)
        return n if self.sparsifier is None else keep_count(n, self.sparsifier.keep)

    def _use_bitmap(self, shape: tuple[int, ...]) -> bool:
        n = math.prod(shape)
        return math.ceil(n / 8) <= self._nnz(shape) * len(shape) * 8

    def _tensor_layout(self, shape: tuple[int, ...]) -> dict[str, int]:
        """Byte sizes of one tensor's parts, in wire order: index, scale, zero, values."""
        nnz = self._nnz(shape)
        out = {"index": 0, "scale": 0, "zero": 0, "values": 4 * nnz}
        if math.prod(shape) == 0:  # an empty tensor (a row-sparse table with no rows sent) sends nothing
            return out
        if self.sparsifier is not None:
            n = math.prod(shape)
            out["index"] = math.ceil(n / 8) if self._use_bitmap(shape) else nnz * len(shape) * 8
        if self._quantised(shape):
            g = self._groups(shape)
            out.update(scale=8 * g, zero=4 * g, values=math.ceil(nnz * self.encoding.bits / 8))
        elif self.encoding is not None and self.encoding.name in ("fp16", "bf16"):
            out["values"] = 2 * nnz
        return out

    def tensor_bytes(self) -> list[int]:
        return [sum(p.values()) for p in self._layout]

    # -- one tensor ----------------------------------------------------------------------
    def _encode_tensor(self, x: Tensor, shape, generator) -> tuple[bytes, Tensor]:
        """(wire bytes, reconstructed float32 tensor of this shape)."""
        x = x.reshape(shape)
        n = x.numel()
        if n == 0:
            return b"", x.float()
        idx = None
        if self.sparsify_first:
            idx = self._mask(x, generator)
            dense = torch.zeros(n)
            dense[idx] = x.reshape(-1)[idx]
            x = dense.reshape(shape)
        # value encoding (dense), then the mask if it comes second
        scale_b = zero_b = b""
        if self._quantised(shape):
            q = self.encoding
            codes, scale, zero = quantize_codes(
                x, q.bits, per_channel=q.per_channel, stochastic=q.stochastic, generator=generator
            )
            rows = codes.reshape(scale.numel(), -1).double()
            values = (rows * scale[:, None] + zero.double()[:, None]).float().reshape(shape)
            scale_b, zero_b = scale.numpy().tobytes(), zero.numpy().tobytes()
            kind = ("q", codes)
        elif self.encoding is not None and self.encoding.name in ("fp16", "bf16"):
            half = x.to(torch.float16 if self.encoding.name == "fp16" else torch.bfloat16)
            values = half.float()
            kind = ("half", half)
        else:
            values = x.float()
            kind = ("fp32", values)
        if self.sparsifier is not None and not self.sparsify_first:
            idx = self._mask(values, generator)
        if idx is not None:
            kept = torch.zeros(n)
            kept[idx] = values.reshape(-1)[idx]
            values = kept.reshape(shape)
        sel = (lambda t: t.reshape(-1)[idx]) if idx is not None else (lambda t: t.reshape(-1))
        if kind[0] == "q":
            value_b = _pack(sel(kind[1]).numpy(), self.encoding.bits)
        elif kind[0] == "half":
            value_b = sel(kind[1]).view(torch.int16).numpy().tobytes()
        else:
            value_b = sel(kind[1]).contiguous().numpy().tobytes()
        index_b = b"" if idx is None else self._index_bytes(idx, shape)
        return index_b + scale_b + zero_b + value_b, values

    def _mask(self, x: Tensor, generator) -> Tensor:
        s = self.sparsifier
        return topk_mask(x, s.keep) if s.name == "topk" else random_mask(x, s.keep, generator)

    def _index_bytes(self, idx: Tensor, shape) -> bytes:
        n = math.prod(shape)
        if self._use_bitmap(shape):
            bits = np.zeros(n, dtype=np.uint8)
            bits[idx.numpy()] = 1
            return np.packbits(bits, bitorder="little").tobytes()
        coords = np.stack(np.unravel_index(idx.numpy(), shape), axis=1).astype("<i8")
        return coords.tobytes()

    def _decode_tensor(self, r: _Reader, shape, parts: dict[str, int]) -> Tensor:
        n, nnz = math.prod(shape), self._nnz(shape)
        if n == 0:
            return torch.zeros(0)
        idx = None
        if self.sparsifier is not None:
            raw = r.take(parts["index"])
            if self._use_bitmap(shape):
                bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little", count=n)
                idx = np.flatnonzero(bits)
                if len(idx) != nnz:
                    raise ValueError(f"compressed payload: bitmap marks {len(idx)} values, expected {nnz}")
            else:
                coords = np.frombuffer(raw, dtype="<i8").reshape(nnz, len(shape))
                if (coords < 0).any() or (coords >= np.array(shape)).any():
                    raise ValueError("compressed payload: a coordinate is outside the tensor")
                idx = np.ravel_multi_index(coords.T, shape)
                if nnz > 1 and not (np.diff(idx) > 0).all():
                    raise ValueError("compressed payload: coordinates are not strictly increasing")
            idx = torch.from_numpy(idx.astype(np.int64))
        if self._quantised(shape):
            g = self._groups(shape)
            scale = torch.from_numpy(np.frombuffer(r.take(8 * g), dtype="<f8").copy())
            zero = torch.from_numpy(np.frombuffer(r.take(4 * g), dtype="<f4").copy())
            codes = torch.from_numpy(_unpack(bytes(r.take(parts["values"])), nnz, self.encoding.bits).copy())
            if idx is None:
                rows = codes.reshape(g, -1).double()
                return (rows * scale[:, None] + zero.double()[:, None]).float().reshape(-1)
            group = idx // (n // g)
            vals = (codes.double() * scale[group] + zero.double()[group]).float()
        elif self.encoding is not None and self.encoding.name in ("fp16", "bf16"):
            dt = torch.float16 if self.encoding.name == "fp16" else torch.bfloat16
            vals = torch.from_numpy(np.frombuffer(r.take(2 * nnz), dtype="<i2").copy()).view(dt).float()
        else:
            vals = torch.from_numpy(np.frombuffer(r.take(4 * nnz), dtype="<f4").copy())
        if idx is None:
            return vals
        out = torch.zeros(n)
        out[idx] = vals
        return out

    # -- whole messages ------------------------------------------------------------------
    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> tuple[bytes, Tensor]:
        """(the wire payload, what the receiver reconstructs) for a flat float32 vector."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"channels: expected a flat vector of {self.numel} values, got {tuple(flat.shape)}")
        if self.lossless:
            data = flat.detach().to(torch.float32).contiguous()
            return data.numpy().tobytes(), data.clone()
        chunks, out, off = [], torch.empty(self.numel), 0
        for shape in self.shapes:
            n = math.prod(shape)
            b, v = self._encode_tensor(flat[off : off + n].detach().float(), shape, generator)
            chunks.append(b)
            out[off : off + n] = v.reshape(-1)
            off += n
        data = b"".join(chunks)
        assert len(data) == self.message_bytes, (len(data), self.message_bytes)
        return data, out

    def apply(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the receiver reconstructs (the simulator's path: the same code as the wire's)."""
        return self.encode(flat, generator)[1]

    def decode(self, data: bytes | bytearray | memoryview) -> Tensor:
        """The float32 flat vector of a payload; ValueError if it is malformed (wrong size, bad mask)."""
        if len(data) != self.message_bytes:
            raise ValueError(f"compressed payload has {len(data)} bytes, this chain sends {self.message_bytes}")
        if self.lossless:
            return torch.frombuffer(bytearray(data), dtype=torch.float32)
        r = _Reader(bytes(data))
        return torch.cat([self._decode_tensor(r, s, p) for s, p in zip(self.shapes, self._layout)])
