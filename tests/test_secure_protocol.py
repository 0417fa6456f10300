"""The SecAgg / SecAgg+ protocol state machines: correctness under dropouts, aborts, privacy of a
single masked input, and rejection of tampered or replayed messages."""

import dataclasses
import math

import numpy as np
import pytest

from flotilla.secure import (
    ProtocolError,
    ReplayedMessage,
    SecAggAborted,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    TamperedMessage,
)

L = 2_000


class Round:
    """Drives one protocol round; ``drop`` maps client id -> stage it drops before finishing."""

    def __init__(self, n, degree=None, threshold=None, bits=32, drop=None, seed=0):
        # A fixed session id fixes the SecAgg+ graph, so which neighbourhoods lose members is reproducible.
        self.cfg = SecAggConfig(
            length=L, cohort=n, bits=bits, degree=degree, threshold=threshold, session=b"test-round-%d" % seed
        )
        self.server = SecAggServer(self.cfg)
        self.clients = {i: SecAggClient(i, self.cfg) for i in range(1, n + 1)}
        self.drop = drop or {}
        rng = np.random.default_rng(seed)
        self.x = {i: rng.integers(0, 1 << bits, L, dtype=self.cfg.dtype) for i in self.clients}

    def live(self, stage, ids):
        return [i for i in ids if self.drop.get(i) != stage]

    def keys(self):
        for i in self.live("advertise", self.clients):
            self.server.receive_advertise(self.clients[i].advertise())
        self.directory = self.server.close_advertise()
        for i in self.live("share", self.directory.keys):
            self.server.receive_shares(self.clients[i].share_keys(self.directory))
        self.bundles = self.server.close_shares()

    def mask(self):
        for i in self.live("mask", self.bundles):
            self.server.receive_masked_input(self.clients[i].masked_input(self.bundles[i], self.x[i]))
        self.request = self.server.close_masked_input()

    def unmask(self):
        self.responses = {}
        for i in self.live("unmask", sorted(self.request.survivors)):
            self.responses[i] = self.clients[i].unmask(self.request)
            self.server.receive_unmask(self.responses[i])
        return self.server.finish()

    def run(self):
        self.keys()
        self.mask()
        return self.unmask()

    def expected(self):
        out = np.zeros(L, self.cfg.dtype)
        for i in self.request.survivors:
            out += self.x[i]
        return out


@pytest.mark.parametrize("bits", [32, 64])
def test_unmasked_sum_equals_plaintext_sum(bits):
    r = Round(8, bits=bits)
    total = r.run()
    assert r.request.survivors == set(range(1, 9))
    assert np.array_equal(total, r.expected())


@pytest.mark.parametrize("degree", [None, 8])
@pytest.mark.parametrize(
    "drop",
    [
        {3: "advertise"},
        {3: "share"},
        {3: "mask", 7: "mask"},
        {3: "unmask"},
        {1: "advertise", 2: "share", 3: "mask", 4: "unmask", 12: "mask"},
    ],
)
def test_dropouts_at_every_stage(drop, degree):
    r = Round(12, degree=degree, drop=drop)
    total = r.run()
    lost = {i for i, s in drop.items() if s != "unmask"}
    assert r.request.survivors == set(range(1, 13)) - lost  # unmask-stage dropouts are still summed
    assert np.array_equal(total, r.expected())


def test_survivors_never_reveal_both_secrets_of_one_client():
    r = Round(10, drop={2: "mask", 5: "unmask"})
    r.run()
    for resp in r.responses.values():
        assert not set(resp.b_shares) & set(resp.s_shares)
        assert 2 not in resp.b_shares and 5 not in resp.s_shares
    with pytest.raises(ProtocolError):  # a second request (e.g. another survivor set) is refused
        r.clients[1].unmask(dataclasses.replace(r.request, survivors=frozenset(range(1, 10)) - {5}))


@pytest.mark.parametrize("stage", ["advertise", "share", "mask", "unmask"])
def test_abort_with_fewer_than_t_survivors(stage):
    r = Round(7, drop={i: stage for i in (1, 2, 3, 4)})  # t = 4 of 7, only 3 get through
    assert r.cfg.t == 4
    with pytest.raises(SecAggAborted, match="nothing was disclosed"):
        r.run()
    assert r.server.stage == "aborted"


def test_clients_refuse_to_unmask_for_too_few_survivors():
    r = Round(7)
    r.keys()
    r.mask()
    small = dataclasses.replace(r.request, survivors=frozenset({1, 2, 3}))
    with pytest.raises(SecAggAborted):
        r.clients[1].unmask(small)
    assert r.clients[1].stage == "unmask"  # nothing revealed, can still answer the real request


