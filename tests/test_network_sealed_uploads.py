"""Sealed uploads (flotilla/network/sealed_uploads.py): the update over plain TCP on the sealed port,
AES-256-GCM records under a key drawn per assignment and given in the TLS check-in reply, through
the data plane's own upload handler.

The channel must hand over exactly the bytes sealed, or fail: a flipped bit, records reordered,
dropped, replayed or cut short, a wrong key.  The port must take nothing from a connection it did
not invite, nothing twice, and only uploads.  With the SDK, the ledger and the model must come out
as with TLS uploads; anything short of the server's reply falls back to TLS (a retry, if the sealed
upload got in), and the server's refusals travel back as they do over TLS.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import grpc
import pytest
import torch
from torch import nn

from flotilla.client import Connection, Refused
from flotilla.config import ConfigError, validate
from flotilla.network import sealed_uploads as su
from flotilla.network.coordinator import fingerprint
from flotilla.network.wire import frame, pb, read_frame
from tests.network_helpers import PKI, start_server, status

R = su.RECORD
SIZES = [0, 1, R - 1, R, R + 1, 3 * R + 5]
SEALED = {"sealed_download_port": "auto", "sealed_uploads": True}
ASYNC = dict(mode="async", concurrency=8, buffer_size=2, retry_after_s=0.01)
NUMEL = 18  # tests.network_helpers.tiny_model: nn.Linear(5, 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=8)


# -- the channel, over a socket pair ---------------------------------------------------------------
def payload(size: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()


class Capture:
    """A stand-in socket that keeps what a SealedChannel sends."""

    def __init__(self):
        self.data = bytearray()

    def sendall(self, data) -> None:
        self.data += bytes(data)


def sealed_stream(data: bytes, key: bytes) -> bytes:
    cap = Capture()
    su.SealedChannel(cap, send_key=key).sendall(data)
    return bytes(cap.data)


def records(stream: bytes) -> list[bytes]:
    """A sealed stream split into its records (length + sealed bytes each)."""
    out, at = [], 0
    while at < len(stream):
        n = int.from_bytes(stream[at : at + 4], "big")
        out.append(stream[at : at + 4 + n])
        at += 4 + n
    assert at == len(stream)
    return out


def feed(stream: bytes, close: bool = True):
    """A reader's end of a socket pair whose far end sends ``stream`` (from a thread), then closes."""
    near, far = socket.socketpair()

    def send():
        try:
            far.sendall(stream)
        except OSError:
            pass
        if close:
            far.close()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    near.settimeout(10)
    return near, far, t


def read_all(channel: su.SealedChannel, total: int, step: int) -> tuple[bytes, list[int]]:
    """``total`` plaintext bytes read with views of ``step`` bytes; and each call's count."""
    out = bytearray(total)
    view, got, counts = memoryview(out), 0, []
    while got < total:
        n = channel.recv_into(view[got : got + step])
        assert 0 < n <= step, n
        counts.append(n)
        got += n
    return bytes(out), counts


