"""Scalar quantisation to 1-8 bits with a min/max scale and zero point (FLSim's scalar channel).

``quantize`` returns the *dequantised* values: what the receiver reconstructs. The integer codes
are ``q = round((x - min) / scale)`` in ``[0, 2**bits - 1]`` with ``scale = (max - min) / (2**bits - 1)``,
per tensor or per output channel (dim 0). The zero point is the float32 minimum itself (4 bytes,
the same size as FLSim's int32 zero point) so the range is covered exactly and nothing is clamped.
Stochastic rounding (``floor(q + U[0, 1))``) makes the result unbiased: E[quantize(x)] = x.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def quantize_codes(
    x: Tensor,
    bits: int,
    *,
    per_channel: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The wire form: (codes uint8 shaped like x, scale float64 [groups], zero point float32 [groups]).

    Groups are the output channels (dim 0) when ``per_channel`` and ``x.dim() >= 2``, else one.
    """
    check_bits(bits)
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize: tensor has non-finite values")
    levels = (1 << bits) - 1
    rows = x.detach().to(torch.float32).reshape(x.shape[0] if per_channel and x.dim() >= 2 else 1, -1)
    if rows.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.float64), torch.zeros(0)
    lo = rows.min(dim=1).values
    hi = rows.max(dim=1).values
    scale = (hi.double() - lo.double()) / levels
    # A constant group has scale 0: every code is 0 and the zero point alone carries the value.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (rows.double() - lo.double()[:, None]) / safe[:, None]
    if stochastic:
        q = torch.floor(q + torch.rand(q.shape, generator=generator, dtype=torch.float64))
    else:
        q = torch.round(q)
    codes = q.clamp_(0, levels).to(torch.uint8).reshape(x.shape)
    return codes, scale, lo


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Values the receiver reconstructs from the wire form (float32, shaped like ``codes``)."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32)
    rows = codes.reshape(scale.numel(), -1).double()
    values = rows * scale.double()[:, None] + zero_point.double()[:, None]
    return values.to(torch.float32).reshape(codes.shape)


def quantize(
    x: Tensor,
    bits: int,
    *,
    per_channel: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Quantise ``x`` to ``bits`` bits and return the dequantised float32 values (shape of ``x``)."""
    codes, scale, zero = quantize_codes(x, bits, per_channel=per_channel, stochastic=stochastic, generator=generator)
    return dequantize(codes, scale, zero)
