"""The server's cheaper paths (issue 14, server CPU per trip) do what the slow ones did.

* uploads: a data part is parsed without protobuf (wire.parse_upload_part) and copied and
  checksummed block by block; the result, the refusals and the fingerprint are the same;
* downloads: each served version's ModelChunk messages are serialised once (wire.model_chunks)
  and shared; a new version (every server step) or new bytes for a version are serialised anew.
"""

from __future__ import annotations

import json
import random

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from torch import nn

from flotilla.client import Connection, Refused
from flotilla.network import server as server_module
from flotilla.network import wire
from flotilla.network.coordinator import fingerprint
from flotilla.network.server import Limits
from flotilla.network.wire import pb
from tests.network_helpers import PKI, start_server, status

SMALL = Limits(max_message_bytes=64 << 10, chunk_bytes=32 << 10)  # several chunks per transfer


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=3)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(100, 200)  # 20,200 parameters: 80,800 bytes, 3 chunks of 32 KiB


NUMEL = 20_200


def connect(pki, st, i=0) -> Connection:
    # gRPC's own download and upload path (the data plane has its tests: test_network_dataplane.py)
    return Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca, chunk_bytes=SMALL.chunk_bytes, data_plane=False)


def parsed(raw: bytes):
    """What a parser makes of ``raw``: ("data", bytes) / ("header", ticket) / the error's type."""
    try:
        part = wire.parse_upload_part(raw)
    except Exception as e:  # noqa: BLE001 - compared with what protobuf raises
        return type(e)
    kind = part.WhichOneof("part")
    return kind, bytes(part.data) if kind == "data" else part.header.ticket if kind == "header" else None


def protobuf(raw: bytes):
    try:
        part = pb.UploadPart.FromString(raw)
    except Exception as e:  # noqa: BLE001
        return type(e)
    kind = part.WhichOneof("part")
    return kind, bytes(part.data) if kind == "data" else part.header.ticket if kind == "header" else None


def test_the_upload_part_parser_agrees_with_protobuf_on_every_message():
    rng = random.Random(0)
    corpus = []
    for n in [0, 1, 2, 127, 128, 129, 16383, 16384, 2**21 - 1, 2**21]:  # varint length boundaries
        corpus.append(pb.UploadPart(data=rng.randbytes(n)).SerializeToString())
    corpus += [
        pb.UploadPart(header=pb.UploadHeader(ticket="t", shape=[3])).SerializeToString(),
        b"",  # no field: protobuf parses an empty part (the server refuses it as "not data")
        b"\x12\x05abc",  # length beyond the message
        b"\x12\x02abcd",  # a length that stops short: the rest is not a field
        b"\x12\x02ab\x12\x01c",  # two data fields: the last one wins
        b"\x12\x02ab\x18\x01",  # data, then an unknown varint field
        b"\x12\x82\x00ab",  # a non-canonical (padded) length varint
        b"\x12" + b"\xff" * 10 + b"\x01",  # a length varint of 11 bytes
        b"\x12\x80",  # a length varint cut short
        b"\xff\xfe garbage",
    ]
    corpus += [rng.randbytes(rng.randrange(1, 40)) for _ in range(200)]
    corpus += [b"\x12" + rng.randbytes(rng.randrange(1, 20)) for _ in range(200)]
    for raw in corpus:
        assert parsed(raw) == protobuf(raw), raw[:20]
    assert isinstance(wire.parse_upload_part(corpus[5]), wire.DataPart)  # the fast path is taken
    assert protobuf(b"\x12\x05abc") is DecodeError


def test_model_chunks_are_the_messages_the_server_built_one_by_one():
    data = torch.randn(NUMEL).numpy().tobytes()
    step = 32 << 10
    old = [
        pb.ModelChunk(version=7, offset=off, total_bytes=len(data), data=data[off : off + step]).SerializeToString()
        for off in range(0, len(data), step)
    ]
    assert wire.model_chunks(7, data, step) == old and len(old) == 3


