"""Sparsification: keep a fraction of the coordinates, zero the rest (FLSim's sparse mask channels).

Kept values are not rescaled: with error feedback the dropped mass is sent later, which is what
the channels here use; a caller wanting an unbiased random mask divides by ``keep_fraction``.
The number kept is ``round(keep_fraction * numel)``, at least one for a non-empty tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_count(numel: int, keep_fraction: float) -> int:
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)):
        raise ValueError(f"keep_fraction must be a number in (0, 1], got {keep_fraction!r}")
    if not (math.isfinite(keep_fraction) and 0 < keep_fraction <= 1):
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    if numel == 0:
        return 0
    return min(numel, max(1, round(keep_fraction * numel)))


def random_mask(x: Tensor, keep_fraction: float, generator: torch.Generator | None) -> Tensor:
    """Flat indices (sorted) of ``keep_count`` coordinates drawn uniformly without replacement."""
    k = keep_count(x.numel(), keep_fraction)
    return torch.randperm(x.numel(), generator=generator)[:k].sort().values


def topk_mask(x: Tensor, keep_fraction: float) -> Tensor:
    """Flat indices (sorted) of the ``keep_count`` largest magnitudes."""
    k = keep_count(x.numel(), keep_fraction)
    return torch.topk(x.detach().reshape(-1).abs(), k, sorted=False).indices.sort().values


def _keep(x: Tensor, idx: Tensor) -> Tensor:
    out = torch.zeros(x.numel(), dtype=x.dtype)
    flat = x.detach().reshape(-1)
    out[idx] = flat[idx]
    return out.reshape(x.shape)


def random_sparsify(x: Tensor, keep_fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """``x`` with all but a uniformly random ``keep_fraction`` of its coordinates set to zero."""
    return _keep(x, random_mask(x, keep_fraction, generator))


def topk_sparsify(x: Tensor, keep_fraction: float) -> Tensor:
    """``x`` with all but its ``keep_fraction`` largest-magnitude coordinates set to zero."""
    return _keep(x, topk_mask(x, keep_fraction))
