"""Building blocks of secure aggregation: ring encoding, PRG, Shamir sharing, SecAgg+ graph."""

import math

import numpy as np
import pytest

from flotilla.secure import shamir
from flotilla.secure.encoding import FixedPointEncoder
from flotilla.secure.graph import default_degree, neighbours
from flotilla.secure.prg import PRG, expand


@pytest.mark.parametrize("bits", [32, 64])
def test_decoded_sum_is_within_the_documented_bound(bits):
    n, clip = 50, 0.5
    enc = FixedPointEncoder(clip, max_summands=n, bits=bits)
    rng = np.random.default_rng(0)
    vals = rng.uniform(-0.7, 0.7, size=(n, 20_000))  # some values get clipped
    ring = np.zeros(20_000, enc.dtype)
    for v in vals:
        ring += enc.encode(v)
    exact = np.clip(vals, -clip, clip).sum(0)
    err = np.abs(enc.decode(ring) - exact).max()
    assert err <= enc.error_bound(n)
    assert enc.error_bound(n) == pytest.approx(n * clip / enc.q)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_full_cohort_at_the_clip_bound_does_not_overflow(bits):
    n = 1000
    enc = FixedPointEncoder(1.0, max_summands=n, bits=bits)
    for sign in (1.0, -1.0):
        ring = np.zeros(3, enc.dtype)
        for _ in range(n):
            ring += enc.encode(np.full(3, 5.0 * sign))  # clipped to +-1, n times
        assert np.allclose(enc.decode(ring), sign * n, atol=enc.error_bound(n))


def test_weight_factor_and_its_limits():
    enc = FixedPointEncoder(2.0, max_summands=4)
    assert enc.decode(enc.encode([1.0, -3.0], factor=0.25)) == pytest.approx([0.25, -0.5], abs=enc.step)
    with pytest.raises(ValueError):
        enc.encode([1.0], factor=1.5)  # would break the overflow guarantee
    with pytest.raises(ValueError):
        FixedPointEncoder(1.0, max_summands=1 << 40, bits=32)


def test_prg_is_deterministic_and_seed_dependent():
    a, b = b"\x01" * 32, b"\x02" * 32
    x = expand(a, 1000)
    assert np.array_equal(x, expand(a, 1000))
    assert not np.array_equal(x, expand(b, 1000))
    prg = PRG(1000, np.uint64)
    acc = np.zeros(1000, np.uint64)
    prg.add_into(acc, a)
    prg.add_into(acc, a, -1)
    assert not acc.any()  # masks cancel exactly mod 2^64


def test_shamir_any_t_shares_recover_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, range(1, 7))
    for xs in [(1, 2, 3), (2, 4, 6), (1, 5, 6)]:
        assert shamir.combine({x: shares[x] for x in xs}) == secret
    assert shamir.combine({x: shares[x] for x in xs}, 32) == secret
    # t-1 shares interpolate to a uniformly random field element: almost surely not even 256 bits.
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine({1: shares[1], 2: shares[2]})
    assert shamir.combine({1: shares[1], 2: (shares[2] + 1) % shamir.PRIME, 3: shares[3]}) != secret
    y = shares[4]
    assert shamir.share_from_bytes(shamir.share_to_bytes(y)) == y


def test_secagg_plus_graph_is_symmetric_logarithmic_and_public():
    ids = list(range(1, 1001))
    k = default_degree(1000)
    g = neighbours(ids, k, b"session")
    assert k <= 4 * math.ceil(math.log2(1000)) and k % 2 == 0
    assert all(len(nb) == k and i not in nb for i, nb in g.items())
    assert all(i in g[j] for i, nb in g.items() for j in nb)
    assert g == neighbours(ids, k, b"session")  # everyone derives the same graph
    assert g != neighbours(ids, k, b"other round")
    seen, todo = {1}, [1]  # connected
    while todo:
        for j in g[todo.pop()] - seen:
            seen.add(j)
            todo.append(j)
    assert len(seen) == 1000
    full = neighbours(range(1, 6), None, b"s")
    assert full[3] == {1, 2, 4, 5}