def test_downloads_are_serialised_once_per_version_and_anew_after_every_server_step(pki, tmp_path, monkeypatch):
    built = []
    real = wire.model_chunks
    monkeypatch.setattr(wire, "model_chunks", lambda *a: built.append(a[0]) or real(*a))
    with start_server(pki, tmp_path / "s", model(), limits=SMALL, mode="async", buffer_size=1) as st:
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        w0 = st.call(lambda: st.server.coord.weights.clone())
        a = c0.check_in(10).assignment
        assert torch.equal(c0.download(a.version), w0) and torch.equal(c1.download(a.version), w0)
        assert built == [0]  # two devices, one serialisation
        c0.upload(a, torch.full((NUMEL,), 0.01), 10)  # buffer_size 1: a server step, version 1
        w1 = st.call(lambda: st.server.coord.weights.clone())
        assert not torch.equal(w0, w1)
        b = c1.check_in(10).assignment
        assert b.version == 1
        assert torch.equal(c1.download(1), w1) and torch.equal(c0.download(1), w1)
        assert built == [0, 1]
        # version 0 is no longer served once no assignment needs it: refused as before, and its
        # messages are gone from the cache
        with pytest.raises(Refused) as e:
            c0.download(0)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no longer served" in str(e.value)
        assert list(st.call(lambda: list(st.server._downloads))) == [1]

        # new bytes for a served version (whatever replaced them) are never answered from the cache
        def replace():
            st.server.coord._served[1] = (w1 + 1).numpy().tobytes()

        st.call(replace)
        assert torch.equal(c1.download(1), w1 + 1)
        assert built == [0, 1, 1]
        c0.close()
        c1.close()


def test_an_upload_in_odd_chunks_is_fingerprinted_as_the_coordinator_does(pki, tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "FINGERPRINT_BLOCK", 1000)  # blocks that cut floats and chunks in odd places
    with start_server(pki, tmp_path / "s", model(), limits=SMALL, mode="async", buffer_size=2) as st:
        c = connect(pki, st, 0)
        a = c.check_in(10).assignment
        delta = torch.randn(NUMEL) * 1e-3
        raw = delta.numpy().tobytes()
        assert c.upload_raw(a.ticket, a.version, "float32", [NUMEL], raw, 10, chunk_bytes=4093) == (0, 0)
        ledger = [json.loads(x) for x in (tmp_path / "s" / "ledger.jsonl").read_text().splitlines()]
        assert ledger[0]["digest"] == fingerprint(raw)
        # the staged file holds the bytes sent, and the buffer the delta (weighted by its 10 examples)
        assert (tmp_path / "s" / "pending" / ledger[0]["file"]).read_bytes() == raw
        agg = st.call(lambda: (st.server.coord.aggregator.sum.clone(), st.server.coord.aggregator.total_weight))
        assert agg[1] == 10.0 and torch.allclose(agg[0], 10 * delta, rtol=1e-6, atol=0)
        # a retry of the same bytes in other chunks gets the same answer; other bytes are a replay
        assert c.upload_raw(a.ticket, a.version, "float32", [NUMEL], raw, 10, chunk_bytes=30000) == (0, 0)
        other = bytearray(raw)
        other[-1] ^= 1
        with pytest.raises(Refused) as e:
            c.upload_raw(a.ticket, a.version, "float32", [NUMEL], bytes(other), 10, chunk_bytes=4093)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "replayed nonce" in str(e.value)
        assert status(st)["accepted"] == 1
        c.close()


