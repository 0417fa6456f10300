"""Hash n-gram embeddings (BLT): for each n, a polynomial hash of the n symbols ending at each
position indexes an embedding table; all tables' vectors are summed onto the byte embedding.

The hash of the n-gram (x_{t-n+1}, ..., x_t), left-padded with zeros (BOE) before the start, is
``sum_j x_{t-n+1+j} * base**j  mod table_size`` with the large prime base 1000000007 (the first of
BLT's list).  BLT multiplies in wrapping int64 and takes the modulus at the end; here every product
is reduced modulo the table size first, so the value equals the exact integer formula (and the
test checks it against Python's big integers).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BASE = 1_000_000_007


def ngram_hash(x: torch.Tensor, n: int, table_size: int, base: int = BASE) -> torch.Tensor:
    """[B, T] symbols -> [B, T] hash ids in 0..table_size-1 of the n-gram ending at each position."""
    if n < 1 or table_size < 1:
        raise ValueError(f"n and table_size must be >= 1, got n={n}, table_size={table_size}")
    padded = F.pad(x.long(), (n - 1, 0), value=0)
    windows = padded.unfold(-1, n, 1)  # [B, T, n], oldest symbol first
    powers = torch.tensor([pow(base, j, table_size) for j in range(n)], dtype=torch.long, device=x.device)
    # symbols < 2**9 and powers < table_size: each product and the sum of n of them fit in int64
    return ((windows % table_size) * powers).sum(-1) % table_size


class HashEmbeddings(nn.Module):
    """Sum over n in ``ns`` of table_n[hash_n(x)] (one table per n)."""

    def __init__(self, dim: int, ns: tuple[int, ...] = (3, 4, 5, 6, 7, 8), table_size: int = 50_002):
        super().__init__()
        self.ns, self.table_size = tuple(ns), table_size
        self.tables = nn.ModuleList(nn.Embedding(table_size, dim) for _ in self.ns)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for n, table in zip(self.ns, self.tables):
            out = out + table(ngram_hash(x, n, self.table_size))
        return out
