"""Transformer pieces with explicit boolean masks (plain PyTorch attention; BLT's FlexAttention does
not run on a CPU).  A mask is True where a query may attend to a key."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def causal_mask(n: int, window: int | None = None, device=None) -> torch.Tensor:
    """[n, n]: query i sees keys j <= i (and j > i - window with a local window)."""
    i = torch.arange(n, device=device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    return mask


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the sequence axis of x [B, H, T, D] (D even)."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)
    angles = torch.arange(t, device=x.device, dtype=x.dtype)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head attention from ``queries`` to ``keys`` under a boolean mask [B or 1, Tq, Tk]."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, rope: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.rope = heads, rope
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        # BLT normalises queries and keys of its cross-attention (RMSNorm)
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        b, tq, d = x.shape
        src = x if kv is None else kv
        q = self.q(x).view(b, tq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = rotary(q), rotary(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None] if mask.dim() == 3 else mask)
        return self.out(out.transpose(1, 2).reshape(b, tq, d))


class Block(nn.Module):
    """Pre-norm self-attention + MLP (4x) block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a residual add, no rotary embedding, RMS-normalised q and k (as BLT)."""

    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.RMSNorm(dim), nn.RMSNorm(kv_dim)
        self.attn = Attention(dim, heads, kv_dim=kv_dim, rope=False, qk_norm=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm_q(x), mask, kv=self.norm_kv(kv))
