"""The masked input as raw bytes in a protobuf field (issue 14), and channels.upload quantize over the
network under sync secure aggregation, quantised into the ring (issue 19)."""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
import torch

from flotilla.client import Connection, Refused
from flotilla.network import secagg
from flotilla.network.secagg import SecAggParams, run_device
from flotilla.secure import packing
from flotilla.secure.errors import ProtocolError
from flotilla.secure.messages import MaskedInput
from flotilla.secure.serialize import dumps_raw, loads
from tests.test_network_secagg import EXAMPLES, MASK, NUMEL, N, checked_in, deltas, expected, run_devices, start


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.network_helpers import PKI

    return PKI(tmp_path_factory.mktemp("pki"), devices=N)


@pytest.fixture
def spy(monkeypatch):
    """What the server decodes: (op, raw bytes beside the JSON, whether the body was bare JSON)."""
    seen = []
    real = secagg.decode_body

    def decode(body):
        req, legacy = real(body)
        if isinstance(req, dict):
            seen.append((req.get("op"), len(req.get("data") or b""), legacy, len(body)))
        return req, legacy

    monkeypatch.setattr(secagg, "decode_body", decode)
    return seen


def test_the_masked_input_travels_as_raw_ring_bytes(pki, tmp_path, spy):
    d = deltas()
    with start(pki, tmp_path / "raw", masking=MASK) as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        assert run_devices(conns, a, d) == [1] * N
        assert torch.allclose(st.server.coord.weights, expected(w0, d, range(N)), rtol=0, atol=1e-6)
    masked = [x for x in spy if x[0] == "masked"]
    assert len(masked) == N and not any(legacy for *_, legacy, _ in spy)
    assert {raw for _, raw, _, _ in masked} == {4 * (NUMEL + 1)}  # 32-bit ring elements, little-endian
    assert all(body - raw < 600 for _, raw, _, body in masked)  # the JSON beside them: ticket, session, ids


def _legacy(conn: Connection):
    """A device of an SDK from before SecAggBody: bare JSON both ways, the vector as base64 inside."""

    def call(req, data=b""):
        if data:
            y = req["msg"]["y"]
            n = len(data) * 8 // y["bits"]
            v = packing.unpack(data, n, y["bits"]).astype(np.dtype(y["dtype"]).newbyteorder("<"))
            req = {
                **req,
                "msg": {**req["msg"], "y": {"dtype": y["dtype"], "b64": base64.b64encode(v.tobytes()).decode()}},
            }
        body = conn._secagg(json.dumps(req).encode(), metadata=conn.metadata, timeout=conn.timeout_s)
        assert body[:1] == b"{"  # answered in kind
        return json.loads(body)

    return call


