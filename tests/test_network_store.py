"""Crash recovery of the server's durable state: every accepted update applied exactly once."""

from __future__ import annotations

import json

import torch

from flotilla.client import Connection
from flotilla.network.store import StateStore
from tests.network_helpers import PKI, start_server

N = 6


def entry(seq, file, device="d", version=0):
    return {
        "seq": seq,
        "file": file,
        "assignment": f"a{seq}",
        "device": device,
        "base_version": version,
        "expires": 1e12,
        "version": version,
        "staleness": 0,
        "num_examples": 1,
        "weight": 1.0,
        "norm": 0.0,
        "train_loss": 0.0,
        "examples_seen": 1,
    }


def delta(v):
    return torch.full((N,), float(v))


def test_fresh_directory_recovers_to_nothing(tmp_path):
    rec = StateStore(tmp_path).recover(N)
    assert rec.tensors is None and rec.pending == [] and rec.next_seq == 0


def test_accepted_updates_survive_and_unacknowledged_ones_are_dropped(tmp_path):
    s = StateStore(tmp_path, fsync=False)
    s.accept(entry(0, s.stage(delta(1).numpy().tobytes())))
    s.accept(entry(1, s.stage(delta(2).numpy().tobytes())))
    # crash after staging update 2's delta but before its ledger line (so it was never acked)
    orphan = s.stage(delta(3).numpy().tobytes())
    s.close()
    # and a torn half line at the end of the ledger
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"event":"accepted","seq":3,"assi')
    rec = StateStore(tmp_path).recover(N)
    assert [e["seq"] for e, _ in rec.pending] == [0, 1]
    assert torch.equal(rec.pending[1][1], delta(2))
    assert rec.next_seq == 2
    assert not (tmp_path / "pending" / orphan).exists()
    assert len(rec.repairs) == 2
    assert (tmp_path / "ledger.jsonl").read_text().endswith("}\n")  # torn tail cut off


def test_a_step_interrupted_after_its_snapshot_is_completed_once(tmp_path):
    s = StateStore(tmp_path, fsync=False)
    entries = [entry(i, s.stage(delta(i).numpy().tobytes())) for i in range(3)]
    for e in entries:
        s.accept(e)
    s.step(1, entries[:2], {"weights": delta(9)}, {"counters": {}})
    # crash between the snapshot and the "step" ledger line: remove the line, bring back the files
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "step"
    (tmp_path / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    for i in (0, 1):
        (tmp_path / "pending" / entries[i]["file"]).write_bytes(delta(i).numpy().tobytes())
    s.close()
    rec = StateStore(tmp_path).recover(N)
    assert torch.equal(rec.tensors["weights"], delta(9)) and rec.meta["version"] == 1
    assert [e["seq"] for e, _ in rec.pending] == [2]  # 0 and 1 are in the snapshot already
    steps = [r for r in StateStore(tmp_path).read_ledger() if r["event"] == "step"]
    assert steps == [{"event": "step", "version": 1, "seqs": [0, 1], "t": steps[0]["t"], "recovered": True}]
    assert [p.name for p in (tmp_path / "pending").iterdir()] == [entries[2]["file"]]


def test_a_step_interrupted_before_its_snapshot_is_redone(tmp_path):
    s = StateStore(tmp_path, fsync=False)
    for i in range(2):
        s.accept(entry(i, s.stage(delta(i).numpy().tobytes())))
    s.close()  # crash before the snapshot: both updates are still pending and get re-added
    rec = StateStore(tmp_path).recover(N)
    assert rec.tensors is None and [e["seq"] for e, _ in rec.pending] == [0, 1]


def test_server_restart_keeps_the_buffer_answers_a_retry_the_same_and_refuses_a_replay(tmp_path):
    pki = PKI(tmp_path / "pki", devices=3)
    state = tmp_path / "state"
    up = torch.full((18,), 0.1)
    with start_server(pki, state, cohort=2) as st:
        w0 = st.server.coord.weights.clone()
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = c.check_in(10).assignment
            assert c.upload(a, up, 10) == (0, 0)
    # a new server process on the same state directory
    with start_server(pki, state, cohort=2) as st:
        coord = st.server.coord
        assert (coord.version, len(coord.buffer), coord.counters["accepted"]) == (0, 1, 1)
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            # the same upload again (a retry whose answer was lost): the same answer, counted once
            assert c.upload(a, up, 10) == (0, 0)
            try:
                c.upload(a, up * 2, 10)  # other bytes under the same ticket: a replay
                raise AssertionError("replay accepted")
            except Exception as e:  # noqa: BLE001
                assert "replayed nonce" in str(e)
        assert (coord.version, len(coord.buffer), coord.counters["accepted"]) == (0, 1, 1)
        with Connection(f"localhost:{st.port}", pki.token(1), ca=pki.ca) as c:
            b = c.check_in(10).assignment
            assert c.upload(b, -up, 30) == (1, 1)
        assert torch.allclose(coord.weights, w0 + (10 * up - 30 * up) / 40)
    steps = [r for r in StateStore(state).read_ledger() if r["event"] == "step"]
    assert [r["seqs"] for r in steps] == [[0, 1]]