def test_short_long_and_malformed_chunked_uploads_are_refused_with_the_same_messages(pki, tmp_path):
    with start_server(pki, tmp_path / "s", model(), limits=SMALL, mode="async", buffer_size=2) as st:
        c = connect(pki, st, 0)
        a = c.check_in(10).assignment
        before = status(st)
        size = 4 * NUMEL
        chunks = 4096
        ok = torch.zeros(NUMEL).numpy().tobytes()
        cases = [
            ("truncated", f"stream ended after {size - 4} of the {size} bytes", ok[:-4]),
            ("shape", f"more than the {size} bytes of shape ({NUMEL},) float32", ok + bytes(4)),
            ("nonfinite", "non-finite", torch.full((NUMEL,), float("nan")).numpy().tobytes()),
        ]
        for reason, text, body in cases:
            with pytest.raises(Refused) as e:
                c.upload_raw(a.ticket, a.version, "float32", [NUMEL], body, 10, chunk_bytes=chunks)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in str(e.value), (reason, str(e.value))
        # a data part whose length runs past its message, after good parts: not a valid UploadPart
        creds = grpc.ssl_channel_credentials(root_certificates=open(pki.ca, "rb").read())
        with grpc.secure_channel(f"localhost:{st.port}", creds) as ch:
            header = pb.UploadPart(
                header=pb.UploadHeader(
                    ticket=a.ticket, base_version=a.version, dtype="float32", shape=[NUMEL], num_examples=10
                )
            ).SerializeToString()
            parts = [header, pb.UploadPart(data=ok[:chunks]).SerializeToString(), b"\x12\x85\x01abc"]
            with pytest.raises(grpc.RpcError) as e:
                ch.stream_unary(wire.UPLOAD)(iter(parts), metadata=((wire.AUTH_HEADER, f"Bearer {pki.token(0)}"),))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid UploadPart" in e.value.details()
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"] and after["accepted"] == 0
        assert after["rejected_by_reason"] == {"truncated": 1, "shape": 1, "nonfinite": 1, "invalid": 1}
        assert not (tmp_path / "s" / "ledger.jsonl").exists()
        assert list((tmp_path / "s" / "pending").iterdir()) == []
        c.close()


def test_the_fingerprint_is_zlibs_crc32_so_older_ledgers_still_answer_retries():
    # the ledger keeps digests across restarts and upgrades: the faster CRC (isal) must give the
    # very values zlib gave, whole and block by block, at odd lengths and offsets
    import zlib

    from flotilla.network.coordinator import crc32

    rng = random.Random(3)
    for size in (0, 1, 7, 4093, 65536, 1_000_003):
        data = rng.randbytes(size)
        assert fingerprint(data) == f"crc32:{zlib.crc32(data):08x}:{size}"
        cut = rng.randint(0, size)
        assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)


def test_all_finite_is_exact_even_where_the_float32_sum_overflows():
    from flotilla.network.coordinator import all_finite

    w = torch.randn(10_000)
    assert all_finite(w)
    big = torch.full((10,), 3e38)  # every value finite, their float32 sum is inf
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = w.clone()
        v[1234] = bad
        assert not all_finite(v)
    v = big.clone()
    v[3] = float("nan")
    assert not all_finite(v)


def test_the_data_plane_sums_the_squares_as_the_body_arrives_and_gets_check_deltas_norm(pki, tmp_path, monkeypatch):
    """The data plane sums each 256 KiB block's squares while the block is in the cache
    (coordinator.block_squares); check_delta then takes that sum instead of a pass over the whole
    update.  It is squared_norm's sum over the same blocks, so the ledger's norm is the same
    whichever transport carried the update, and closer to the exact norm than a float32 pass."""
    from flotilla.network import coordinator

    passes = []
    real = coordinator.squared_norm
    monkeypatch.setattr(coordinator, "squared_norm", lambda d: passes.append(1) or real(d))
    torch.manual_seed(1)
    big = nn.Linear(600, 500)  # 300,500 parameters: 5 blocks, the last one short
    delta = torch.randn(300_500) * 1e-2
    norms = {}
    with start_server(pki, tmp_path / "s", big, mode="async", buffer_size=4) as st:
        for i, data_plane in ((0, True), (1, False)):
            with Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca, data_plane=data_plane) as c:
                a = c.check_in(10).assignment
                if data_plane:
                    a = c.check_in(10).assignment  # the second check-in goes over the data plane it named
                before = len(passes)
                c.upload(a, delta, 10)
                norms[data_plane] = (len(passes) - before, st.server.dataplane.served["upload"])
        ledger = [json.loads(x) for x in (tmp_path / "s" / "ledger.jsonl").read_text().splitlines()]
    assert norms[True] == (0, 1)  # over the data plane: no pass over the update on the loop
    assert norms[False] == (1, 1)  # over gRPC: check_delta's own pass (the data plane served nothing more)
    accepted = [r["norm"] for r in ledger if r["event"] == "accepted"]
    exact = float(torch.linalg.vector_norm(delta.double()))
    assert accepted == [round(real(delta) ** 0.5, 6)] * 2
    assert abs(accepted[0] - exact) < 1e-6 * exact