def test_a_device_sending_the_old_json_body_is_still_served(pki, tmp_path, spy):
    d = deltas()
    with start(pki, tmp_path / "legacy", masking=MASK) as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        results = [None] * N
        import threading

        def go(i):  # devices 0 and 1 run the old SDK, the others the new one
            if i < 2:
                results[i] = run_device(_legacy(conns[i]), a[i].ticket, d[i], float(EXAMPLES[i]), EXAMPLES[i])
            else:
                results[i] = conns[i].secagg_round(a[i], d[i], EXAMPLES[i])

        threads = [threading.Thread(target=go, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [1] * N
        assert torch.allclose(st.server.coord.weights, expected(w0, d, range(N)), rtol=0, atol=1e-6)
    kinds = {(op, legacy) for op, _, legacy, _ in spy if op == "masked"}
    assert kinds == {("masked", True), ("masked", False)}


def test_raw_vectors_must_match_the_rounds_ring():
    msg = MaskedInput(b"s" * 16, 3, np.arange(7, dtype=np.uint16))
    obj, raw = dumps_raw(msg, 11)
    assert obj["y"] == {"dtype": "uint16", "bits": 11} and len(raw) == 10  # 7 x 11 bits, packed
    assert np.array_equal(loads(obj, MaskedInput, length=7, raw=bytes(raw), bits=11).y, msg.y)
    with pytest.raises(ProtocolError, match="11 bits"):
        loads({**obj, "y": {"dtype": "uint16", "bits": 12}}, MaskedInput, length=7, raw=bytes(raw), bits=11)
    with pytest.raises(ProtocolError, match="expected 10 bytes"):
        loads(obj, MaskedInput, length=7, raw=bytes(raw) + b"\0", bits=11)
    with pytest.raises(ProtocolError, match="uint32\\|uint64, b64"):  # the old base64 form has no narrow rings
        legacy = {"dtype": "uint16", "b64": base64.b64encode(msg.y.tobytes()).decode()}
        loads({**obj, "y": legacy}, MaskedInput, length=7)


Q8 = {"upload": [{"name": "quantize", "bits": 8}]}


def test_a_quantised_round_over_the_network_sums_the_devices_codes_exactly(pki, tmp_path, spy, monkeypatch):
    codes, totals = [], []
    real_encode, real_finish = secagg.encode_input, secagg.SecAggServer.finish

    def encode(enc, delta, factor, l2, out, rng=None):
        r = real_encode(enc, delta, factor, l2, out, rng)
        codes.append(out.copy())
        return r

    def finish(self):
        totals.append(real_finish(self).copy())
        return totals[-1]

    monkeypatch.setattr(secagg, "encode_input", encode)
    monkeypatch.setattr(secagg.SecAggServer, "finish", finish)
    d = deltas()
    q = SecAggParams(clip=0.5, max_weight=1.0, degree=None, quantize_bits=8)
    with start(pki, tmp_path / "q", masking=q, weighting="uniform") as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        assert run_devices(conns, a, d) == [1] * N
        got = st.server.coord.weights.clone()
    ring = 8 + 3  # ceil(log2 5) = 3
    assert len(codes) == N and all(c.dtype == np.uint16 and int(c.max()) < 2**ring for c in codes)
    assert np.array_equal(totals[0].astype(np.int64), sum(c.astype(np.int64) for c in codes))  # integer equality
    masked = [raw for op, raw, _, _ in spy if op == "masked"]
    assert masked == [-(-(NUMEL + 1) * ring // 8)] * N  # 19 elements of 11 bits: 27 bytes each
    mean = sum(x.clamp(-0.5, 0.5) for x in d) / N
    step = 0.5 / 127
    assert (got - w0 - mean).abs().max() < step  # each device's rounding is under a step; the mean too


def test_serve_quantises_uploads_into_the_ring_and_refuses_other_channels(pki, tmp_path):
    from flotilla.channels.wire import ServerChannels

    shapes = [(3, 5), (3,)]
    q = SecAggParams(quantize_bits=8)
    with_down = {**Q8, "download": [{"name": "fp16"}]}
    built = ServerChannels.build(with_down, shapes, secure=True, masked=q)
    assert built.assignment["upload"] == [] and built.download_bytes == 2 * NUMEL  # the device compresses nothing
    assert ServerChannels.build(Q8, shapes, secure=True, masked=q) is None
    with pytest.raises(ValueError, match="quantize \\(8, True\\) but secure aggregation quantises None"):
        ServerChannels.build(Q8, shapes, secure=True, masked=SecAggParams())
    with pytest.raises(ValueError, match="topk: a sparse upload"):
        ServerChannels.build({"upload": [{"name": "topk", "keep": 0.5}]}, shapes, secure=True, masked=q)
    with pytest.raises(ValueError, match="in async mode: the server receives sealed updates"):
        ServerChannels.build(Q8, shapes, secure=True)


def test_a_body_that_is_neither_is_refused(pki, tmp_path):
    with start(pki, tmp_path / "junk", masking=MASK) as st:
        conn = Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca)
        with pytest.raises(Refused) as e:
            conn.secagg_send(b"\x0a\x03abc")  # a SecAggBody whose json is not JSON
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not a SecAggBody or JSON" in str(e.value)