@pytest.mark.parametrize("size", SIZES)
def test_a_sealed_channel_round_trips_into_views_of_every_size(size):
    data = payload(size, seed=size)
    key = os.urandom(32)
    stream = sealed_stream(data, key)
    # 4 length bytes and a 16-byte tag per record; nothing at all for no bytes
    assert len(stream) == size + 20 * -(-size // R)
    for step in (R, 1000, 3 * R, R - 1):
        near, far, t = feed(stream)
        with near:
            reader = su.SealedChannel(near, send_key=os.urandom(32), recv_key=key)
            got, counts = read_all(reader, size, step)
            assert got == data
            if step == R:  # whole records opened straight into place: one call per record, none left over
                assert counts == [min(R, size - i) for i in range(0, size, R)]
                assert reader._plain_at == reader._plain_end
            if step > R:  # a call returns at most one record
                assert max(counts, default=0) <= R
            assert reader.recv_into(bytearray(10)) == 0  # the writer closed between records
        t.join(5)
        far.close()

    # the writer over a real socket, in a thread (the pair's buffers are far smaller than the data)
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        writer = su.SealedChannel(a, send_key=key)
        t = threading.Thread(target=lambda: (writer.sendall(data), a.shutdown(socket.SHUT_WR)), daemon=True)
        t.start()
        reader = su.SealedChannel(b, send_key=os.urandom(32), recv_key=key)
        assert read_all(reader, size, 1000)[0] == data
        assert reader.recv_into(bytearray(1)) == 0
        t.join(5)


def test_recv_into_honours_nbytes_and_keeps_the_rest():
    key, data = os.urandom(32), payload(5000)
    near, far, t = feed(sealed_stream(data, key))
    with near, far:
        reader = su.SealedChannel(near, send_key=os.urandom(32), recv_key=key)
        buf = bytearray(4096)
        assert reader.recv_into(buf, 10) == 10 and bytes(buf[:10]) == data[:10]
        assert reader.recv_into(buf, 0) == 4096 and bytes(buf) == data[10:4106]  # 0: the whole buffer
        assert reader.recv_into(memoryview(buf)[:0]) == 0  # an empty view: nothing, and nothing lost
        assert reader.recv_into(buf) == 5000 - 4106 and bytes(buf[:894]) == data[4106:]
        assert reader.recv_into(buf) == 0


# -- tampering -------------------------------------------------------------------------------------
def read_until_error(stream: bytes, key: bytes, total: int, step: int = R) -> tuple[bytes, Exception | None]:
    """What a reader returns of ``stream`` before it fails (and why); None: it read ``total`` bytes."""
    near, far, t = feed(stream)
    out = bytearray()
    buf = bytearray(step)
    with near, far:
        reader = su.SealedChannel(near, send_key=os.urandom(32), recv_key=key)
        try:
            while len(out) < total:
                n = reader.recv_into(buf)
                if n == 0:
                    return bytes(out), EOFError("closed between records")
                out += buf[:n]
        except Exception as e:  # noqa: BLE001 - the test looks at what it is
            return bytes(out), e
    return bytes(out), None


def flip(b: bytes, at: int, bit: int = 0) -> bytes:
    x = bytearray(b)
    x[at] ^= 1 << bit
    return bytes(x)


def test_tampered_reordered_dropped_replayed_or_cut_records_are_refused():
    key, data = os.urandom(32), payload(3 * R + 5)
    stream = sealed_stream(data, key)
    recs = records(stream)
    assert [len(r) for r in recs] == [4 + R + 16] * 3 + [4 + 5 + 16]
    assert read_until_error(stream, key, len(data)) == (data, None)

    # what was done to the stream: (the stream, the error's words, records read intact before it)
    cases = {
        "a bit of record 1's ciphertext": (recs[0] + flip(recs[1], 4 + 1000) + recs[2] + recs[3], "record 1 fails", 1),
        "a bit of record 1's tag": (recs[0] + flip(recs[1], len(recs[1]) - 1) + recs[2] + recs[3], "record 1 fails", 1),
        # the length is associated data: shorter (R), the record fails its tag; longer than any, refused
        "record 1's length, shorter": (recs[0] + flip(recs[1], 3, 4) + recs[2] + recs[3], "record 1 fails", 1),
        "record 1's length, longer": (recs[0] + flip(recs[1], 3) + recs[2] + recs[3], f"record of {R + 17} bytes", 1),
        "records 1 and 2 swapped": (recs[0] + recs[2] + recs[1] + recs[3], "record 1 fails", 1),
        "record 1 dropped": (recs[0] + recs[2] + recs[3], "record 1 fails", 1),
        "record 0 replayed": (recs[0] + recs[0] + recs[1] + recs[2] + recs[3], "record 1 fails", 1),
        "the last record replayed first": (recs[3] + stream, "record 0 fails", 0),
        "cut inside record 2": (stream[: len(recs[0]) * 2 + 4 + 100], "ended inside sealed record 2", 2),
        "cut inside record 1's length": (recs[0] + recs[1][:2], "inside a sealed record's length", 1),
        "cut after record 1's length": (recs[0] + recs[1][:4], "ended inside sealed record 1", 1),
    }
    for what, (bad, match, intact) in cases.items():
        for step in (R, 1000):  # opened into place and into the leftover buffer
            got, err = read_until_error(bad, key, len(data), step)
            assert isinstance(err, su.SealedChannelError) and isinstance(err, OSError), (what, err)
            assert match in str(err), (what, str(err))
            assert got == data[: intact * R], what  # only the records before the damage, never a wrong byte

    # the stream cut exactly between records reads as a close there: the frames inside say how many come
    got, err = read_until_error(recs[0] + recs[1], key, len(data))
    assert got == data[: 2 * R] and isinstance(err, EOFError)

    # a wrong key opens nothing
    got, err = read_until_error(stream, os.urandom(32), len(data))
    assert got == b"" and isinstance(err, su.SealedChannelError) and "record 0 fails" in str(err)
    # the other direction's key (a reflected stream) opens nothing either
    offer = pb.SealedUpload(port=1, ticket=os.urandom(16), key=os.urandom(32))
    up, down = su.keys(bytes(offer.key), bytes(offer.ticket), os.urandom(16), os.urandom(16))
    got, err = read_until_error(sealed_stream(data, up), down, len(data))
    assert got == b"" and isinstance(err, su.SealedChannelError)


@pytest.mark.parametrize("length", [0, 1, 16, R + 17, 1 << 31])
def test_a_record_length_out_of_range_is_refused_before_its_bytes(length):
    key = os.urandom(32)
    sealed = sealed_stream(b"x" * 10, key)
    body = sealed[4:]
    got, err = read_until_error(length.to_bytes(4, "big") + body, key, 10)
    assert got == b"" and isinstance(err, su.SealedChannelError)
    assert f"a sealed record of {length} bytes" in str(err)
    assert read_until_error(sealed, key, 10) == (b"x" * 10, None)  # its own length: fine


def test_a_channel_without_its_key_opens_nothing():
    near, far, t = feed(sealed_stream(b"abc", os.urandom(32)))
    with near, far, pytest.raises(su.SealedChannelError, match="no key"):
        su.SealedChannel(near, send_key=os.urandom(32)).recv_into(bytearray(3))


# -- a read that times out resumes -----------------------------------------------------------------
@pytest.mark.parametrize("split", [2, 4, 4 + 1000, 4 + R // 2])  # inside the length, after it, inside the bytes
def test_a_read_that_times_out_mid_record_resumes_where_it_stopped(split):
    key, data = os.urandom(32), payload(R + 300, seed=split)
    stream = sealed_stream(data, key)
    near, far = socket.socketpair()
    sent_part, timed_out = threading.Event(), threading.Event()

    def writer():
        far.sendall(stream[:split])  # part of a record, then nothing until the reader has timed out
        sent_part.set()
        timed_out.wait(10)
        far.sendall(stream[split:])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with near, far:
        reader = su.SealedChannel(near, send_key=os.urandom(32), recv_key=key)
        reader.settimeout(0.2)
        buf = bytearray(1000)  # the leftover path (the data plane's first, 1-byte read is too)
        assert sent_part.wait(10)
        with pytest.raises(TimeoutError):
            reader.recv_into(buf)
        assert (reader._head_got, reader._cipher_got) == (min(split, 4), max(split - 4, 0))  # kept its place
        timed_out.set()
        reader.settimeout(5)
        out = bytearray()
        while len(out) < len(data):
            n = reader.recv_into(buf)
            assert n
            out += buf[:n]
        assert bytes(out) == data
        t.join(5)


# -- the key schedule and the tickets --------------------------------------------------------------
def test_every_connection_gets_fresh_keys_that_both_sides_agree_on():
    offer = pb.SealedUpload(port=4000, ticket=os.urandom(16), key=os.urandom(32))
    assert su.usable(offer)
    a, b = su.DeviceKeys(offer), su.DeviceKeys(offer)
    assert a.salt != b.salt and a.up != b.up  # a retry never reuses a key (nor so a nonce under it)
    assert a.hello() == b"FLSU" + bytes(offer.ticket) + a.salt and len(a.hello()) == 4 + 16 + 16
    server_salt = os.urandom(16)
    up, down = su.keys(bytes(offer.key), bytes(offer.ticket), a.salt, server_salt)
    assert up == a.up and down == a.down(server_salt)
    assert up != down and len(up) == len(down) == 32
    assert a.down(os.urandom(16)) != down  # the server's salt counts
    other = su.keys(bytes(offer.key), os.urandom(16), a.salt, server_salt)  # the ticket is bound in
    assert other[0] != up and other[1] != down
    assert su.keys(os.urandom(32), bytes(offer.ticket), a.salt, server_salt)[0] != up

    # what the device seals with ``up`` the server opens with its ``up``; and back with ``down``
    assert read_until_error(sealed_stream(b"to the server", a.up), up, 13) == (b"to the server", None)
    assert read_until_error(sealed_stream(b"to the device", down), a.down(server_salt), 13) == (b"to the device", None)

    for field, bad in (("port", 0), ("port", 70000), ("ticket", b"t" * 15), ("key", b"k" * 16)):
        o = pb.SealedUpload()
        o.CopyFrom(offer)
        setattr(o, field, bad)
        assert not su.usable(o), field


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_an_upload_ticket_buys_one_connection_until_it_expires():
    clock = Clock()
    tickets = su.UploadTickets(clock=clock)
    a = tickets.offer("dev-a", 4321, 60.0)
    assert a.port == 4321 and su.usable(a)
    assert tickets.redeem(bytes(a.ticket)) == (bytes(a.key), "dev-a")  # the key, and whom it was offered to
    assert tickets.redeem(bytes(a.ticket)) is None  # used
    assert tickets.redeem(os.urandom(16)) is None  # never issued
    b = tickets.offer("dev-b", 4321, 60.0)
    assert b.key != a.key and b.ticket != a.ticket
    clock.now += 60.0
    assert tickets.redeem(bytes(b.ticket)) is None  # expired (at its very end)
    first = tickets.offer("dev-c", 4321, 60.0)
    second = tickets.offer("dev-c", 4321, 60.0)  # a new offer revokes the device's last ticket
    assert tickets.redeem(bytes(first.ticket)) is None
    assert tickets.redeem(bytes(second.ticket)) == (bytes(second.key), "dev-c")
    assert tickets.counts == {"offered": 4, "used": 2, "refused": 4}
    # expired tickets are pruned when an offer comes a second or more later
    tickets.offer("dev-d", 4321, 1.0)
    tickets.offer("dev-e", 4321, 60.0)
    assert len(tickets) == 2
    clock.now += 2.0
    tickets.offer("dev-f", 4321, 60.0)
    assert len(tickets) == 2 and set(tickets._by_device) == {"dev-e", "dev-f"}


def test_accept_answers_a_ticket_with_the_connections_channel():
    tickets = su.UploadTickets()
    offer = tickets.offer("dev", 1, 60.0)
    device, server = socket.socketpair()
    with device, server:
        keys = su.DeviceKeys(offer)
        assert su.accept(server, os.urandom(16), keys.salt, tickets) is None
        assert device.recv(2) == su.REFUSED
        channel, whom = su.accept(server, bytes(offer.ticket), keys.salt, tickets)
        assert whom == "dev"
        answer = device.recv(17, socket.MSG_WAITALL)
        assert answer[:1] == su.ACCEPTED and len(answer) == 17
        su.SealedChannel(device, send_key=keys.up).sendall(b"hello server")
        buf = bytearray(12)
        assert channel.recv_into(buf) == 12 and bytes(buf) == b"hello server"
        channel.sendall(b"hello device")
        mine = su.SealedChannel(device, send_key=keys.up, recv_key=keys.down(answer[1:]))
        assert mine.recv_into(buf) == 12 and bytes(buf) == b"hello device"
        assert su.accept(server, bytes(offer.ticket), keys.salt, tickets) is None  # once
    assert tickets.counts == {"offered": 1, "used": 1, "refused": 2}


# -- with the server and the SDK -------------------------------------------------------------------
def train(conn: Connection):
    for _ in range(200):
        ci = conn.check_in(10)
        if ci.action == "train":
            return ci.assignment
        time.sleep(min(max(ci.retry_after_s, 0.02), 0.5))  # within the rate limit
    raise AssertionError(ci)


def connect(pki, st, i: int = 0) -> Connection:
    return Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca)


def tickets_of(st) -> su.UploadTickets:
    return st.server.sealed_port.uploads[0]


def accepted(st) -> list[dict]:
    return [e for e in st.server.store.read_ledger() if e["event"] == "accepted"]


def untouched(st, before: dict) -> None:
    after = status(st)
    assert (after["weights_sha256"], after["version"], after["accepted"], after["buffered"]) == (
        before["weights_sha256"],
        before["version"],
        before["accepted"],
        before["buffered"],
    )
    assert not st.server.coord.table.in_flight


KEYS = ("seq", "device", "norm", "digest", "base_version", "weight", "num_examples")


def _four_uploads(pki, path, server: dict) -> dict:
    torch.manual_seed(11)
    model = nn.Linear(600, 500)  # 300,500 parameters: 1,202,000 bytes, four whole records and a part
    g = torch.Generator().manual_seed(5)
    with start_server(pki, path, model, server=server, **ASYNC) as st:
        initial = st.server.coord.weights.clone()
        with connect(pki, st) as c:
            seqs = []
            for _ in range(4):
                a = train(c)
                assert torch.equal(c.download(a.version), st.server.coord.weights)
                seqs.append(c.upload(a, torch.randn(300_500, generator=g) * 0.01, 10)[0])
            counts, rpc = dict(c.sealed_uploads), c.status()
        return {
            "initial": initial,
            "weights": st.server.coord.weights.clone(),
            "ledger": [tuple(e.get(k) for k in KEYS) for e in accepted(st)],
            "seqs": seqs,
            "sdk": counts,
            "rpc": rpc["sealed_uploads"],
            "served": dict(st.server.dataplane.served),
            "status": status(st),
        }


def test_sealed_uploads_give_the_ledger_and_model_of_tls_uploads(pki, tmp_path):
    sealed = _four_uploads(pki, tmp_path / "sealed", SEALED)
    tls = _four_uploads(pki, tmp_path / "tls", {"sealed_download_port": "auto"})
    assert sealed["sdk"] == {"sent": 4, "failed": 0}
    assert sealed["rpc"] == {"offered": 4, "used": 4, "refused": 0}  # what the Status RPC reports
    assert sealed["served"]["upload"] == 4  # the data plane's handler served them
    assert (sealed["status"]["accepted"], sealed["status"]["version"], sealed["status"]["rejected"]) == (4, 2, 0)
    assert tls["sdk"] == {"sent": 0, "failed": 0} and tls["rpc"] is None and tls["served"]["upload"] == 4
    assert sealed["seqs"] == tls["seqs"] == [0, 1, 2, 3]
    assert sealed["ledger"] == tls["ledger"] and len(sealed["ledger"]) == 4
    assert torch.equal(sealed["weights"], tls["weights"])  # bit for bit
    assert sealed["status"]["weights_sha256"] == tls["status"]["weights_sha256"]
    assert torch.equal(sealed["initial"], tls["initial"]) and not torch.equal(sealed["weights"], sealed["initial"])


def test_a_used_ticket_falls_back_to_tls_and_counts_once(pki, tmp_path):
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        a = train(c)
        offer = c._sealed_upload_offers[a.ticket]
        assert st.call(lambda: tickets_of(st).redeem(bytes(offer.ticket)))[0] == bytes(offer.key)  # someone else
        assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert tickets_of(st).counts == {"offered": 1, "used": 1, "refused": 1}
        assert st.server.dataplane.served["upload"] == 1  # the TLS one: the port took no upload
        assert [e["assignment"] for e in accepted(st)] == [a.id]
        assert status(st)["accepted"] == 1


def test_an_unreachable_port_falls_back_to_tls_and_is_skipped_for_a_minute(pki, tmp_path):
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        port = st.server.sealed_port.port
        a = train(c)
        assert c._sealed_upload_offers[a.ticket].port == port
        st.server.sealed_port.stop()  # the port goes away (a firewall, say); the server still offers it
        t = time.monotonic()
        assert c.upload(a, torch.full((NUMEL,), 0.01), 10)[0] == 0
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert c._sealed_off[0] == port and c._sealed_off[1] >= t + 59
        a = train(c)
        assert a.ticket in c._sealed_upload_offers  # offered again, but not tried: nor the download
        assert torch.equal(c.download(a.version), st.server.coord.weights)
        assert c.upload(a, torch.full((NUMEL,), 0.01), 10)[0] == 1
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert c.sealed_downloads == {"fetched": 0, "failed": 0}
        assert tickets_of(st).counts["used"] == 0
        assert st.server.dataplane.served["upload"] == 2 and status(st)["accepted"] == 2


def test_a_reply_lost_after_the_body_is_answered_over_tls_with_the_same_seq(pki, tmp_path, monkeypatch):
    real, reads = su.read_frame, []

    def lose_the_final_reply(sock, *args):
        reads.append(real(sock, *args))  # the server's answer arrives ...
        if len(reads) == 2:
            raise ConnectionResetError("cut before the reply")  # ... and never reaches the device
        return reads[-1]

    monkeypatch.setattr(su, "read_frame", lose_the_final_reply)
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        a = train(c)
        seq, version = c.upload(a, torch.full((NUMEL,), 0.01), 10)
        lost = pb.DataReply.FromString(reads[1]).upload
        assert (seq, version) == (lost.seq, lost.version) == (0, 0)  # the TLS retry: the first answer
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert tickets_of(st).counts == {"offered": 1, "used": 1, "refused": 0}
        assert st.server.dataplane.served["upload"] == 2
        assert [(e["assignment"], e["seq"]) for e in accepted(st)] == [(a.id, 0)]  # in the ledger once
        s = status(st)
        assert (s["accepted"], s["buffered"], s["rejected"]) == (1, 1, 0)


def test_a_body_record_tampered_on_the_way_costs_only_the_slower_path(pki, tmp_path, monkeypatch):
    """The module's promise: what a network attacker achieves is what dropping packets achieves."""
    real = su.upload

    class FlipsTheBody:
        def __init__(self, raw):
            self.raw, self.sends = raw, 0

        def sendall(self, data):
            self.sends += 1  # 1: hello, 2: the header's record, 3: the body's first record
            self.raw.sendall(flip(bytes(data), 10) if self.sends == 3 else data)

        def __getattr__(self, name):
            return getattr(self.raw, name)

    monkeypatch.setattr(su, "upload", lambda raw, *args: real(FlipsTheBody(raw), *args))
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        a = train(c)
        # the server ends the connection without a reply (as TLS does on a bad record MAC): the SDK
        # uploads over TLS (before the fix: Refused(truncated, retry never), and the work was given up)
        assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert status(st)["accepted"] == 1


@pytest.mark.parametrize("cut_after", [2, 3])  # after the header's record; after the body's first record
def test_a_stream_cut_at_a_record_boundary_costs_only_the_slower_path(pki, tmp_path, monkeypatch, cut_after):
    """A FIN sent on the device's behalf right after a whole record (record lengths travel in the
    clear): the server closes without a reply, as on a failing tag, and the device uploads over TLS
    (before: a sealed refusal 'truncated', retry never, and the device gave the work up)."""
    real = su.upload

    class CutsAtABoundary:
        def __init__(self, raw):
            self.raw, self.sends = raw, 0

        def sendall(self, data):
            self.sends += 1  # 1: hello, 2: the header's record, 3: the body's first record, ...
            if self.sends <= cut_after:
                self.raw.sendall(data)
                if self.sends == cut_after:
                    self.raw.shutdown(socket.SHUT_WR)

        def __getattr__(self, name):
            return getattr(self.raw, name)

    monkeypatch.setattr(su, "upload", lambda raw, *args: real(CutsAtABoundary(raw), *args))
    big = nn.Linear(600, 500)  # 300,500 parameters: five body records
    with start_server(pki, tmp_path / "s", big, server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        a = train(c)
        assert c.upload(a, torch.full((300_500,), 0.01), 10) == (0, 0)
        assert c.sealed_uploads == {"sent": 0, "failed": 1}
        assert status(st)["accepted"] == 1


def test_a_sealed_upload_under_another_devices_token_is_refused(pki, tmp_path):
    """A ticket (and its key) names the device it was offered to: the token inside must name it too."""
    from flotilla.network.dataplane_client import DataRefusal

    with (
        start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st,
        connect(pki, st, 0) as a0,
        connect(pki, st, 1) as a1,
    ):
        mine, theirs = train(a0), train(a1)
        offer = a0._sealed_upload_offers[mine.ticket]
        header = pb.UploadHeader(
            ticket=theirs.ticket, base_version=theirs.version, dtype="float32", shape=[NUMEL], num_examples=10
        )
        with socket.create_connection(("127.0.0.1", offer.port), timeout=10) as sock:
            with pytest.raises(DataRefusal) as e:
                su.upload(sock, offer, pki.token(1), header, bytes(4 * NUMEL))
        assert (e.value.reply.code, e.value.reply.reason) == ("PERMISSION_DENIED", "ticket")
        assert "offered to another device" in e.value.reply.message
        assert status(st)["accepted"] == 0
        assert a1.upload(theirs, torch.zeros(NUMEL), 10) == (0, 0)  # its own upload still goes in (over TLS or sealed)


def _refusal(upload, c: Connection, a) -> Refused:
    with pytest.raises(Refused) as e:
        upload(c, a)
    return e.value


def test_refusals_travel_back_as_over_tls_without_a_fallback(pki, tmp_path):
    nan = torch.full((NUMEL,), 0.01)
    nan[3] = float("nan")
    cases = {
        "nonfinite": lambda c, a: c.upload(a, nan, 10),
        "shape": lambda c, a: c.upload_raw(a.ticket, a.version, "float32", [NUMEL + 1], bytes(4 * NUMEL + 4), 10),
        "dtype": lambda c, a: c.upload_raw(a.ticket, a.version, "float16", [NUMEL], bytes(2 * NUMEL), 10),
        # a header that matches the model, and a body of other length: the data plane's own refusal
        "body": lambda c, a: c.upload_raw(a.ticket, a.version, "float32", [NUMEL], bytes(4 * NUMEL + 4), 10),
    }
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st:
        for i, (what, upload) in enumerate(cases.items()):
            with connect(pki, st, 2 * i) as sealed, connect(pki, st, 2 * i + 1) as tls:
                a, b = train(sealed), train(tls)
                tls._sealed_upload_offers.clear()  # this one over TLS
                before, served = status(st), st.server.dataplane.served["upload"]
                over_sealed = _refusal(upload, sealed, a)
                over_tls = _refusal(upload, tls, b)
                assert over_sealed.code == grpc.StatusCode.INVALID_ARGUMENT, what
                assert (over_sealed.code, over_sealed.reason, over_sealed.retry) == (
                    over_tls.code,
                    over_tls.reason,
                    over_tls.retry,
                ), what
                # the same words, but for who sent it
                assert over_sealed.details == over_tls.details.replace(f"device-{2 * i + 1:03d}", f"device-{2 * i:03d}")
                assert over_sealed.reason == {"body": "shape"}.get(what, what)
                # no TLS upload after the sealed one: the port's refusal is final
                assert sealed.sealed_uploads == {"sent": 0, "failed": 0}, what
                assert st.server.dataplane.served["upload"] == served + 2, what
                untouched(st, before)
        assert tickets_of(st).counts["used"] == len(cases)
        assert status(st)["rejected_by_reason"] == {"nonfinite": 2, "shape": 4, "dtype": 2}


# -- hostile clients on the sealed port ------------------------------------------------------------
def recv_exact(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += got
    return out


def closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


class RawSealed:
    """A sealed-upload client speaking the protocol by hand."""

    def __init__(self, port: int, offer, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.keys = su.DeviceKeys(offer)
        self.sock.sendall(self.keys.hello())
        answer = recv_exact(self.sock, 17)
        assert answer[:1] == su.ACCEPTED
        self.channel = su.SealedChannel(self.sock, send_key=self.keys.up, recv_key=self.keys.down(answer[1:]))

    def send(self, message) -> None:
        self.channel.sendall(frame(message))

    def reply(self) -> pb.DataReply | None:
        """The next reply; None if the server closed the connection instead."""
        try:
            return pb.DataReply.FromString(read_frame(self.channel))
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()


def upload_request(pki, a, i: int, body_bytes: int = 4 * NUMEL) -> pb.DataRequest:
    h = pb.UploadHeader(ticket=a.ticket, base_version=a.version, dtype="float32", shape=[NUMEL], num_examples=10)
    return pb.DataRequest(token=pki.token(i), upload=h, body_bytes=body_bytes)


def test_strangers_garbage_and_other_requests_get_nothing_from_the_sealed_port(pki, tmp_path):
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st:
        port = st.server.sealed_port.port
        conns = [connect(pki, st, i) for i in range(6)]
        try:
            work = [train(c) for c in conns]
            offers = [c._sealed_upload_offers[a.ticket] for c, a in zip(conns, work)]
            before = status(st)

            # a ticket never issued: one byte 0, and the connection closes
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(su.MAGIC + os.urandom(16) + os.urandom(16))
                assert recv_exact(s, 1) == su.REFUSED
                assert closed(s)

            # a valid ticket, then garbage records: closed, nothing taken
            for garbage in (  # a record too short, one that fails its tag, one too long
                (5).to_bytes(4, "big") + os.urandom(5),
                (100).to_bytes(4, "big") + os.urandom(100),
                (1 << 30).to_bytes(4, "big") + os.urandom(100),
            ):
                raw = RawSealed(port, offers[0])
                raw.sock.sendall(garbage)
                assert raw.reply() is None and closed(raw.sock)
                raw.close()
                offers[0] = st.call(lambda: tickets_of(st).offer("device-000", port, 60.0))  # another try

            # an honest header, then a body record that fails its tag: nothing taken
            raw = RawSealed(port, offers[1])
            raw.send(upload_request(pki, work[1], 1))
            assert raw.reply().body_bytes == 4 * NUMEL
            stream = sealed_stream(bytes(4 * NUMEL), os.urandom(32))  # sealed under another key
            raw.sock.sendall(stream)
            reply = raw.reply()
            assert reply is None or reply.code == "INVALID_ARGUMENT"
            assert closed(raw.sock)
            raw.close()

            # a check-in, a download, and a second upload on one channel: refused, nothing served
            served = dict(st.server.dataplane.served)
            for i, request in (
                (2, pb.DataRequest(token=pki.token(2), check_in=pb.CheckInRequest())),
                (3, pb.DataRequest(token=pki.token(3), download=pb.DownloadRequest(version=0))),
            ):
                raw = RawSealed(port, offers[i])
                raw.send(request)
                reply = raw.reply()
                assert (reply.code, reply.reason) == ("INVALID_ARGUMENT", "invalid")
                assert "a sealed connection carries one upload" in reply.message
                assert reply.total_bytes == 0 and not reply.HasField("check_in")
                assert closed(raw.sock)
                raw.close()
            assert dict(st.server.dataplane.served) == served
            untouched(st, before)

            # the port still serves an honest device, and the next one
            for c, a in zip(conns[4:], work[4:]):
                assert c.upload(a, torch.full((NUMEL,), 0.01), 10)[0] >= 0
                assert c.sealed_uploads == {"sent": 1, "failed": 0}
            assert status(st)["accepted"] == 2
            assert {e["device"] for e in accepted(st)} == {"device-004", "device-005"}
        finally:
            for c in conns:
                c.close()


def test_a_body_paused_mid_record_is_read_on_by_the_data_planes_polling_reads(pki, tmp_path, monkeypatch):
    """The data plane's reads of a body wake every 0.25 s (dataplane._POLL_S): a sealed record half
    read when one wakes is finished by the next read, not lost."""
    real, mid_record = su.SealedChannel.recv_into, []

    def recv_into(self, *args):
        try:
            return real(self, *args)
        except TimeoutError:
            mid_record.append(self._head_got + self._cipher_got)
            raise

    monkeypatch.setattr(su.SealedChannel, "recv_into", recv_into)
    with start_server(pki, tmp_path / "s", server=SEALED, **ASYNC) as st, connect(pki, st) as c:
        a = train(c)
        raw = RawSealed(st.server.sealed_port.port, c._sealed_upload_offers[a.ticket])
        raw.send(upload_request(pki, a, 0))
        assert raw.reply().body_bytes == 4 * NUMEL
        body = torch.full((NUMEL,), 0.01).numpy().tobytes()
        cap = Capture()
        raw.channel.raw = cap  # the body's record (its index is the channel's), sent below in two halves
        raw.channel.sendall(body)
        raw.channel.raw = raw.sock
        raw.sock.sendall(bytes(cap.data[:30]))
        time.sleep(0.7)  # the server's read times out twice meanwhile
        raw.sock.sendall(bytes(cap.data[30:]))
        reply = raw.reply()
        assert reply.code == "" and (reply.upload.seq, reply.upload.version) == (0, 0)
        raw.close()
        assert mid_record and set(mid_record) == {30}  # the server's reads timed out inside the record
        [entry] = accepted(st)
        assert entry["assignment"] == a.id and entry["digest"] == fingerprint(body)


# -- settings --------------------------------------------------------------------------------------
BASE = {
    "task": {"name": "fashion-mnist", "num_clients": 4},
    "mode": "async",
    "rounds": 2,
    "network": {"tls": {"cert": "c", "key": "k"}, "tokens": "t"},
}


def test_config_needs_the_sealed_port_and_the_data_plane_for_sealed_uploads():
    def net(**kw):
        return {**BASE, "network": {**BASE["network"], **kw}}

    with pytest.raises(ConfigError, match="sealed_uploads: they travel on the sealed port; set sealed_download_port"):
        validate(net(sealed_uploads=True))
    with pytest.raises(ConfigError, match="sealed_uploads: .*data plane.*set data_port"):
        validate(net(sealed_uploads=True, sealed_download_port="auto", data_port="off"))
    assert validate(net(sealed_uploads=True, sealed_download_port="auto")).network.sealed_uploads is True
    assert validate(net(sealed_uploads=True, sealed_download_port=7000, data_port=7001)).network.sealed_uploads
    assert validate(net()).network.sealed_uploads is False  # off by default


def test_the_server_refuses_sealed_uploads_without_the_sealed_port_or_data_plane(pki, tmp_path):
    with pytest.raises(ValueError, match="sealed_uploads: they travel on the sealed port; set sealed_download_port"):
        with start_server(pki, tmp_path / "a", server={"sealed_uploads": True}):
            pass
    with pytest.raises(ValueError, match="sealed_uploads: .*data plane.*set data_port"):
        with start_server(pki, tmp_path / "b", server={**SEALED, "data_port": "off"}):
            pass
    with start_server(pki, tmp_path / "a", server=SEALED) as st:  # the state directory was let go
        assert st.server.sealed_port.uploads is not None


def test_sealed_uploads_are_off_by_default(pki, tmp_path, monkeypatch):
    seen = []
    real = su.usable
    monkeypatch.setattr(su, "usable", lambda offer: seen.append(offer) or real(offer))
    for server, offered in (({}, False), ({"sealed_download_port": "auto"}, False), (SEALED, True)):
        seen.clear()
        with start_server(pki, tmp_path / f"s{len(server)}", server=server, **ASYNC) as st, connect(pki, st) as c:
            a = train(c)
            assert bool(seen) == offered and (a.ticket in c._sealed_upload_offers) == offered, server
            rpc = c.status()["sealed_uploads"]
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10)[0] == 0
            assert c.sealed_uploads == {"sent": int(offered), "failed": 0}
            if offered:
                assert rpc == {"offered": 1, "used": 0, "refused": 0}
            else:
                assert rpc is None
                assert st.server.sealed_port is None or st.server.sealed_port.uploads is None
            if server == {"sealed_download_port": "auto"}:  # the port is there, but takes no uploads
                with socket.create_connection(("127.0.0.1", st.server.sealed_port.port), timeout=5) as s:
                    s.sendall(su.MAGIC + os.urandom(32))
                    assert closed(s)  # without a word
                assert st.server.sealed_port.counts["refused"] == 0  # nor read as a download's ticket


def test_a_record_is_one_of_the_data_planes_read_blocks():
    """The data plane reads a body in FINGERPRINT_BLOCK pieces: records of that size open straight
    into place (no copy through the channel's own buffer)."""
    from flotilla.network.coordinator import FINGERPRINT_BLOCK

    assert su.RECORD == FINGERPRINT_BLOCK
