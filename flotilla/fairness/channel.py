"""Per-tier compression of client updates (a ``Components.client_update`` around the real one).

After the wrapped update wrote a client's delta, the client's tier decides what reaches the
aggregator (RF^2's per-tier "lo-mid-hi" settings):

* ``prune_keep[t]``: random gradient pruning, a uniformly random fraction of the coordinates kept
  (the others zeroed), over the whole flat update (``flotilla.channels.sparsify.random_sparsify``);
* ``quantize_bits[t]``: stochastic quantisation of each weight tensor to that many bits
  (``flotilla.channels.quantize.quantize``, one scale per tensor); 1-D tensors (biases) stay in
  full precision, as FLSim's scalar quantisation channel leaves them.

Tiers not named send their update unchanged.  The randomness is seeded from the client's seed.
"""

from __future__ import annotations

import numpy as np
import torch

from flotilla.channels.quantize import quantize
from flotilla.channels.sparsify import random_sparsify
from flotilla.fairness.tiers import TIERS


class TierChannel:
    def __init__(self, inner, flat, tier: np.ndarray, *, quantize_bits=None, prune_keep=None):
        self.inner = inner
        self.tier = np.asarray(tier, dtype=np.int64)
        self.bits = [(quantize_bits or {}).get(n) for n in TIERS]
        self.keep = [(prune_keep or {}).get(n) for n in TIERS]
        # (offset, numel, shape) of each parameter tensor in the flat vector
        self.slices, offset = [], 0
        for shape in flat.shapes:
            n = int(np.prod(shape)) if shape else 1
            self.slices.append((offset, n, shape))
            offset += n

    def __getattr__(self, name):  # the wrapped update's other attributes (spec, ...)
        return getattr(self.inner, name)

    def train(self, dataset, client: int, weights: torch.Tensor, seed: int, out: torch.Tensor):
        result = self.inner.train(dataset, client, weights, seed, out)
        t = int(self.tier[client])
        keep, bits = self.keep[t], self.bits[t]
        if keep is None and bits is None:
            return result
        gen = torch.Generator().manual_seed(int(seed) ^ 0x7C4A11E1)
        if keep is not None and keep < 1:
            out.copy_(random_sparsify(out, keep, gen))
        if bits is not None:
            for offset, n, shape in self.slices:
                if len(shape) >= 2:
                    v = out[offset : offset + n]
                    v.copy_(quantize(v.view(shape), bits, stochastic=True, generator=gen).reshape(-1))
        return result
