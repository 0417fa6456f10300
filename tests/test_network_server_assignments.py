"""The per-device assignment table, retries of accepted uploads, and refusals a device cannot fix
(issue 11 items 2, 5, 21).  Server in a thread, devices by hand over TLS on loopback."""

from __future__ import annotations

import grpc
import pytest
import torch

from flotilla.client import Connection, Refused
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.refusals import NEVER, RETRY_CHECKIN, RETRY_REQUEST, retry_class
from tests.network_helpers import PKI, connect, start_server, status
from tests.network_helpers import train_assignment as train

NUMEL = 18


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def test_one_device_checking_in_six_times_holds_one_assignment_and_cannot_fill_the_buffer(pki, tmp_path):
    """Item 2: each async check-in revokes the device's previous ticket; only the last one uploads."""
    with start_server(pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=4) as st:
        c0 = connect(pki, st, 0)
        tickets = [train(c0) for _ in range(6)]
        assert status(st)["in_flight"] == 1
        for a in tickets[:-1]:
            with pytest.raises(Refused) as e:
                c0.upload(a, torch.full((NUMEL,), 0.01), 10)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "live assignment" in str(e.value)
        assert c0.upload(tickets[-1], torch.full((NUMEL,), 0.01), 10) == (0, 0)
        s = status(st)
        assert (s["accepted"], s["buffered"], s["version"]) == (1, 1, 0)
        assert s["rejected_by_reason"] == {"revoked": 5}
        c0.close()


def test_sync_check_in_again_returns_the_same_live_assignment(pki, tmp_path):
    with start_server(pki, tmp_path / "s", cohort=2) as st:
        c0 = connect(pki, st, 0)
        assert train(c0).id == train(c0).id
        assert status(st)["in_flight"] == 1
        c0.close()


def test_a_retry_of_an_upload_that_closed_its_round_gets_the_same_acceptance_answer(pki, tmp_path):
    """Item 5: the answer to the upload that closed round 0 was lost; its retry, now in round 1, is
    told (seq 0, version 1) again, not "late, round closed", and nothing is counted twice."""
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0, total_steps=3) as st:
        c0 = connect(pki, st, 0)
        a = train(c0)
        d = torch.full((NUMEL,), 0.01)
        assert c0.upload(a, d, 10) == (0, 1)
        w = st.server.coord.weights.clone()
        assert c0.upload(a, d, 10) == (0, 1)  # the retry
        s = status(st)
        assert (s["accepted"], s["version"], s["rejected"]) == (1, 1, 0)
        assert torch.equal(st.server.coord.weights, w)
        with pytest.raises(Refused) as e:  # other bytes under the same ticket: a replay
            c0.upload(a, d * 2, 10)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "replayed nonce" in str(e.value)
        c0.close()


def test_a_retry_after_the_answer_left_memory_is_answered_from_the_ledger(pki, tmp_path):
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0, total_steps=3, assignment_timeout_s=0.3) as st:
        c0 = connect(pki, st, 0)
        a = train(c0)
        d = torch.full((NUMEL,), 0.01)
        assert c0.upload(a, d, 10) == (0, 1)
        import time

        time.sleep(0.7)  # past expiry + grace: pruned from memory
        st.call(st.server.coord.status)
        assert a.id not in st.server.coord.table.answers
        assert c0.upload(a, d, 10) == (0, 1)
        c0.close()


def test_a_device_refused_for_good_is_not_handed_the_same_work_and_another_device_takes_the_round(pki, tmp_path):
    """Item 21 (server side): a norm over the bound spoils the assignment; the device's next check-in
    revokes it (sync: WAIT for the rest of the round), its slot goes to another device, and the
    round closes without it."""
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0, max_update_norm=0.001, total_steps=2) as st:
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        a = train(c0)
        assert c1.check_in(10).action == "wait"  # the only slot is taken
        with pytest.raises(Refused) as e:
            c0.upload(a, torch.full((NUMEL,), 0.3), 10)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the bound" in str(e.value)
        for _ in range(3):  # no spin: the same work is not handed back
            assert c0.check_in(10).action == "wait"
        b = train(c1)  # the freed slot
        assert c1.upload(b, torch.full((NUMEL,), 1e-4), 10) == (0, 1)
        assert train(c0).version == 1  # back in the next round
        c0.close()
        c1.close()


def test_refusals_say_whether_to_retry_check_in_again_or_give_up(pki, tmp_path):
    """Item 21: the class a device acts on, in the status code and in trailing metadata."""
    assert retry_class("RESOURCE_EXHAUSTED") == retry_class("DEADLINE_EXCEEDED") == RETRY_REQUEST
    assert retry_class("FAILED_PRECONDITION") == RETRY_CHECKIN
    assert retry_class("INVALID_ARGUMENT") == retry_class("PERMISSION_DENIED") == NEVER
    from tests.test_network_hostile import Raw, data, header, trailing

    with start_server(pki, tmp_path / "s", cohort=2, max_update_norm=0.001, assignment_timeout_s=0.3) as st:
        c0 = connect(pki, st, 0)
        a = train(c0)
        raw = Raw(pki, st.port, 0)
        with pytest.raises(grpc.RpcError) as e:
            raw.upload([header(a), data(torch.full((NUMEL,), 0.3))])
        assert trailing(e.value) == {"flotilla-retry": "never", "flotilla-refusal": "norm"}
        import time

        time.sleep(0.4)
        with pytest.raises(grpc.RpcError) as e:
            raw.upload([header(a), data(torch.zeros(NUMEL))])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # expired: check in again, never retried as is
        assert trailing(e.value) == {"flotilla-retry": "checkin", "flotilla-refusal": "expired"}
        raw.close()
        c0.close()


def test_rounds_have_a_deadline_by_default():
    """Item 21: one failing device cannot stall a sync run for ever (config and settings agree)."""
    from flotilla.network.config import NetworkConfig

    net = NetworkConfig(tls={"cert": "c", "key": "k"}, tokens="t")
    assert CoordinatorSettings().round_deadline_s == net.round_deadline_s == 300.0


def test_a_retry_while_the_first_attempt_is_still_committing_waits_and_gets_its_answer(pki, tmp_path):
    """Item 5: the device gave up waiting (its deadline passed) while the server was still writing
    the update; the retry is told to retry (busy), not refused as a replay, and then gets the
    first attempt's answer; the update counts once."""
    import time

    with start_server(pki, tmp_path / "s", cohort=2) as st:
        store = st.server.store
        slow_stage = store.stage

        def stage(raw):
            time.sleep(1.0)  # a slow disk
            return slow_stage(raw)

        store.stage = stage
        impatient = Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca, timeout_s=0.3)
        a = train(impatient)
        d = torch.full((NUMEL,), 0.01)
        with pytest.raises(Refused) as e:
            impatient.upload(a, d, 10)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own deadline
        with pytest.raises(Refused) as e:
            impatient.upload(a, d, 10)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in progress" in str(e.value)
        time.sleep(1.0)
        store.stage = slow_stage
        assert connect(pki, st, 0).upload(a, d, 10) == (0, 0)
        s = status(st)
        assert (s["accepted"], s["buffered"], s["uploading"]) == (1, 1, 0)
        impatient.close()
