"""A sync secure round interrupted by a server restart (docs/deployment.md, "Secure aggregation in
network mode (sync)"): the round's protocol state (keys, shares, the masked sum) lived in memory and
is gone; the tickets are not (signed with the state directory's key, adopted once per device after a
restart), so the same round re-runs from its first stage with the same tickets, and each device's
update is counted once."""

from __future__ import annotations

import json

import grpc
import pytest

from flotilla.client import Connection, Refused
from tests.network_helpers import PKI
from tests.test_network_secagg import MASK, N, checked_in, deltas, expected, run_devices, start


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=N)


def _events(state):
    p = state / "ledger.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_a_round_cut_by_a_restart_after_masked_inputs_reruns_once_with_the_same_tickets(pki, tmp_path):
    d = deltas()
    state = tmp_path / "s"
    # every device sends its masked input and goes silent: the server holds the masked sum and waits
    # for unmask responses (secagg_stage_s) when it is stopped
    with start(pki, state, masking=MASK, secagg_stage_s=5.0) as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        assert run_devices(conns, a, d, stop_after={i: "masked" for i in range(N)}) == [-1] * N
        assert len(st.server.coord.secagg.server.u3) == N  # all masked inputs are in the sum
        sha0 = st.call(st.server.coord.status)["weights_sha256"]
    assert [e for e in _events(state) if e["event"] == "accepted"] == []  # nothing is recorded before the step
    with start(pki, state, masking=MASK, secagg_stage_s=5.0) as st:
        coord = st.server.coord
        s = st.call(coord.status)
        assert (s["version"], s["accepted"], s["weights_sha256"], coord.secagg) == (0, 0, sha0, None)
        conns = [Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca) for i in range(N)]
        # device 0 checks in again first: it gets a fresh ticket, and its pre-restart one is then refused
        fresh = conns[0].check_in(10).assignment
        assert fresh.version == 0 and fresh.ticket != a[0].ticket
        with pytest.raises(Refused) as e:
            conns[0].secagg_call({"op": "join", "ticket": a[0].ticket, "num_examples": 10})
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "live assignment" in str(e.value)
        # the others re-run the same round with their old tickets: the protocol starts over and completes
        assert run_devices(conns, [fresh, *a[1:]], d) == [1] * N
        s = st.call(coord.status)
        assert (s["version"], s["accepted"]) == (1, N)
        assert (coord.weights - expected(w0, d, range(N))).abs().max() <= 1e-6  # every update exactly once
        # an old ticket after the round: told the round is over, not counted again
        again = conns[1].secagg_call({"op": "join", "ticket": a[1].ticket, "num_examples": 10})
        assert again["status"] == "abort" and "round 0 is over" in again["message"]
        assert st.call(coord.status)["accepted"] == N
    events = _events(state)
    accepted = [e["device"] for e in events if e["event"] == "accepted"]
    assert sorted(accepted) == sorted(set(accepted)) and len(accepted) == N
    assert [e["version"] for e in events if e["event"] == "step"] == [1]


def test_aborted_tickets_are_refused_until_a_restart_then_join_the_rerun_once(pki, tmp_path):
    d = deltas()
    state = tmp_path / "s"
    with start(pki, state, masking=MASK) as st:  # threshold 3 of 5: three vanish, the round aborts
        conns, a = checked_in(pki, st)
        res = run_devices(conns, a, d, stop_after={0: "masked", 1: "masked", 2: "masked"})
        assert st.server.coord.counters["secagg_aborted"] == 1 and res[:3] == [-1, -1, -1]
        assert conns[3].secagg_call({"op": "join", "ticket": a[3].ticket, "num_examples": 10})["status"] == "abort"
    with start(pki, state, masking=MASK) as st:
        conns = [Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca) for i in range(N)]
        # the set of aborted tickets was in memory: the same ticket now joins the round's rerun
        joined = conns[3].secagg_call({"op": "join", "ticket": a[3].ticket, "num_examples": 10})
        assert joined["status"] == "ok"
        assert conns[3].secagg_call({"op": "join", "ticket": a[3].ticket, "num_examples": 10})["id"] == joined["id"]