def _ks_uniform_pvalue(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov test of samples in [0, 1) against the uniform distribution."""
    u = np.sort(u)
    n = len(u)
    d = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    x = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return float(min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))))


def _chi2_bytes_pvalue(data: bytes) -> float:
    """Chi-square test of byte frequencies against uniform (Wilson-Hilferty normal approximation)."""
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    exp = len(data) / 256
    stat, k = float(((counts - exp) ** 2 / exp).sum()), 255
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_a_single_masked_input_looks_uniform():
    r = Round(4, degree=None)
    r.x = {i: np.full(L, 7 * i, r.cfg.dtype) for i in r.clients}  # maximally structured inputs
    r.keys()
    y = r.clients[1].masked_input(r.bundles[1], r.x[1]).y
    y = np.concatenate([y, r.clients[2].masked_input(r.bundles[2], r.x[2]).y])
    assert _ks_uniform_pvalue(y / 2.0**32) > 1e-6
    assert _chi2_bytes_pvalue(y.tobytes()) > 1e-6
    # The tests have power: a plainly encoded update fails both.
    plain = np.random.default_rng(0).normal(0, 1000, 2 * L).astype(np.int64).astype(np.uint32)
    assert _ks_uniform_pvalue(plain / 2.0**32) < 1e-6
    assert _chi2_bytes_pvalue(plain.tobytes()) < 1e-6


def test_tampered_share_ciphertext_is_rejected_and_harmless():
    r = Round(6)
    r.keys()
    genuine = r.bundles[4]
    ct = bytearray(genuine.ciphertexts[2])
    ct[30] ^= 1
    tampered = dataclasses.replace(genuine, ciphertexts={**genuine.ciphertexts, 2: bytes(ct)})
    with pytest.raises(TamperedMessage, match="client 2"):
        r.clients[4].masked_input(tampered, r.x[4])
    misrouted = dataclasses.replace(genuine, ciphertexts={**genuine.ciphertexts, 2: genuine.ciphertexts[3]})
    with pytest.raises(TamperedMessage):
        r.clients[4].masked_input(misrouted, r.x[4])
    assert r.clients[4].stage == "mask"  # state unchanged: the genuine bundle still works
    r.mask()
    assert np.array_equal(r.unmask(), r.expected())


def test_replayed_and_forged_shares_are_rejected_and_harmless():
    r = Round(6, drop={5: "mask"})
    r.keys()
    r.mask()
    resp = r.clients[1].unmask(r.request)
    r.server.receive_unmask(resp)
    with pytest.raises(ReplayedMessage):
        r.server.receive_unmask(resp)
    # Client 2 re-sends client 1's share of client 3's seed as its own: fails the commitment.
    forged = r.clients[2].unmask(r.request)
    bad = dataclasses.replace(forged, b_shares={**forged.b_shares, 3: resp.b_shares[3]})
    with pytest.raises(TamperedMessage, match="commitment"):
        r.server.receive_unmask(bad)
    share, salt = forged.s_shares[5]
    bad = dataclasses.replace(forged, s_shares={5: (bytes(len(share)), salt)})
    with pytest.raises(TamperedMessage):
        r.server.receive_unmask(bad)
    r.server.receive_unmask(forged)  # the genuine one is still accepted
    for i in (3, 4, 6):
        r.server.receive_unmask(r.clients[i].unmask(r.request))
    assert np.array_equal(r.server.finish(), r.expected())


def test_messages_from_another_round_or_repeated_are_rejected():
    a, b = Round(5), Round(5, seed=1)
    a.keys()
    b.keys()
    with pytest.raises(ReplayedMessage, match="another round"):
        a.clients[1].masked_input(b.bundles[1], a.x[1])
    msg = a.clients[2].masked_input(a.bundles[2], a.x[2])
    a.server.receive_masked_input(msg)
    with pytest.raises(ReplayedMessage):
        a.server.receive_masked_input(msg)  # would double-count client 2
    with pytest.raises(ProtocolError):
        a.server.receive_masked_input(dataclasses.replace(msg, sender=9))
    for i in (1, 3, 4, 5):
        a.server.receive_masked_input(a.clients[i].masked_input(a.bundles[i], a.x[i]))
    a.request = a.server.close_masked_input()
    assert np.array_equal(a.unmask(), a.expected())


def test_secagg_plus_shares_only_with_neighbours_and_sums_correctly():
    n = 60
    drop = {i: s for i, s in zip(range(1, 13), ["advertise", "share", "mask", "unmask"] * 3)}
    r = Round(n, degree=8, drop=drop)
    assert r.cfg.sparse and r.cfg.neighbourhood == 9 and r.cfg.t == 5
    total = r.run()
    assert np.array_equal(total, r.expected())
    for bundle in r.bundles.values():
        assert len(bundle.ciphertexts) <= 8  # O(k) messages per client, not O(n)


def test_secagg_plus_aborts_when_one_neighbourhood_cannot_recover():
    r = Round(30, degree=4)  # neighbourhood 5, t = 3
    r.keys()
    victim = 1
    nb = sorted(r.server.graph[victim])
    r.drop = {victim: "mask", nb[0]: "unmask", nb[1]: "unmask", nb[2]: "unmask"}
    r.mask()
    with pytest.raises(SecAggAborted, match="only . shares of client .*threshold is 3"):
        r.unmask()
