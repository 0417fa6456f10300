"""Split a centralised data set among simulated clients.

Pure functions on numpy with an explicit ``np.random.Generator``, so a partition is fully
determined by its arguments.  Each returns one sorted int64 index array per client (sorted
because order within a client does not matter and sorted gathers are cache-friendly).

* :func:`iid` - a random permutation cut into near-equal pieces.
* :func:`dirichlet` - label skew: client ``i`` draws class proportions ``q_i ~ Dir(alpha * 1)``
  and its examples follow ``q_i`` (Hsu et al. 2019, as in pfl-research).  Client sizes are
  fixed up front (equal by default), so label skew is not mixed with quantity skew.
* :func:`quantity_skew` - client sizes ~ lognormal(0, sigma), labels IID.
* :func:`split_test_like` - give each client held-out test examples drawn from its own
  distribution (same label proportions, test size proportional to its train size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every example to exactly one client; client sizes differ by at most one."""
    _check_counts(num_examples, num_clients)
    return _cut(rng.permutation(num_examples), _equal_sizes(num_examples, num_clients))


def quantity_skew(
    num_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    sigma: float = 1.0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Every example to exactly one client; sizes proportional to lognormal(0, sigma) draws.

    Each client gets at least ``min_size`` examples; the rest is shared out in proportion to
    the lognormal weights (largest-remainder rounding, so sizes sum exactly).
    """
    _check_counts(num_examples, num_clients)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if min_size * num_clients > num_examples:
        raise ValueError(
            f"min_size={min_size} is impossible: {num_clients} clients x {min_size} > {num_examples} examples"
        )
    weights = rng.lognormal(0.0, sigma, size=num_clients)
    sizes = min_size + _round_preserving_sum(weights / weights.sum() * (num_examples - min_size * num_clients))
    return _cut(rng.permutation(num_examples), sizes)


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Label-skewed partition: client ``i``'s label mix follows ``q_i ~ Dir(alpha * ones(K))``.

    ``sizes=None`` splits all examples into near-equal clients, every example exactly once.
    Given ``sizes`` (e.g. 1,000 users x 50 examples), ``sum(sizes)`` may be less than the
    number of examples: each example is then used at most once and the rest left out.

    Examples are drawn per client from its ``q_i``; when a class runs out, the client's draw
    is renormalised over the classes that remain (so the last clients filled are somewhat
    less skewed - the usual price of using every example).  Because sizes are fixed up front
    no retry loop is needed: ``min_size`` is checked against them.  Small ``alpha`` (0.1)
    gives one or two classes per client; large ``alpha`` (100) is close to IID.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    _check_counts(len(labels), num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    sizes = _equal_sizes(len(labels), num_clients) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if len(sizes) != num_clients:
        raise ValueError(f"sizes has {len(sizes)} entries for num_clients={num_clients}")
    if sizes.sum() > len(labels):
        raise ValueError(f"sizes sum to {sizes.sum()} but there are only {len(labels)} examples")
    if sizes.min() < min_size:
        raise ValueError(f"min_size={min_size} is impossible: some client gets only {sizes.min()} examples")
    num_classes = int(labels.max()) + 1
    probs = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_clients)
    return _allocate(labels, sizes, probs, rng)


def split_test_like(
    train_parts: Sequence[np.ndarray],
    num_test: int,
    rng: np.random.Generator,
    train_labels: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Share ``num_test`` test examples among clients so each test split matches its client.

    Client ``i`` gets a test share proportional to its train size (all test examples are
    used, each once).  With labels given (for label-skewed partitions) the test examples also
    follow the client's train label proportions, as far as the test set's class counts allow.
    """
    train_sizes = np.array([len(p) for p in train_parts], dtype=np.float64)
    if train_sizes.sum() == 0:
        raise ValueError("train_parts are all empty")
    test_sizes = _round_preserving_sum(train_sizes / train_sizes.sum() * num_test)
    if train_labels is None or test_labels is None:
        return _cut(rng.permutation(num_test), test_sizes)
    test_labels = np.asarray(test_labels)
    if len(test_labels) != num_test:
        raise ValueError(f"test_labels has {len(test_labels)} entries, num_test={num_test}")
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    counts = np.stack([np.bincount(train_labels[p], minlength=num_classes) for p in train_parts]).astype(np.float64)
    # A client with no train data gets a test size of 0 anyway; uniform avoids 0/0.
    probs = np.where(counts.sum(1, keepdims=True) > 0, counts, 1.0)
    probs /= probs.sum(1, keepdims=True)
    return _allocate(test_labels, test_sizes, probs, rng)


def label_distance(parts: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global one.

    0 for perfectly IID clients, approaching 1 for single-class clients; a simple gauge of skew.
    """
    num_classes = int(np.max(labels)) + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    dists = []
    for p in parts:
        if len(p):
            mix = np.bincount(labels[p], minlength=num_classes) / len(p)
            dists.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(dists))


def _allocate(labels: np.ndarray, sizes: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Give client ``i`` ``sizes[i]`` examples whose labels follow ``probs[i]``, each example once.

    Clients are filled in random order.  A client's class counts are a multinomial draw,
    clipped to what is left of each class; the shortfall is redrawn over the classes that
    remain.  Each redraw empties at least one class, so this ends within K+1 rounds.
    """
    num_classes = probs.shape[1]
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    avail = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(num_classes, dtype=np.int64)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(sizes)
    for client in rng.permutation(len(sizes)):
        need = int(sizes[client])
        counts = np.zeros(num_classes, dtype=np.int64)
        while need > 0:
            p = probs[client] * (avail > 0)
            if p.sum() <= 0:  # all the classes this client likes are used up
                p = avail.astype(np.float64)
            draw = np.minimum(rng.multinomial(need, p / p.sum()), avail)
            counts += draw
            avail -= draw
            need -= int(draw.sum())
        chunks = [pools[k][taken[k] : taken[k] + counts[k]] for k in range(num_classes)]
        taken += counts
        parts[client] = np.sort(np.concatenate(chunks)).astype(np.int64)
    return parts


def _check_counts(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} exceeds num_examples={num_examples}: some client would be empty")


def _equal_sizes(total: int, parts: int) -> np.ndarray:
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def _round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Round non-negative floats to ints with the same (rounded) total: largest remainder."""
    floor = np.floor(values).astype(np.int64)
    short = int(round(values.sum())) - int(floor.sum())
    if short > 0:
        floor[np.argsort(floor - values, kind="stable")[:short]] += 1
    return floor


def _cut(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[a:b]).astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])]
