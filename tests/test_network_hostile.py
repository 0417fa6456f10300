"""Hostile devices against a real server on loopback (TLS, a server thread in this process).

Bounded for the default suite: a few hundred requests, well under 60 s.  The longer fuzz driver
is benchmarks/network_fuzz.py.  Every attack here holds a valid device token (an outsider
without one is refused before any of this; see test_network.py).
"""

from __future__ import annotations

import json
import random
import threading
import time

import grpc
import pytest
import torch

from flotilla.client import Connection
from flotilla.network import wire
from flotilla.network.server import Limits
from flotilla.network.wire import pb
from tests.network_helpers import PKI, start_server, status

NUMEL = 18  # nn.Linear(5, 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


class Raw:
    """A device speaking the protocol by hand: raw bytes, its own streams, trailing metadata."""

    def __init__(self, pki, port, i=0):
        creds = grpc.ssl_channel_credentials(root_certificates=open(pki.ca, "rb").read())
        self.channel = grpc.secure_channel(f"localhost:{port}", creds)
        self.md = ((wire.AUTH_HEADER, f"Bearer {pki.token(i)}"),)

    def unary(self, method: str, body: bytes, timeout=10):
        return self.channel.unary_unary(method)(body, metadata=self.md, timeout=timeout)

    def upload(self, parts, timeout=10):
        return self.channel.stream_unary(wire.UPLOAD)(iter(parts), metadata=self.md, timeout=timeout)

    def upload_future(self, parts, timeout=30):
        return self.channel.stream_unary(wire.UPLOAD).future(parts, metadata=self.md, timeout=timeout)

    def close(self):
        self.channel.close()


def header(a, numel=NUMEL, **kw) -> bytes:
    h = dict(ticket=a.ticket, base_version=a.version, dtype="float32", shape=[numel], num_examples=10)
    h.update(kw)
    return pb.UploadPart(header=pb.UploadHeader(**h)).SerializeToString()


def data(delta: torch.Tensor) -> bytes:
    return pb.UploadPart(data=delta.numpy().tobytes()).SerializeToString()


def trailing(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def test_a_device_stalling_uploads_cannot_block_another_devices_upload(pki, tmp_path):
    """Issue 11 item 1: 10 stalled upload streams under one valid ticket (4 upload slots in all):
    one stream per assignment is let in and cut at upload_timeout_s; the rest are refused at once
    (busy); another device uploads meanwhile in well under a second."""
    limits = Limits(upload_slots=4, upload_timeout_s=2.0)
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=2, limits=limits) as st:
        attacker, victim = (
            Raw(pki, st.port, 0),
            Connection(f"localhost:{st.port}", pki.token(1), ca=pki.ca, timeout_s=20),
        )
        a = Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca).check_in(10).assignment
        release = threading.Event()

        def stalled():
            yield header(a)
            release.wait(15)  # never sends the body (until the test ends)

        futures = [attacker.upload_future(stalled()) for _ in range(10)]
        time.sleep(0.5)  # let them all reach the server
        v = victim.check_in(10).assignment
        t0 = time.perf_counter()
        assert victim.upload(v, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        took = time.perf_counter() - t0
        assert took < 1.5, took
        codes, reasons = [], []
        for f in futures:
            with pytest.raises(grpc.RpcError) as e:
                f.result(timeout=10)
            codes.append(e.value.code())
            reasons.append(trailing(e.value).get("flotilla-refusal"))
        release.set()
        # one stream was let in and cut when it stalled; the other nine were refused at once
        assert sorted(reasons) == ["busy"] * 9 + ["stalled"], reasons
        assert (
            codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 9 and codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 1
        )
        # the cut stream's slot is freed when its handler ends, just after the device got the refusal
        deadline = time.monotonic() + 5.0
        while (s := status(st))["uploading"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s["uploading"] == 0 and s["accepted"] == 1
        # the slot is free again: the attacker's own assignment can still be uploaded properly
        assert Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca).upload(a, torch.zeros(NUMEL), 10) == (1, 1)
        attacker.close()
        victim.close()


@pytest.mark.parametrize("method", [wire.CHECK_IN, wire.STATUS, wire.DOWNLOAD])
def test_undecodable_requests_are_invalid_argument_and_counted(pki, tmp_path, method):
    """Issue 11 item 10: not UNKNOWN with a Python class name: INVALID_ARGUMENT, counted as 'invalid'."""
    with start_server(pki, tmp_path / "s") as st:
        raw = Raw(pki, st.port)
        with pytest.raises(grpc.RpcError) as e:
            r = raw.unary(method, b"\xff\xff\xff\xff garbage")
            list(r) if method == wire.DOWNLOAD else r
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "not a valid" in e.value.details() and "Error" not in e.value.details()
        assert trailing(e.value)["flotilla-retry"] == "never"
        assert status(st)["rejected_by_reason"] == {"invalid": 1}
        raw.close()


def test_an_undecodable_upload_part_is_invalid_argument_and_counted(pki, tmp_path):
    with start_server(pki, tmp_path / "s") as st:
        raw = Raw(pki, st.port)
        a = Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca).check_in(10).assignment
        for parts in ([b"\xff\xfe garbage"], [header(a), b"\xff\xfe garbage"]):
            with pytest.raises(grpc.RpcError) as e:
                raw.upload(parts)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid UploadPart" in e.value.details()
        assert status(st)["rejected_by_reason"] == {"invalid": 2}
        raw.close()


