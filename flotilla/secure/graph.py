"""Who masks with whom.

Bonawitz et al. pair every client with every other (cost n^2 overall).  SecAgg+ (Bell et al.,
CCS 2020) pairs each client only with k = O(log n) neighbours on a random graph; as long as the graph
of surviving honest clients stays connected the server still learns only the sum, and total cost
grows as n log n.  We use their construction: a Harary graph (ring lattice, each node joined to the
k/2 nearest positions on either side) over a random permutation of the clients.  The permutation is
derived from public randomness (the round's session id and the participant set), so every client
and the server compute the same graph without talking.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np


def default_degree(n: int) -> int:
    """SecAgg+ degree k for n clients: even, ~4 log2 n (28 for n=100, 40 for n=1000), < n."""
    if n <= 2:
        return max(n - 1, 0)
    k = 2 * math.ceil(2 * math.log2(n))
    return min(k, n - 1)


def neighbours(ids: Iterable[int], degree: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """Symmetric neighbour sets (self excluded). ``degree`` None, or >= n - 1: the complete graph."""
    ids = sorted(set(ids))
    n = len(ids)
    if degree is None or degree >= n - 1:
        everyone = frozenset(ids)
        return {i: everyone - {i} for i in ids}
    if degree < 1:
        raise ValueError(f"degree: must be >= 1, got {degree}")
    half = (degree + 1) // 2  # an odd degree is rounded up to the next even one
    material = hashlib.sha256(b"flotilla-secagg-graph" + seed + b"".join(int(i).to_bytes(8, "big") for i in ids))
    rng = np.random.default_rng(int.from_bytes(material.digest(), "big"))
    order = [ids[j] for j in rng.permutation(n)]
    out: dict[int, set[int]] = {i: set() for i in ids}
    for pos, i in enumerate(order):
        for step in range(1, half + 1):
            j = order[(pos + step) % n]
            out[i].add(j)
            out[j].add(i)
    return {i: frozenset(s) for i, s in out.items()}
