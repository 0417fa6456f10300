"""Device tiers (low / mid / high) and how clients are assigned to them (RF^2, Maeng et al. 2022).

``random``: tier = client index mod 3, independent of the data.
``dirichlet`` (RF^2's procedure, facebookresearch/RF2 ``dlrm/data_utils.py: map_tiers``): map each
item to the clients that hold it; take items most popular first; for each, draw shares from
Dirichlet(alpha x 1_3), sort them descending, shuffle the item's not-yet-assigned clients and give
the first ``int(share_0 n)`` to the currently smallest tier, the next ``int(share_1 n)`` to the next
smallest, the rest to the largest.  Clients holding no item go last, the same way.  With a small
alpha (RF^2: 0.005) one share is ~1, so clients that share items share a tier: tiers become
correlated with the data, as real device classes are.

Tier indices: 0 = low, 1 = mid, 2 = high.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIERS = ("low", "mid", "high")
LOW, MID, HIGH = 0, 1, 2


def assign_random(num_clients: int) -> np.ndarray:
    """Tier of each client: its index mod 3 (RF^2's ``random``)."""
    return (np.arange(num_clients) % 3).astype(np.int64)


def assign_dirichlet(client_items: Sequence[Sequence[int]], alpha: float, seed: int, rng=None) -> np.ndarray:
    """Tier of each client by RF^2's Dirichlet procedure (module docstring); deterministic in ``seed``.

    ``client_items[c]``: the items (labels, plays, clicked movies...) client ``c`` holds.
    Item popularity ties are broken by the larger item id first, as RF^2's ``sort()[::-1]`` does.
    ``rng``: a numpy Generator to use instead of the seed's (tests give one with fixed shares).
    """
    if not alpha > 0:
        raise ValueError(f"tiers.alpha: must be > 0, got {alpha}")
    rng = rng if rng is not None else np.random.default_rng([seed, 0x71E5])
    holders: dict[int, list[int]] = {}
    empty: list[int] = []
    for c, items in enumerate(client_items):
        items = set(int(i) for i in items)
        if not items:
            empty.append(c)
        for i in sorted(items):
            holders.setdefault(i, []).append(c)
    order = sorted(holders, key=lambda i: (len(holders[i]), i), reverse=True)
    groups = [holders[i] for i in order] + ([empty] if empty else [])
    tier = np.full(len(client_items), -1, dtype=np.int64)
    sizes = [0, 0, 0]
    for group in groups:
        shares = np.sort(rng.dirichlet([alpha] * 3))[::-1]
        todo = np.array([c for c in group if tier[c] < 0], dtype=np.int64)
        if len(todo) == 0:
            continue
        rng.shuffle(todo)
        n = len(todo)
        cut0 = int(shares[0] * n)
        cut1 = int((shares[0] + shares[1]) * n)
        smallest_first = sorted(range(3), key=lambda t: (sizes[t], t))
        for t, part in zip(smallest_first, (todo[:cut0], todo[cut0:cut1], todo[cut1:])):
            tier[part] = t
            sizes[t] += len(part)
    return tier


def check_nonempty(tier: np.ndarray, where: str = "tiers") -> None:
    """Refuse an assignment that leaves a tier without clients (per-tier metrics would be undefined)."""
    counts = np.bincount(tier, minlength=3)
    empty = [TIERS[t] for t in range(3) if counts[t] == 0]
    if empty:
        sizes = ", ".join(f"{n} {c}" for n, c in zip(TIERS, counts.tolist()))
        raise ValueError(
            f"{where}.assignment: the {' and '.join(empty)} tier{'s are' if len(empty) > 1 else ' is'} left "
            f"empty ({sizes} clients); use more clients, a larger tiers.alpha, or assignment: random"
        )


def tier_counts(tier: np.ndarray) -> dict[str, int]:
    counts = np.bincount(tier, minlength=3)
    return {n: int(c) for n, c in zip(TIERS, counts)}