def _mutations(a, rng: random.Random):
    """Hostile uploads under a valid ticket: (parts, why)."""
    good = torch.full((NUMEL,), 0.01)
    big = torch.full((NUMEL,), 3e38)
    yield [header(a), data(big)], "finite values that overflow any sum"
    yield [header(a, train_loss=float("nan")), data(good)], "NaN train_loss"
    yield [header(a, examples_seen=-1_000_000), data(good)], "negative examples_seen"
    yield [header(a, num_examples=-5), data(good)], "negative num_examples"
    yield [header(a, num_examples=2**62), data(good)], "absurd num_examples"
    yield [header(a, shape=[NUMEL, 1]), data(good)], "2-d shape"
    yield [header(a, dtype="float16"), data(good)], "dtype"
    yield [header(a, base_version=a.version + 1), data(good)], "future version"
    yield [header(a, ticket=a.ticket + "x"), data(good)], "broken signature"
    yield [header(a), data(good), header(a)], "second header"
    yield [data(good)], "no header"
    yield [], "empty stream"
    yield [header(a), data(torch.tensor([float("inf")] * NUMEL))], "inf"
    for _ in range(40):  # random bytes, random lengths, random cuts
        n = rng.choice([0, 1, 7, 4 * NUMEL - 1, 4 * NUMEL + 1, 4 * NUMEL + 4, 1000])
        body = bytes(rng.getrandbits(8) for _ in range(n))
        kind = rng.random()
        if kind < 0.4:
            yield [header(a), pb.UploadPart(data=body).SerializeToString()], "random body bytes"
        elif kind < 0.7:
            yield [body], "random message"
        else:
            cut = rng.randrange(1, 40)
            yield [header(a)[:cut]], "truncated header"


def test_a_few_hundred_hostile_requests_change_nothing_and_never_crash_the_server(pki, tmp_path):
    """Bounded fuzz with a valid token: garbage messages, mutated headers, hostile values, replays,
    over-long and short bodies, through every method.  The server answers each with a refusal that
    names what to do (never UNKNOWN or INTERNAL); the model, the buffer and the ledger do not
    move; then an honest upload is accepted."""
    rng = random.Random(11)
    limits = Limits(rate=1e6, burst=10**6)
    with start_server(pki, tmp_path / "s", cohort=2, limits=limits, total_steps=3) as st:
        raw, other = Raw(pki, st.port, 0), Raw(pki, st.port, 2)  # other: the unary fuzz (a check-in may succeed)
        conn = Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca)
        a = conn.check_in(10).assignment
        before = status(st)
        sent = 0
        t0 = time.perf_counter()
        for _ in range(5):
            for parts, why in _mutations(a, rng):
                try:
                    raw.upload(parts)
                    raise AssertionError(f"accepted: {why}")
                except grpc.RpcError as e:
                    assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (why, e)
                    assert trailing(e).get("flotilla-retry") in ("request", "checkin", "never"), (why, e)
                sent += 1
            for method in (wire.CHECK_IN, wire.STATUS, wire.DOWNLOAD, wire.SECAGG_STEP):
                body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
                try:
                    r = other.unary(method, body)
                    list(r) if method == wire.DOWNLOAD else r
                except grpc.RpcError as e:
                    assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, e)
                sent += 1
        took = time.perf_counter() - t0
        after = status(st)
        assert sent >= 250 and took < 45, (sent, took)
        assert after["weights_sha256"] == before["weights_sha256"]
        assert (after["version"], after["accepted"], after["buffered"]) == (0, 0, 0)
        assert after["rejected"] >= sent - 20  # every upload refusal counted (a valid CheckIn may succeed)
        assert not (tmp_path / "s" / "ledger.jsonl").exists()
        # the assignment is spoiled by its hostile updates (a check-in would revoke it), but an
        # honest update under it still counts
        assert conn.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        conn.close()
        raw.close()
        other.close()
    for line in (tmp_path / "s" / "ledger.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON
