"""The data plane (flotilla/network/dataplane.py): downloads and uploads on a second TLS port.

The same upload logic as gRPC's (FlotillaServer.accept_upload), so the ledger and the model must
come out the same; and every hostile input (too long, garbage, wrong token, bad ticket, a body of
the wrong length, a stalled or cut stream, too many connections) is refused or dropped with the
upload slot freed and the model and ledger untouched.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import grpc
import pytest
import torch
import yaml

from flotilla.client import Connection, Refused
from flotilla.network.server import Limits
from flotilla.network.wire import pb
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, run_devices, start_server, status

NUMEL = 18  # nn.Linear(5, 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def connect(pki, st, i=0, **kw) -> Connection:
    return Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca, **kw)


class Raw:
    """A data-plane client speaking the framing by hand."""

    def __init__(self, pki, st, tls=True, timeout=5.0):
        sock = socket.create_connection(("localhost", st.server.data_bound), timeout=timeout)
        if tls:
            sock = ssl.create_default_context(cafile=pki.ca).wrap_socket(sock, server_hostname="localhost")
        self.sock = sock

    def send(self, message) -> None:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def reply(self) -> pb.DataReply | None:
        """The next reply; None if the server closed the connection instead."""
        try:
            head = self._exact(4)
            return pb.DataReply.FromString(self._exact(int.from_bytes(head, "big")))
        except (ConnectionError, ssl.SSLError, EOFError):
            return None

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def train_assignment(conn):
    """Check in until told to train (async: a device that just uploaded rests retry_after_s)."""
    for _ in range(100):
        ci = conn.check_in(10)
        if ci.action == "train":
            return ci.assignment
        time.sleep(0.02)
    raise AssertionError(ci)


def upload_request(pki, a, i=0, body_bytes=4 * NUMEL, **header) -> pb.DataRequest:
    h = dict(ticket=a.ticket, base_version=a.version, dtype="float32", shape=[NUMEL], num_examples=10)
    h.update(header)
    return pb.DataRequest(token=pki.token(i), upload=pb.UploadHeader(**h), body_bytes=body_bytes)


def ledger(path) -> list[dict]:
    return [json.loads(x) for x in (path / "ledger.jsonl").read_text().splitlines()]


def untouched(st, before) -> None:
    """The model, buffer and ledger are as ``before``, and no upload holds a slot."""
    after = status(st)
    assert after["weights_sha256"] == before["weights_sha256"]
    assert (after["version"], after["accepted"], after["buffered"]) == (
        before["version"],
        before["accepted"],
        before["buffered"],
    )
    assert not st.server.coord.table.in_flight and not st.server.coord.table.per_device


def _four_uploads(pki, st, data_plane: bool) -> tuple[torch.Tensor, list]:
    conns = [connect(pki, st, i, data_plane=data_plane) for i in range(2)]
    g = torch.Generator().manual_seed(3)
    try:
        for _ in range(2):
            for c in conns:
                a = train_assignment(c)
                assert torch.equal(c.download(a.version), st.server.coord.weights)
                c.upload(a, torch.randn(NUMEL, generator=g) * 0.1, 10)
    finally:
        for c in conns:
            c.close()
    keys = ("seq", "device", "norm", "digest", "base_version", "weight")
    return st.server.coord.weights.clone(), [
        tuple(e[k] for k in keys) for e in ledger(st.server.store.path) if e["event"] == "accepted"
    ]


def test_uploads_through_the_data_plane_give_the_ledger_and_model_of_grpc(pki, tmp_path):
    kw = dict(mode="async", concurrency=4, buffer_size=2, total_steps=5, retry_after_s=0.01)
    with start_server(pki, tmp_path / "grpc", **kw) as st:
        via_grpc = _four_uploads(pki, st, data_plane=False)
        assert st.server.dataplane.served == {"check_in": 0, "download": 0, "upload": 0}
    with start_server(pki, tmp_path / "data", **kw) as st:
        via_data = _four_uploads(pki, st, data_plane=True)
        served = st.server.dataplane.served
        assert (served["download"], served["upload"]) == (4, 4)
        assert served["check_in"] >= 2  # each connection's first check-in is gRPC's (it learns the port)
        assert status(st)["version"] == 2
    assert torch.equal(via_data[0], via_grpc[0])
    assert via_data[1] == via_grpc[1] and len(via_data[1]) == 4


def test_a_retry_gets_the_same_seq_and_a_replay_with_other_bytes_is_refused(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3) as st, connect(pki, st) as c:
        a = train_assignment(c)
        delta = torch.full((NUMEL,), 0.01)
        assert c.upload(a, delta, 10) == (0, 0)
        assert c.upload(a, delta, 10) == (0, 0)  # the same bytes again: the first answer
        before = status(st)
        with pytest.raises(Refused) as e:
            c.upload(a, delta * 2, 10)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert (e.value.reason, e.value.retry) == ("replay", "never")
        assert "replayed nonce" in e.value.details
        untouched(st, before)
        assert st.server.dataplane.served["upload"] == 3


def test_devices_train_through_the_data_plane(pki, tmp_path):
    data = synthetic_dataset(num_clients=2, per_client=20)
    with start_server(pki, tmp_path / "s", cohort=2, total_steps=2, linger_s=2.0) as st:
        reports = run_devices(st, pki, data, 2)
        served = dict(st.server.dataplane.served)
    assert st.server.coord.version == 2
    assert (served["download"], served["upload"]) == (4, 4)
    assert served["check_in"] >= 2  # every check-in after a device's first (DONE included)
    accepted = [e["assignment"] for e in ledger(tmp_path / "s") if e["event"] == "accepted"]
    assert sorted(x["assignment"] for r in reports.values() for x in r.accepted) == sorted(accepted)


def test_check_ins_after_the_first_go_through_the_data_plane_and_are_refused_as_over_grpc(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3, retry_after_s=0.01) as st:
        plane = st.server.dataplane
        with connect(pki, st) as c:
            first = c.check_in(10)  # gRPC: it names the data port
            assert first.action == "train" and c.data_port == plane.port and plane.served["check_in"] == 0
            again = c.check_in(10)  # the data plane: a new ticket, the first one revoked (async)
            assert plane.served["check_in"] == 1
            assert again.action == "train" and again.assignment.id != first.assignment.id
            assert c.upload(again.assignment, torch.full((NUMEL,), 0.01), 10) == (0, 0)
            with pytest.raises(Refused) as e:
                c.upload(first.assignment, torch.full((NUMEL,), 0.01), 10)
            assert (e.value.code, e.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "revoked")
        before = status(st)
        r = Raw(pki, st)
        r.send(pb.DataRequest(token="not-a-token", check_in=pb.CheckInRequest(num_examples=10)))
        reply = r.reply()
        assert (reply.code, reply.reason, reply.retry) == ("UNAUTHENTICATED", "auth", "never")
        r.send(pb.DataRequest(token=pki.token(1), check_in=pb.CheckInRequest(num_examples=10)))
        reply = r.reply()  # the same connection, now a device's check-in: what the CheckIn RPC answers
        assert reply.code == "" and reply.check_in.action == pb.CheckInReply.TRAIN
        assert reply.check_in.device_id == "device-001" and reply.check_in.data_port == plane.port
        assert reply.check_in.assignment.numel == NUMEL
        replies = []  # a device checking in in a tight loop: the rate limit holds here as over gRPC
        for _ in range(Limits().burst + 30):
            r.send(pb.DataRequest(token=pki.token(2), check_in=pb.CheckInRequest(num_examples=10)))
            replies.append(r.reply())
        refused = [x for x in replies if x.code]
        assert refused and {(x.code, x.reason, x.retry) for x in refused} == {("RESOURCE_EXHAUSTED", "rate", "request")}
        assert all(x.retry_after_s > 0 for x in refused)
        r.close()
        assert status(st)["rejected_by_reason"]["auth"] == before["rejected_by_reason"].get("auth", 0) + 1
        plane.stop()  # the data port gone: check-ins (and the bytes) fall back to gRPC
        with connect(pki, st) as c:
            c.check_in(10)
            a = train_assignment(c)
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (1, 0)
        assert plane.served["check_in"] == 3 + len(replies)  # the SDK's second, and those sent by hand


def test_a_data_plane_without_check_ins_gets_them_over_grpc(pki, tmp_path, monkeypatch):
    """An SDK newer than its server: the server's data plane (before check-ins) refuses the frame as
    "not a valid DataRequest" and closes the connection; the SDK checks in over gRPC from then on,
    and still downloads and uploads on the data plane."""
    from flotilla.network.dataplane import DataPlane

    def older(self, conn, request):  # what a data plane that knows only download and upload answers
        self._framing(conn, "data plane: the request is not a valid DataRequest (ValueError)")
        return False

    monkeypatch.setattr(DataPlane, "_check_in", older)
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3, retry_after_s=0.01) as st:
        with connect(pki, st) as c:
            for _ in range(3):
                a = train_assignment(c)
                c.download(a.version)
                c.upload(a, torch.full((NUMEL,), 0.01), 10)
        served = st.server.dataplane.served
        assert served["check_in"] == 1  # tried once, then gRPC's
        assert (served["download"], served["upload"]) == (3, 3)
        assert status(st)["accepted"] == 3


def test_sealed_uploads_through_the_data_plane_match_grpc(pki, tmp_path):
    kw = dict(mode="async", concurrency=4, buffer_size=2, total_steps=5, retry_after_s=0.01)
    out = {}
    for data_plane in (False, True):
        with start_server(pki, tmp_path / f"s{data_plane}", server={"secure_buffer": True}, **kw) as st:
            weights, entries = _four_uploads(pki, st, data_plane)
            out[data_plane] = weights
            assert [e[2] for e in entries] == [None] * 4  # the server never saw a delta
            assert st.server.dataplane.served["upload"] == (4 if data_plane else 0)
    assert torch.allclose(out[True], out[False], rtol=0, atol=1e-6)


def test_framing_garbage_and_wrong_tokens_are_refused(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3) as st:
        before = status(st)
        r = Raw(pki, st)  # a length over the 64 KiB cap: refused before reading it, connection closed
        r.sock.sendall((1 << 30).to_bytes(4, "big"))
        reply = r.reply()
        assert (reply.code, reply.reason) == ("INVALID_ARGUMENT", "invalid") and "over the limit" in reply.message
        assert r.closed()
        r = Raw(pki, st)  # not a DataRequest
        r.send(b"\xff\xfe garbage \x00")
        reply = r.reply()
        assert reply.code == "INVALID_ARGUMENT" and "not a valid DataRequest" in reply.message
        assert r.closed()
        r = Raw(pki, st)  # a wrong token: refused, the connection stays usable
        r.send(pb.DataRequest(token="not-a-token", download=pb.DownloadRequest(version=0)))
        reply = r.reply()
        assert (reply.code, reply.reason, reply.retry) == ("UNAUTHENTICATED", "auth", "never")
        r.send(pb.DataRequest(token=pki.tokens["admin"], download=pb.DownloadRequest(version=0)))
        assert r.reply().code == "PERMISSION_DENIED"  # the admin may not train
        r.send(pb.DataRequest(token=pki.token(0), download=pb.DownloadRequest(version=7)))
        reply = r.reply()
        assert (reply.code, reply.reason, reply.retry) == ("FAILED_PRECONDITION", "version_gone", "checkin")
        r.send(pb.DataRequest(token=pki.token(0), download=pb.DownloadRequest(version=0)))
        reply = r.reply()
        assert reply.code == "" and reply.total_bytes == 4 * NUMEL
        weights = torch.frombuffer(bytearray(r._exact(reply.total_bytes)), dtype=torch.float32)
        assert torch.equal(weights, st.server.coord.weights)
        r.close()
        r = Raw(pki, st, tls=False)  # plaintext on the TLS port: dropped
        r.send(pb.DataRequest(token=pki.token(0), download=pb.DownloadRequest(version=0)))
        assert r.reply() is None
        untouched(st, before)
        s = status(st)["rejected_by_reason"]
        assert (s["invalid"], s["auth"], s["version_gone"]) == (2, 2, 1)


def test_bad_tickets_and_bodies_of_the_wrong_length_are_refused(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3, assignment_timeout_s=60) as st:
        with connect(pki, st) as c:
            a = train_assignment(c)
        before = status(st)
        r = Raw(pki, st)
        r.send(upload_request(pki, a, ticket=a.ticket[:-4] + "0000"))
        reply = r.reply()
        assert (reply.code, reply.reason) == ("PERMISSION_DENIED", "ticket")
        r.send(upload_request(pki, a, i=1))  # another device's assignment
        assert "belongs to another device" in r.reply().message
        r.send(upload_request(pki, a, body_bytes=4 * NUMEL + 4))  # declared longer: refused before the body
        reply = r.reply()
        assert (reply.code, reply.reason) == ("INVALID_ARGUMENT", "shape") and "more than the 72 bytes" in reply.message
        r.send(upload_request(pki, a, body_bytes=4 * NUMEL - 4))
        reply = r.reply()
        assert reply.reason == "truncated" and "ended after 68 of the 72 bytes" in reply.message
        untouched(st, before)
        # declared right, then 4 bytes more: the upload counts once, the extra bytes (read as the next
        # frame's length) end the connection
        r.send(upload_request(pki, a))
        assert r.reply().body_bytes == 4 * NUMEL
        r.sock.sendall(torch.full((NUMEL,), 0.01).numpy().tobytes() + b"\xff\xff\xff\xff")
        reply = r.reply()
        assert (reply.code, reply.upload.seq) == ("", 0)
        assert "over the limit" in r.reply().message
        assert r.closed()
        s = status(st)
        assert s["accepted"] == 1 and s["rejected_by_reason"]["truncated"] == 1
        assert not st.server.coord.table.in_flight


def test_an_expired_ticket_is_refused(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=3, assignment_timeout_s=0.3) as st:
        with connect(pki, st) as c:
            a = train_assignment(c)
            time.sleep(0.5)
            before = status(st)
            with pytest.raises(Refused) as e:
                c.upload(a, torch.zeros(NUMEL), 10)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.retry == "checkin"
            untouched(st, before)


def test_a_stalled_or_cut_upload_frees_its_slot(pki, tmp_path):
    limits = Limits(upload_timeout_s=0.6)
    with start_server(pki, tmp_path / "s", limits=limits, mode="async", concurrency=4, buffer_size=3) as st:
        with connect(pki, st) as c:
            a = train_assignment(c)
        before = status(st)
        r = Raw(pki, st)  # stalls half-way through the body
        r.send(upload_request(pki, a))
        assert r.reply().body_bytes == 4 * NUMEL
        r.sock.sendall(bytes(2 * NUMEL))
        reply = r.reply()  # the server's answer, then it closes the connection (the body is unread)
        assert (reply.code, reply.reason, reply.retry) == ("DEADLINE_EXCEEDED", "stalled", "request")
        assert r.closed()
        untouched(st, before)
        r = Raw(pki, st)  # hangs up half-way
        r.send(upload_request(pki, a))
        assert r.reply().body_bytes == 4 * NUMEL
        r.sock.sendall(bytes(2 * NUMEL))
        r.close()
        deadline = time.time() + 5
        while status(st)["rejected_by_reason"].get("truncated", 0) < 1 and time.time() < deadline:
            time.sleep(0.02)
        untouched(st, before)
        # the two cut receives' buffers never go back to the pool (a data-plane thread may still
        # have been writing into them when the handler gave up: network/bodies.py)
        bodies = st.server.bodies
        assert (bodies.made, bodies.free) == (2, 0)
        with connect(pki, st) as c:  # the assignment's slot is free again: the real upload lands
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
            assert (bodies.made, bodies.free) == (3, 1)  # a received and committed body goes back
            for i in range(3):  # and is the next upload's (other devices: no rest, no rate limit)
                with connect(pki, st, 1 + i) as other:
                    other.upload(train_assignment(other), torch.full((NUMEL,), 0.02), 10)
            assert (bodies.made, bodies.free) == (3, 1)
        assert status(st)["rejected_by_reason"]["stalled"] == 1


def test_silent_connections_are_cut_and_extra_ones_refused_at_once(pki, tmp_path):
    limits = Limits(data_header_timeout_s=0.4, data_idle_timeout_s=0.4)
    with start_server(pki, tmp_path / "a", limits=limits, mode="async", buffer_size=3) as st:
        t0 = time.time()
        silent = Raw(pki, st, tls=False, timeout=5)  # no TLS handshake at all
        assert silent.closed() and time.time() - t0 < 3
        t0 = time.time()
        idle = Raw(pki, st, timeout=5)  # a handshake, then no request
        assert idle.closed() and time.time() - t0 < 3
        deadline = time.time() + 2
        while st.server.dataplane.connections and time.time() < deadline:  # its thread lets go just after
            time.sleep(0.01)
        assert st.server.dataplane.connections == 0
    with start_server(pki, tmp_path / "b", limits=Limits(data_connections=2), mode="async", buffer_size=3) as st:
        plane = st.server.dataplane
        held = [Raw(pki, st, tls=False) for _ in range(2)]  # both threads busy (handshakes pending, 10 s)
        deadline = time.time() + 5
        while plane.connections < 2 and time.time() < deadline:
            time.sleep(0.01)
        extra = Raw(pki, st, tls=False)
        assert extra.closed()
        assert plane.refused_busy == 1  # closed at once by the acceptor, not queued for a thread
        with connect(pki, st) as c:  # meanwhile the SDK falls back to gRPC
            a = train_assignment(c)
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        assert plane.refused_busy == 2 and plane.served["upload"] == 0
        for h in held:
            h.close()


def test_mutual_tls_on_the_data_plane(pki, tmp_path):
    with start_server(pki, tmp_path / "s", require_client_cert=True, mode="async", buffer_size=3) as st:
        r = Raw(pki, st)  # no client certificate: the server ends the connection (TLS 1.3: after the
        try:  # client's side of the handshake, so the request may or may not be written first)
            r.send(pb.DataRequest(token=pki.token(0), download=pb.DownloadRequest(version=0)))
        except (ssl.SSLError, OSError):
            pass
        assert r.reply() is None
        with connect(pki, st, cert=pki.paths["client_pem"], key=pki.paths["client_key"]) as c:
            a = train_assignment(c)
            c.download(a.version)
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
        assert st.server.dataplane.served == {"check_in": 0, "download": 1, "upload": 1}


def test_data_port_off_and_its_settings(pki, tmp_path):
    from flotilla.network.cli import _data_port
    from flotilla.network.config import NetworkConfig

    with start_server(pki, tmp_path / "s", mode="async", buffer_size=3, server={"data_port": "off"}) as st:
        assert st.server.dataplane is None
        with connect(pki, st) as c:
            a = train_assignment(c)
            assert c.data_port == 0  # not advertised: gRPC carries the bytes
            assert c.upload(a, torch.full((NUMEL,), 0.01), 10) == (0, 0)
    base = dict(tls=dict(cert="c", key="k"), tokens="t")
    assert [NetworkConfig(**base, data_port=v).data_port for v in ("auto", "off", 5000)] == ["auto", "off", 5000]
    with pytest.raises(ValueError, match="data_port"):
        NetworkConfig(**base, data_port=70000)
    # YAML reads an unquoted off as false: refused, never taken as port 0 (any free port)
    with pytest.raises(ValueError, match="data_port") as e:
        NetworkConfig(**base, data_port=yaml.safe_load("data_port: off")["data_port"])
    assert "not true/false" in str(e.value)
    assert [_data_port(v) for v in ("auto", "off", "0", "5001")] == ["auto", "off", 0, 5001]
    with pytest.raises(Exception, match="port number"):
        _data_port("65536")


def test_stopping_the_server_ends_uploads_waiting_for_a_slot(pki, tmp_path):
    st = start_server(pki, tmp_path / "s", limits=Limits(upload_slots=1), mode="async", concurrency=4, buffer_size=3)
    a = []
    for i in range(2):
        with connect(pki, st, i) as c:
            a.append(train_assignment(c))
    holder = Raw(pki, st)  # holds the one upload slot: half a body, then silence
    holder.send(upload_request(pki, a[0]))
    assert holder.reply().body_bytes == 4 * NUMEL
    holder.sock.sendall(bytes(2 * NUMEL))
    waiter = Raw(pki, st)  # waits for the slot (its handler would wait up to upload_timeout_s, 300 s)
    waiter.send(upload_request(pki, a[1], i=1))
    time.sleep(0.3)
    t0 = time.time()
    st.stop()
    assert not st._thread.is_alive() and time.time() - t0 < 10
    assert waiter.reply() is None and holder.reply() is None
    assert not st.server.coord.table.in_flight
