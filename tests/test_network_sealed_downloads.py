"""Sealed downloads (flotilla/network/sealed_downloads.py): the model over plain TCP, sealed once per
version, its key, digest and a one-fetch ticket given in the TLS check-in reply.

The device must take nothing it cannot verify: a flipped byte, chunks reordered or cut short, a
blob of another version, or a model forged by someone who holds the key (every trained device
does) all fail, and the SDK then downloads over TLS and gets the right weights.  The port must
give nothing to a connection it did not invite, nor anything twice.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
from torch import nn

from flotilla.client import Connection
from flotilla.config import ConfigError, validate
from flotilla.network import sealed_downloads as sd
from flotilla.network.wire import pb
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, run_devices, start_server, status

SIZES = [0, 1, sd.CHUNK - 1, sd.CHUNK, sd.CHUNK + 1, 3 * sd.CHUNK + 5]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def offer_for(version: int, data: bytes, *, key=None, digest=None) -> tuple[pb.SealedDownload, bytes]:
    k, sealed, plain_digest = sd.seal(version, data)
    return pb.SealedDownload(
        port=1, ticket=b"t" * 16, key=key or k, blake3=digest or plain_digest, total_bytes=len(data)
    ), sealed


def serve_once(answer: bytes):
    """A socket pair whose far end reads a request, then sends ``answer`` (from a thread)."""
    near, far = socket.socketpair()

    def reply():
        with far:
            far.recv(len(sd.MAGIC) + sd.TICKET_BYTES, socket.MSG_WAITALL)
            try:
                far.sendall(answer)
            except OSError:
                pass

    threading.Thread(target=reply, daemon=True).start()
    return near


def receive(offer, version: int, answer: bytes) -> bytearray:
    out = bytearray(offer.total_bytes)
    with serve_once(answer) as sock:
        sock.settimeout(10)
        sd.receive(sock, offer, version, lambda total: memoryview(out))
    return out


def framed(sealed: bytes) -> bytes:
    return len(sealed).to_bytes(8, "big") + sealed


@pytest.mark.parametrize("size", SIZES)
def test_a_sealed_download_round_trips(size):
    data = torch.randn(size // 4 + 1).numpy().tobytes()[:size]
    offer, sealed = offer_for(7, data)
    assert len(sealed) == sd.sealed_size(size) == size + 16 * max(1, -(-size // sd.CHUNK))
    assert bytes(receive(offer, 7, framed(sealed))) == data
    out = bytearray(size)
    sd.unseal(offer, 7, sealed, memoryview(out))  # the same checks on bytes in memory
    assert bytes(out) == data
    if size:
        with pytest.raises(sd.SealedDownloadError, match="tag"):
            sd.unseal(offer, 7, sealed[:-1] + bytes([sealed[-1] ^ 1]), memoryview(out))


def test_each_version_gets_its_own_key():
    data = b"x" * 100
    assert sd.seal(1, data)[0] != sd.seal(1, data)[0]
    assert sd.seal(1, data)[2] == sd.seal(2, data)[2]  # the digest is of the plaintext


def test_tampering_reordering_other_versions_and_forgeries_are_refused():
    data = bytes(range(256)) * (3 * sd.CHUNK // 256 + 10)  # 4 chunks
    offer, sealed = offer_for(5, data)
    step = sd.CHUNK + sd.TAG

    flipped = bytearray(sealed)
    flipped[step + 7] ^= 1
    with pytest.raises(sd.SealedDownloadError, match="chunk 1 .*tag"):
        receive(offer, 5, framed(bytes(flipped)))

    swapped = sealed[step : 2 * step] + sealed[:step] + sealed[2 * step :]
    with pytest.raises(sd.SealedDownloadError, match="chunk 0 .*tag"):
        receive(offer, 5, framed(swapped))

    with pytest.raises(sd.SealedDownloadError, match="tag"):  # the right bytes, named as another version
        receive(offer, 6, framed(sealed))

    # a holder of the key (any trained device) seals other bytes under it: every tag checks out,
    # only the digest given over TLS catches it
    forged_data = bytearray(data)
    forged_data[-1] ^= 0xFF
    forger = sd.AESGCM(bytes(offer.key))
    n = sd.chunks(len(data))
    forged = b"".join(
        forger.encrypt(sd._nonce(i), bytes(forged_data[i * sd.CHUNK : (i + 1) * sd.CHUNK]), sd._aad(5, i, i == n - 1))
        for i in range(n)
    )
    with pytest.raises(sd.SealedDownloadError, match="digest"):
        receive(offer, 5, framed(forged))

    # cut short: the length does not match, or the stream ends early; a refusal is a zero length
    with pytest.raises(sd.SealedDownloadError, match="sealed are"):
        receive(offer, 5, framed(sealed[:-step]))
    with pytest.raises(sd.SealedDownloadError, match="closed after"):
        receive(offer, 5, framed(sealed)[: -step // 2])
    with pytest.raises(sd.SealedDownloadError, match="refused the ticket"):
        receive(offer, 5, (0).to_bytes(8, "big"))


def test_the_digest_is_blake3_and_an_older_servers_sha256_still_checks_out():
    """The offer's digest is the plaintext's BLAKE3 (3.6x SHA-256's speed, once per version on the
    server's loop); an offer from a server before it carries the SHA-256 instead, which the SDK
    checks the same way, and a forgery fails under either."""
    import hashlib

    import blake3

    data = bytes(range(256)) * 5000
    offer, sealed = offer_for(3, data)
    assert bytes(offer.blake3) == blake3.blake3(data).digest() and not offer.sha256
    older = pb.SealedDownload()
    older.CopyFrom(offer)
    older.ClearField("blake3")
    older.sha256 = hashlib.sha256(data).digest()
    assert sd.usable(older)
    assert bytes(receive(older, 3, framed(sealed))) == data
    older.sha256 = hashlib.sha256(data + b"x").digest()
    with pytest.raises(sd.SealedDownloadError, match="digest"):
        receive(older, 3, framed(sealed))


def test_malformed_offers_are_not_used():
    offer, _ = offer_for(1, b"abc")
    assert sd.usable(offer)
    for field, bad in (("port", 0), ("port", 70000), ("ticket", b"x"), ("key", b"k" * 16), ("blake3", b"")):
        o = pb.SealedDownload()
        o.CopyFrom(offer)
        setattr(o, field, bad)
        assert not sd.usable(o), field


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fetch(port: int, ticket: bytes) -> bytes | None:
    """The sealed bytes the port answers ``ticket`` with; None when refused or closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(sd.MAGIC + ticket)
        head = s.recv(8, socket.MSG_WAITALL)
        if len(head) < 8 or int.from_bytes(head, "big") == 0:
            return None
        out = bytearray(int.from_bytes(head, "big"))
        view, got = memoryview(out), 0
        while got < len(out):  # (with a timeout, MSG_WAITALL may return early)
            n = s.recv_into(view[got:])
            assert n, "the port closed mid-download"
            got += n
        return bytes(out)


@pytest.fixture
def port():
    clock = Clock()
    p = sd.SealedDownloadPort(clock=clock, header_timeout_s=0.5, idle_timeout_s=0.5, max_connections=2)
    p.start("127.0.0.1", 0)
    p.clock_ = clock
    yield p
    p.stop()


def test_a_ticket_buys_one_fetch_of_its_version_until_it_expires(port):
    data = b"w" * 1000
    a = port.offer("dev-a", 3, data, 60.0)
    assert a.port == port.port and a.total_bytes == 1000
    got = fetch(port.port, a.ticket)
    out = bytearray(1000)
    with serve_once(framed(got)) as s:
        sd.receive(s, a, 3, lambda n: memoryview(out))
    assert bytes(out) == data
    assert fetch(port.port, a.ticket) is None  # used
    assert fetch(port.port, b"\0" * 16) is None  # never issued
    b = port.offer("dev-b", 3, data, 60.0)
    assert b.key == a.key and port.counts["sealed_versions"] == 1  # sealed once per version
    port.clock_.now += 61
    assert fetch(port.port, b.ticket) is None  # expired
    assert port.counts == {"offered": 2, "sent": 1, "refused": 3, "sealed_versions": 1}


def test_versions_of_other_sizes_are_sealed_each_right(port):
    """The sealing buffer is reused from version to version, and grown when a download is larger."""
    for version, data in enumerate([b"a" * 10, b"b" * (sd.CHUNK + 3), b"c" * 7, b"d" * (2 * sd.CHUNK)]):
        o = port.offer(f"dev{version}", version, data, 60.0)
        out = bytearray(len(data))
        sd.unseal(o, version, fetch(port.port, o.ticket), memoryview(out))
        assert bytes(out) == data


def test_a_new_offer_revokes_the_devices_last_ticket_and_old_versions_go(port):
    first = port.offer("dev", 1, b"one", 60.0)
    second = port.offer("dev", 2, b"two", 60.0)
    assert fetch(port.port, first.ticket) is None
    assert fetch(port.port, second.ticket) is not None
    port.clock_.now += 2  # prune at most once a second
    port.offer("other", 2, b"two", 60.0)
    assert set(port._versions) == {2} and port.tickets == 1
    again = port.offer("dev", 2, b"TWO", 60.0)  # the server serves other bytes for the version: sealed anew
    assert again.key != second.key and again.blake3 != second.blake3


def test_a_versions_in_memory_file_is_closed_once_nothing_holds_it(port):
    import gc
    import weakref

    port.offer("dev", 1, b"one" * 1000, 60.0)
    entry = weakref.ref(port._versions[1])
    fd = entry().fd
    assert fd >= 0 and os.pread(fd, 3, 0)
    port.clock_.now += 2
    port.offer("dev", 2, b"two" * 1000, 60.0)  # revokes the ticket for version 1; the prune drops it
    assert set(port._versions) == {2}
    gc.collect()
    assert entry() is None
    # closed: the number is free, or (reused meanwhile by someone else) no longer our in-memory file
    link = f"/proc/self/fd/{fd}"
    assert not os.path.exists(link) or "flotilla-sealed" not in os.readlink(link)


def test_without_memfd_the_chunks_are_sent_from_memory(port, monkeypatch):
    monkeypatch.delattr(sd.os, "memfd_create")
    data = bytes(range(256)) * 20
    a = port.offer("dev", 4, data, 60.0)
    assert port._versions[4].fd == -1
    out = bytearray(len(data))
    sd.unseal(a, 4, fetch(port.port, a.ticket), memoryview(out))
    assert bytes(out) == data


def test_a_download_larger_than_the_socket_buffers_reaches_a_slow_reader(port):
    """The port's socket has a timeout, so it is non-blocking underneath: the send must wait for
    room (socket.sendfile does), not fail once the buffers are full (os.sendfile raised)."""
    data = os.urandom(24 << 20)
    o = port.offer("dev", 5, data, 60.0)
    with socket.create_connection(("127.0.0.1", port.port), timeout=10) as s:
        s.sendall(sd.MAGIC + bytes(o.ticket))
        time.sleep(0.5)  # the reader is slow: the server's buffers fill
        head = s.recv(8, socket.MSG_WAITALL)
        out = bytearray(int.from_bytes(head, "big"))
        view, got = memoryview(out), 0
        while got < len(out):
            n = s.recv_into(view[got:])
            assert n, f"the port closed after {got} of {len(out)} bytes"
            got += n
    plain = bytearray(len(data))
    sd.unseal(o, 5, out, memoryview(plain))
    assert plain == data


def test_a_request_trickled_in_is_cut_at_one_header_deadline(port):
    """One deadline from the first byte covers the whole request: a byte every 0.3 s cannot hold a
    connection (a thread) beyond header_timeout_s (0.5 s here) plus the watchdog's period."""
    with socket.create_connection(("127.0.0.1", port.port), timeout=5) as s:
        t = time.monotonic()
        try:
            for b in sd.MAGIC + bytes(15):
                s.sendall(bytes([b]))
                time.sleep(0.3)
        except OSError:
            pass  # cut while trickling
        s.settimeout(5)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t < 2.0


def test_strangers_get_nothing_and_silent_ones_are_cut(port):
    with socket.create_connection(("127.0.0.1", port.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert s.recv(100) == b""  # closed without a word
    with socket.create_connection(("127.0.0.1", port.port), timeout=5) as s:
        t = time.monotonic()
        assert s.recv(100) == b""  # idle_timeout_s, by the watchdog
        assert time.monotonic() - t < 3
    assert port.counts["sent"] == 0


def test_connections_beyond_the_cap_are_closed_at_once(port):
    held = [socket.create_connection(("127.0.0.1", port.port)) for _ in range(2)]
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port.port), timeout=5) as s:
        assert s.recv(1) == b""
    assert port.refused_busy >= 1
    for h in held:
        h.close()


# -- with the server and the SDK ------------------------------------------------------------------
def train(conn: Connection):
    for _ in range(200):
        ci = conn.check_in(10)
        if ci.action == "train":
            return ci.assignment
        time.sleep(min(max(ci.retry_after_s, 0.05), 0.5))  # within the rate limit
    raise AssertionError(ci)


SEALED = {"sealed_download_port": "auto"}


def test_the_sdk_downloads_sealed_and_the_model_is_the_servers(pki, tmp_path):
    model = nn.Linear(600, 500)  # 300,500 parameters: two sealed chunks
    with start_server(pki, tmp_path / "s", model, mode="async", concurrency=4, buffer_size=2, server=SEALED) as st:
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            for _ in range(2):
                a = train(c)
                assert torch.equal(c.download(a.version), st.server.coord.weights)
                c.upload(a, torch.full((300_500,), 0.01), 10)
            assert c.sealed_downloads == {"fetched": 2, "failed": 0}
            sealed = c.status()["sealed_downloads"]  # what the Status RPC reports
        assert st.server.dataplane.served["download"] == 0  # nothing over TLS
        assert st.call(lambda: st.server.observed.bytes_out) == 2 * 4 * 300_500  # counted as a TLS download is
        assert (sealed["offered"], sealed["sent"], sealed["refused"]) == (2, 2, 0)
        assert sealed["sealed_versions"] == 1 and status(st)["version"] == 1  # both from version 0 (K = 2)


def test_devices_train_with_sealed_downloads(pki, tmp_path):
    data = synthetic_dataset(num_clients=2, per_client=20)
    with start_server(pki, tmp_path / "s", cohort=2, total_steps=2, linger_s=2.0, server=SEALED) as st:
        run_devices(st, pki, data, 2)
        counts = dict(st.server.sealed_port.counts)
        served = dict(st.server.dataplane.served)
    assert st.server.coord.version == 2
    assert counts["sent"] == 4 and served["download"] == 0


def test_a_tampered_or_unreachable_port_falls_back_to_tls(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=2, server=SEALED) as st:
        sealed = st.server.sealed_port
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = train(c)
            entry = st.call(lambda: sealed._versions[a.version])
            first = os.pread(entry.fd, 4, 0)  # what an attacker on the path would deliver: a flipped bit
            os.pwrite(entry.fd, bytes([first[0], first[1], first[2], first[3] ^ 1]), 0)
            assert torch.equal(c.download(a.version), st.server.coord.weights)
            assert c.sealed_downloads == {"fetched": 0, "failed": 1}
            assert st.server.dataplane.served["download"] == 1
            c.upload(a, torch.zeros(18), 10)

            a = train(c)
            sealed.stop()  # the port goes away (a firewall, say)
            assert torch.equal(c.download(a.version), st.server.coord.weights)
            assert c.sealed_downloads == {"fetched": 0, "failed": 2}
            c.upload(a, torch.zeros(18), 10)
            a = train(c)  # offered again, but not tried for a minute
            assert torch.equal(c.download(a.version), st.server.coord.weights)
            assert c.sealed_downloads == {"fetched": 0, "failed": 2}
            assert st.server.dataplane.served["download"] == 3
            c.upload(a, torch.zeros(18), 10)

            fresh = sd.SealedDownloadPort()  # as after a restart: another port, tried at once
            fresh.start("127.0.0.1", 0)
            st.server.sealed_port = fresh  # the server stops it when it stops
            a = train(c)
            assert torch.equal(c.download(a.version), st.server.coord.weights)
            assert c.sealed_downloads == {"fetched": 1, "failed": 2}


def test_an_offer_is_only_in_train_replies_and_off_by_default(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=2) as st:
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = train(c)
            assert c._sealed_offers == {}
            assert torch.equal(c.download(a.version), st.server.coord.weights)
        assert st.server.sealed_port is None


def test_a_sealed_port_in_use_is_refused_at_start_with_its_name(pki, tmp_path):
    from flotilla.network.server import InUse

    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(InUse, match="sealed downloads.*in use.*sealed_download_port"):
            with start_server(pki, tmp_path / "s", server={"sealed_download_port": taken.getsockname()[1]}):
                pass


BASE = {
    "task": {"name": "fashion-mnist", "num_clients": 4},
    "mode": "async",
    "rounds": 2,
    "network": {"tls": {"cert": "c", "key": "k"}, "tokens": "t"},
}


def test_config_refuses_bad_ports_and_sealed_downloads_with_aggregators():
    assert validate({**BASE, "network": {**BASE["network"], "sealed_download_port": "auto"}}).network
    with pytest.raises(ConfigError, match="sealed_download_port: must be between 0 and 65535"):
        validate({**BASE, "network": {**BASE["network"], "sealed_download_port": 70000}})
    with pytest.raises(ConfigError, match="sealed_download_port: not with aggregators"):
        validate({**BASE, "network": {**BASE["network"], "sealed_download_port": "auto", "aggregators": 2}})
