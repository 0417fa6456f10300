"""SecureBuffer: the relay sees only ciphertexts; the buffer rejects replays and tampering without
changing state, applies staleness weights inside, and never releases a sum of fewer than K."""

import dataclasses

import pytest
import torch

from flotilla.core.aggregate import UpdateRejected
from flotilla.secure import BufferNotReady, ProtocolError, ReplayedMessage, SecureBuffer, TamperedMessage, seal_update

N = 1_000


def _delta(i):
    return torch.randn(N, generator=torch.Generator().manual_seed(i)) * 0.1


def test_weighted_staleness_sum_is_released_only_from_k_updates():
    buf = SecureBuffer(N, min_updates=3, staleness_weight=lambda tau: 1 / (1 + tau) ** 0.5)
    a = [buf.assign(c, version=v) for c, v in [(0, 0), (1, 2), ("phone-7", 3)]]
    ups = [seal_update(_delta(i), w, a[i]) for i, w in enumerate([1.0, 2.0, 4.0])]
    assert all(_delta(0).numpy().tobytes()[:64] not in u.ciphertext for u in ups)  # the relay sees ciphertext
    assert buf.receive(ups[0], server_version=3) == pytest.approx(0.5)
    buf.receive(ups[1], server_version=3)
    with pytest.raises(BufferNotReady):
        buf.release()  # 2 < K
    buf.receive(ups[2], server_version=3)
    rel = buf.release()
    expect = 0.5 * _delta(0) + 2 / 2**0.5 * _delta(1) + 4 * _delta(2)
    assert torch.allclose(rel.sum, expect, atol=1e-6)
    assert rel.count == 3 and rel.total_weight == pytest.approx(0.5 + 2**0.5 + 4)
    assert buf.count == 0 and not buf.ready
    with pytest.raises(BufferNotReady):
        buf.release()  # emptied by the release


def _loaded_buffer():
    buf = SecureBuffer(N, min_updates=2, max_norm=10.0)
    buf.receive(seal_update(_delta(0), 1.0, buf.assign(0, 0)), server_version=0)
    return buf, buf._sum.clone()


def test_replayed_update_is_rejected_and_state_unchanged():
    buf = SecureBuffer(N, min_updates=2)
    up = seal_update(_delta(0), 1.0, buf.assign(0, 0))
    buf.receive(up, 0)
    before = buf._sum.clone()
    with pytest.raises(ReplayedMessage):
        buf.receive(up, 0)
    assert buf.count == 1 and torch.equal(buf._sum, before)
    buf.receive(seal_update(_delta(1), 1.0, buf.assign(1, 0)), 0)
    assert torch.allclose(buf.release().sum, _delta(0) + _delta(1))
    with pytest.raises(ReplayedMessage):  # still a replay after the release
        buf.receive(up, 1)


@pytest.mark.parametrize("attack", ["flip", "client", "version", "nonce", "ephemeral", "truncate"])
def test_tampered_update_is_rejected_and_state_unchanged(attack):
    buf, before = _loaded_buffer()
    a = buf.assign(1, 0)
    up = seal_update(_delta(1), 1.0, a)
    other = buf.assign(2, 0)
    ct = bytearray(up.ciphertext)
    ct[100] ^= 0x80
    bad = {
        "flip": dataclasses.replace(up, ciphertext=bytes(ct)),
        "client": dataclasses.replace(up, client=2, nonce=other.nonce),  # moved to another assignment
        "version": dataclasses.replace(up, version=1),
        "nonce": dataclasses.replace(up, nonce=b"\0" * 16),
        "ephemeral": dataclasses.replace(up, ephemeral_pk=other.buffer_key),
        "truncate": dataclasses.replace(up, ciphertext=up.ciphertext[:-4]),
    }[attack]
    with pytest.raises((TamperedMessage, ProtocolError)):
        buf.receive(bad, server_version=0)
    assert buf.count == 1 and torch.equal(buf._sum, before)
    buf.receive(up, server_version=0)  # the genuine update still goes in
    assert torch.allclose(buf.release().sum, _delta(0) + _delta(1))


def test_invalid_updates_are_rejected_inside_the_buffer():
    buf, before = _loaded_buffer()
    nan = _delta(1)
    nan[0] = float("nan")
    cases = [
        (seal_update(nan, 1.0, buf.assign(1, 0)), "non-finite"),
        (seal_update(_delta(1) * 1000, 1.0, buf.assign(1, 0)), "norm"),
        (seal_update(torch.zeros(N + 1), 1.0, buf.assign(1, 0)), "expected"),
        (seal_update(_delta(1), -1.0, buf.assign(1, 0)), "weight"),
    ]
    for up, msg in cases:
        with pytest.raises(UpdateRejected, match=msg):
            buf.receive(up, server_version=0)
    stale = SecureBuffer(N, 1, max_staleness=2)
    with pytest.raises(UpdateRejected, match="staleness"):
        stale.receive(seal_update(_delta(1), 1.0, stale.assign(1, 0)), server_version=5)
    assert buf.count == 1 and torch.equal(buf._sum, before)


def test_noise_hook_runs_inside_the_buffer_before_release():
    buf = SecureBuffer(N, 1, noise_fn=lambda s: s + 3.0)
    buf.receive(seal_update(_delta(0), 2.0, buf.assign(0, 0)), 0)
    assert torch.allclose(buf.release().sum, 2 * _delta(0) + 3.0)
