"""Patching: where patches start, from next-byte entropies (BLT) or from the bytes themselves.

Conventions.  ``entropy[:, t]`` is the entropy of the entropy model's prediction of byte t+1, made
from bytes 0..t (BLT: "entropy at position i describes byte i+1").  A start mask ``starts`` is
bool [B, T+1]: ``starts[:, s]`` says a patch starts at byte s; column T says whether a new patch
would start right after the window, i.e. whether the window's last patch is complete.  Every rule
here decides ``starts[:, s]`` from bytes < s only, which is what keeps the BLT model causal.
Positions 0 and 1 always start patches (as BLT).  Patch lengths sum to T (``patch_lengths``).
"""

from __future__ import annotations

from typing import Literal

import torch

from flotilla.blt.bytes import OFFSET

Mode = Literal["global", "monotonic", "combined"]


def entropy_starts(
    entropy: torch.Tensor,
    threshold: float,
    mode: Mode = "global",
    threshold_add: float | None = None,
    max_patch: int | None = None,
) -> torch.Tensor:
    """Start mask [B, T+1] from entropies [B, T].

    global: byte s starts a patch when H(s) > threshold; monotonic: when H(s) - H(s-1) > threshold;
    combined (BLT's threshold + threshold_add): when H(s) - H(s-1) > threshold_add and H(s) > threshold
    and byte s-1 did not start one.  ``max_patch`` splits longer patches.  H(s) = entropy[:, s-1].
    """
    b, t = entropy.shape
    h = entropy  # h[:, s-1] describes byte s
    diff = torch.zeros_like(h)
    diff[:, 1:] = h[:, 1:] - h[:, :-1]
    if mode == "global":
        rule = h > threshold
    elif mode == "monotonic":
        rule = diff > threshold
    elif mode == "combined":
        if threshold_add is None:
            raise ValueError("patching mode 'combined' needs threshold_add (the entropy-difference threshold)")
        rule = (diff > threshold_add) & (h > threshold)
    else:
        raise ValueError(f"unknown patching mode {mode!r} (global, monotonic, combined)")
    starts = torch.zeros(b, t + 1, dtype=torch.bool, device=entropy.device)
    starts[:, 1:] = rule
    starts[:, :2] = True
    if mode == "combined" or max_patch is not None:
        starts = _sequential(starts, mode == "combined", max_patch)
    return starts


def _sequential(starts: torch.Tensor, no_adjacent: bool, max_patch: int | None) -> torch.Tensor:
    """Rules that depend on earlier decisions: no start right after a rule start, and a maximum length."""
    if max_patch is not None and max_patch < 1:
        raise ValueError(f"max_patch must be >= 1, got {max_patch}")
    out = starts.clone()
    run = torch.ones(starts.shape[0], dtype=torch.long, device=starts.device)  # length of the open patch
    for s in range(2, starts.shape[1]):
        start = starts[:, s]
        if no_adjacent:
            start = start & ~out[:, s - 1]
        if max_patch is not None:
            start = start | (run >= max_patch)
        out[:, s] = start
        run = torch.where(start, 1, run + 1)
    return out


def space_starts(x: torch.Tensor, max_patch: int | None = None) -> torch.Tensor:
    """Space patching: a patch starts after every byte that is not a letter, a digit or a UTF-8
    continuation byte (BLT's baseline).  x: symbols [B, T]."""
    b, t = x.shape
    byte = x - OFFSET
    word = (
        ((byte >= ord("a")) & (byte <= ord("z")))
        | ((byte >= ord("A")) & (byte <= ord("Z")))
        | ((byte >= ord("0")) & (byte <= ord("9")))
        | ((byte >= 0x80) & (byte < 0xC0))
    )
    starts = torch.zeros(b, t + 1, dtype=torch.bool, device=x.device)
    starts[:, 1:] = ~word & (x >= OFFSET)
    starts[:, :2] = True
    return _sequential(starts, False, max_patch) if max_patch is not None else starts


def fixed_starts(batch: int, length: int, size: int, device=None) -> torch.Tensor:
    """Fixed-size patching: patches of ``size`` bytes after the always-start positions 0 and 1."""
    if size < 1:
        raise ValueError(f"patch size must be >= 1, got {size}")
    s = torch.arange(length + 1, device=device)
    starts = ((s - 1) % size == 0) | (s == 0)
    return starts[None].expand(batch, -1).clone()


def patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """[B, T]: the patch index of each byte (0-based, in order)."""
    return starts[:, :-1].long().cumsum(1) - 1


def patch_lengths(starts: torch.Tensor) -> list[list[int]]:
    """Each row's patch lengths, in order (they sum to T)."""
    t = starts.shape[1] - 1
    out = []
    for row in starts[:, :-1]:
        pos = torch.nonzero(row).flatten().tolist() + [t]
        out.append([b - a for a, b in zip(pos, pos[1:])])
    return out


def mean_patch_size(starts: torch.Tensor) -> float:
    """Bytes per patch over the whole batch."""
    return starts[:, :-1].numel() / max(int(starts[:, :-1].sum()), 1)


def calibrate_threshold(
    entropy: torch.Tensor,
    target: float,
    mode: Mode = "global",
    max_patch: int | None = None,
    iters: int = 40,
) -> float:
    """The threshold whose mean patch size on ``entropy`` is closest to ``target`` (bisection).

    The mean patch size never decreases as the threshold grows (fewer bytes pass it), so
    bisection finds the crossing.  For ``combined`` the entropy-difference threshold is 0.
    """
    if target < 1:
        raise ValueError(f"target mean patch size must be >= 1, got {target}")

    def size(theta: float) -> float:
        add = 0.0 if mode == "combined" else None
        return mean_patch_size(entropy_starts(entropy, theta, mode, threshold_add=add, max_patch=max_patch))

    span = float(entropy.max() - entropy.min()) + 1.0
    lo, hi = -span, span + float(entropy.abs().max())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if size(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if abs(size(lo) - target) <= abs(size(hi) - target) else hi
