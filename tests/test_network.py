"""Network server and device SDK over TLS on loopback (server in a thread of this process).

Every bad request must be refused with a clear error and leave the model, the buffer and the
ledger exactly as they were.  Multi-process training runs are in test_network_e2e.py.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from torch import nn

from flotilla.client import Connection, Refused
from flotilla.network.server import Limits
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, run_devices, start_server, status

NUMEL = 18  # nn.Linear(5, 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def connect(pki, st, i=0, token=None, **kw) -> Connection:
    return Connection(f"localhost:{st.port}", pki.token(i) if token is None else token, ca=pki.ca, **kw)


def assignment(conn):
    ci = conn.check_in(10)
    assert ci.action == "train", ci
    return ci.assignment


def test_unknown_or_missing_token_is_refused(pki, tmp_path):
    with start_server(pki, tmp_path / "s") as st:
        for token in ("not-a-token", ""):
            with connect(pki, st, token=token) as c, pytest.raises(Refused) as e:
                c.check_in()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "unknown client" in str(e.value)
        # the admin token may read status but not train
        with connect(pki, st, token=pki.tokens["admin"]) as c:
            assert c.status()["version"] == 0
            with pytest.raises(Refused) as e:
                c.check_in()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert status(st)["rejected_by_reason"]["auth"] == 3


def test_plaintext_and_untrusted_connections_fail(pki, tmp_path):
    with start_server(pki, tmp_path / "s") as st:
        channel = grpc.insecure_channel(f"localhost:{st.port}")
        call = channel.unary_unary("/flotilla.v1.Flotilla/Status")
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        other = PKI(tmp_path / "other", devices=1)  # a CA this server's certificate is not from
        with (
            Connection(f"localhost:{st.port}", pki.token(0), ca=other.ca, timeout_s=5) as c,
            pytest.raises(Refused) as e,
        ):
            c.check_in()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate(pki, tmp_path):
    with start_server(pki, tmp_path / "s", require_client_cert=True) as st:
        with connect(pki, st, timeout_s=5) as c, pytest.raises(Refused) as e:
            c.check_in()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with connect(pki, st, cert=pki.paths["client_pem"], key=pki.paths["client_key"]) as c:
            assert c.check_in(10).action == "train"


def test_every_bad_upload_is_refused_and_the_model_is_unchanged(pki, tmp_path):
    limits = Limits(max_message_bytes=64 << 10, chunk_bytes=32 << 10)
    with start_server(pki, tmp_path / "s", cohort=2, max_update_norm=10.0, max_examples=1000, limits=limits) as st:
        c0, c1 = connect(pki, st, 0, max_message_bytes=1 << 20), connect(pki, st, 1)
        a = assignment(c0)
        before = status(st)
        good = torch.full((NUMEL,), 0.01)
        bad_cases = [
            (
                "nonfinite",
                grpc.StatusCode.INVALID_ARGUMENT,
                "non-finite",
                lambda: c0.upload(a, torch.tensor([float("nan")] + [0.0] * (NUMEL - 1)), 10),
            ),
            (
                "nonfinite",
                grpc.StatusCode.INVALID_ARGUMENT,
                "non-finite",
                lambda: c0.upload(a, torch.full((NUMEL,), float("inf")), 10),
            ),
            (
                "shape",
                grpc.StatusCode.INVALID_ARGUMENT,
                "shape (17,), expected (18,)",
                lambda: c0.upload(a, torch.zeros(NUMEL - 1), 10),
            ),
            (
                "truncated",
                grpc.StatusCode.INVALID_ARGUMENT,
                "stream ended after 68",
                lambda: c0.upload_raw(a.ticket, a.version, "float32", [NUMEL], torch.zeros(NUMEL - 1).numpy(), 10),
            ),
            (
                "shape",
                grpc.StatusCode.INVALID_ARGUMENT,
                "more than the 72 bytes",
                lambda: c0.upload_raw(a.ticket, a.version, "float32", [NUMEL], torch.zeros(NUMEL + 1).numpy(), 10),
            ),
            ("dtype", grpc.StatusCode.INVALID_ARGUMENT, "dtype 'float64'", lambda: c0.upload(a, good.double(), 10)),
            (
                "norm",
                grpc.StatusCode.INVALID_ARGUMENT,
                "exceeds the bound 10",
                lambda: c0.upload(a, torch.full((NUMEL,), 5.0), 10),
            ),
            ("examples", grpc.StatusCode.INVALID_ARGUMENT, "num_examples=0", lambda: c0.upload(a, good, 0)),
            ("examples", grpc.StatusCode.INVALID_ARGUMENT, "num_examples=5000", lambda: c0.upload(a, good, 5000)),
            (
                "version",
                grpc.StatusCode.INVALID_ARGUMENT,
                "names model version 3",
                lambda: c0.upload_raw(a.ticket, 3, "float32", [NUMEL], good.numpy(), 10),
            ),
            (
                "ticket",
                grpc.StatusCode.PERMISSION_DENIED,
                "not one this server signed",
                lambda: c0.upload_raw(a.ticket[:-4] + "0000", a.version, "float32", [NUMEL], good.numpy(), 10),
            ),
            ("ticket", grpc.StatusCode.PERMISSION_DENIED, "belongs to another device", lambda: c1.upload(a, good, 10)),
            # one message over the 64 KiB limit: gRPC itself refuses it, the server counts the cut stream
            (
                "truncated",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "larger than max",
                lambda: c0.upload_raw(
                    a.ticket, a.version, "float32", [NUMEL], bytes(100 << 10), 10, chunk_bytes=100 << 10
                ),
            ),
        ]
        for reason, code, text, call in bad_cases:
            with pytest.raises(Refused) as e:
                call()
            assert e.value.code == code, (reason, e.value)
            assert text in str(e.value), (reason, str(e.value))
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"]
        assert (after["version"], after["accepted"], after["buffered"]) == (0, 0, 0)
        expected = {}
        for reason, *_ in bad_cases:
            expected[reason] = expected.get(reason, 0) + 1
        assert after["rejected_by_reason"] == expected
        assert not (tmp_path / "s" / "ledger.jsonl").exists()

        # the genuine upload counts once; replaying its nonce is refused and changes nothing
        seq, version = c0.upload(a, good, 10)
        assert (seq, version) == (0, 0)
        mid = status(st)
        with pytest.raises(Refused) as e:
            c0.upload(a, good * 2, 10)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "replayed nonce" in str(e.value)
        end = status(st)
        assert (end["accepted"], end["buffered"], end["weights_sha256"]) == (1, 1, mid["weights_sha256"])
        assert end["rejected_by_reason"]["replay"] == 1
        ledger = [json.loads(x) for x in (tmp_path / "s" / "ledger.jsonl").read_text().splitlines()]
        assert [r["assignment"] for r in ledger] == [a.id]
        c0.close()
        c1.close()


def test_sync_round_applies_the_weighted_mean_and_refuses_late_uploads(pki, tmp_path):
    with start_server(pki, tmp_path / "s", cohort=2, over_selection=1.5) as st:
        w0 = st.server.coord.weights.clone()
        conns = [connect(pki, st, i) for i in range(3)]
        asg = [assignment(c) for c in conns]  # ceil(2 * 1.5) = 3 assignments for round 0
        with connect(pki, st, 3) as c3:
            assert c3.check_in(10).action == "wait"  # no slot left
        d0, d1 = torch.full((NUMEL,), 0.1), torch.full((NUMEL,), -0.2)
        conns[0].upload(asg[0], d0, 10)
        assert conns[1].upload(asg[1], d1, 30) == (1, 1)  # second update closes the round
        expected = w0 + (10 * d0 + 30 * d1) / 40
        assert torch.allclose(st.server.coord.weights, expected, atol=1e-7)
        before = status(st)["weights_sha256"]
        with pytest.raises(Refused) as e:
            conns[2].upload(asg[2], d0, 10)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "late, round 0 closed" in str(e.value)
        s = status(st)
        assert s["weights_sha256"] == before and s["rejected_by_reason"] == {"late": 1} and s["version"] == 1
        for c in conns:
            c.close()


def test_async_refuses_updates_beyond_the_staleness_limit(pki, tmp_path):
    with start_server(pki, tmp_path / "s", mode="async", concurrency=3, buffer_size=1, max_staleness=1) as st:
        c = [connect(pki, st, i) for i in range(3)]
        old, a1, a2 = assignment(c[0]), assignment(c[1]), assignment(c[2])
        assert c[1].upload(a1, torch.full((NUMEL,), 0.01), 10) == (0, 1)
        assert c[2].upload(a2, torch.full((NUMEL,), 0.01), 10) == (1, 2)  # staleness 1: accepted
        before = status(st)
        with pytest.raises(Refused) as e:
            c[0].upload(old, torch.full((NUMEL,), 0.01), 10)  # staleness 2 > 1
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale, trained from version 0, server is at 2" in str(e.value)
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"] and after["rejected_by_reason"] == {"stale": 1}
        for x in c:
            x.close()


def test_vanished_clients_time_out_and_are_replaced(pki, tmp_path):
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0, assignment_timeout_s=0.5) as st:
        with connect(pki, st, 0) as c0, connect(pki, st, 1) as c1:
            gone = assignment(c0)  # device 0 takes the only slot and vanishes
            assert c1.check_in(10).action == "wait"
            time.sleep(0.7)
            replacement = assignment(c1)  # its slot went to device 1
            assert status(st)["timed_out"] == 1
            with pytest.raises(Refused) as e:
                c0.upload(gone, torch.zeros(NUMEL), 10)
            # FAILED_PRECONDITION (check in again), not DEADLINE_EXCEEDED, which devices retry as is
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in str(e.value)
            assert c1.upload(replacement, torch.zeros(NUMEL), 10) == (0, 1)


def test_request_rate_limit(pki, tmp_path):
    with start_server(pki, tmp_path / "s", limits=Limits(rate=0.5, burst=3), mode="async", concurrency=1) as st:
        with connect(pki, st, 0) as c:
            for _ in range(3):
                c.status()
            with pytest.raises(Refused) as e:
                c.status()
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in str(e.value)
        with connect(pki, st, 1) as other:  # the limit is per device
            other.status()


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_models_larger_than_a_message_stream_in_chunks(pki, tmp_path, compression):
    torch.manual_seed(0)
    model = nn.Linear(1000, 50)  # 50,050 floats = 200 KB > the 64 KiB message limit
    limits = Limits(max_message_bytes=64 << 10, chunk_bytes=16 << 10)
    with start_server(pki, tmp_path / "s", model, cohort=1, limits=limits) as st:
        with connect(pki, st, 0, chunk_bytes=16 << 10, compression=compression) as c:
            a = assignment(c)
            w = c.download(a.version)
            assert torch.equal(w, st.server.coord.weights)
            delta = torch.randn(a.numel) * 1e-3
            assert c.upload(a, delta, 10) == (0, 1)
            assert torch.allclose(st.server.coord.weights, w + delta)


def test_devices_train_with_the_simulators_local_trainer(pki, tmp_path):
    """Four SDK devices in threads: the server ends at the configured version with every
    acknowledged upload in the ledger exactly once, and the loss goes down."""
    data = synthetic_dataset(num_clients=4, per_client=20)
    with start_server(pki, tmp_path / "s", cohort=2, total_steps=4, linger_s=2.0) as st:
        reports = run_devices(st, pki, data, 4)
    assert st.server.coord.version == 4
    ledger = [json.loads(x) for x in (tmp_path / "s" / "ledger.jsonl").read_text().splitlines()]
    accepted = [r["assignment"] for r in ledger if r["event"] == "accepted"]
    steps = [r for r in ledger if r["event"] == "step"]
    acked = [x["assignment"] for r in reports.values() for x in r.accepted]
    assert sorted(acked) == sorted(accepted) and len(set(accepted)) == len(accepted) == 8
    assert [s["version"] for s in steps] == [1, 2, 3, 4] and all(len(s["seqs"]) == 2 for s in steps)
    metrics = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (tmp_path / "s" / "model.safetensors").exists()


def test_sync_round_closes_at_its_deadline_with_min_updates(pki, tmp_path):
    with start_server(
        pki, tmp_path / "s", cohort=3, min_updates=2, round_deadline_s=0.6, assignment_timeout_s=30
    ) as st:
        w0 = st.server.coord.weights.clone()
        conns = [connect(pki, st, i) for i in range(3)]
        asg = [assignment(c) for c in conns]
        conns[0].upload(asg[0], torch.full((NUMEL,), 0.1), 10)
        time.sleep(1.0)
        assert status(st)["version"] == 0  # deadline passed with 1 < min_updates: extended
        conns[1].upload(asg[1], torch.full((NUMEL,), 0.3), 10)
        for _ in range(40):  # the next deadline closes it with 2 updates
            if status(st)["version"] == 1:
                break
            time.sleep(0.05)
        assert status(st)["version"] == 1
        assert torch.allclose(st.server.coord.weights, w0 + 0.2)
        with pytest.raises(Refused) as e:  # the straggler is late
            conns[2].upload(asg[2], torch.zeros(NUMEL), 10)
        assert "late" in str(e.value)
        for c in conns:
            c.close()


@pytest.mark.parametrize("transport", ["data", "grpc"])
def test_an_async_upload_reply_names_the_rest_and_the_device_skips_the_wait_check_in(pki, tmp_path, transport):
    """Async: the device that just uploaded gets no work for retry_after_s; the reply says so
    (UploadReply.rest_s) and the SDK waits it out instead of checking in to be told WAIT."""
    from flotilla.client import Device

    with start_server(
        pki, tmp_path / "s", mode="async", buffer_size=2, concurrency=1, retry_after_s=0.4, total_steps=100
    ) as st:
        if transport == "grpc":
            st.server.data_bound = 0  # check-in replies name no data port: everything over gRPC
        answers = []
        check_in = st.server.coord.check_in

        def counted(device):
            got = check_in(device)
            answers.append("train" if hasattr(got, "id") else "wait" if isinstance(got, float) else "done")
            return got

        st.server.coord.check_in = counted
        c = connect(pki, st, data_plane=transport == "data")
        a = assignment(c)
        assert c.upload(a, torch.zeros(NUMEL), 10) == (0, 0)
        assert 0.3 < c.rest_s <= 0.4  # what is left of its 0.4 s rest
        assert c.check_in(10).action == "wait"  # as the reply said
        c.close()
        x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
        device = Device(f"localhost:{st.port}", pki.token(1), nn.Linear(5, 3), (x, y), ca=pki.ca, max_tasks=3)
        answers.clear()
        report = device.run()
        assert report.tasks == 3 and len(report.accepted) == 3
        assert answers == ["train"] * 3  # no WAIT between its tasks: it rested as told


@pytest.mark.parametrize(
    "sent, kept", [(0.5, 0.5), (0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 300.0), (1e9, 300.0)]
)
def test_a_servers_rest_hint_is_bounded(pki, sent, kept):
    """A buggy or hostile server cannot stall a device with its rest hint: NaN and negatives mean
    none, and no rest exceeds client.MAX_REST_S."""
    from flotilla.network.wire import pb

    c = Connection("localhost:1", pki.token(0), ca=pki.ca)  # never dialled: the reply is stood in
    c._via_data = lambda send: pb.UploadReply(seq=1, version=2, rest_s=sent)
    assert c.upload_raw("t", 0, "float32", [NUMEL], torch.zeros(NUMEL).numpy(), 10) == (1, 2)
    assert c.rest_s == kept
    c.close()
