"""Crashes, restarts and a second server (issue 11 items 6, 7, 8): every committed step has its
metrics record after recovery; one server per port and per state directory; sealed updates a
restart loses are in the ledger, removed from disk and shown."""

from __future__ import annotations

import json

import pytest
import torch

from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.refusals import InUse
from flotilla.network.server import FlotillaServer, ServerThread, TLSFiles
from tests.network_helpers import PKI, connect, start_server, status, tiny_model

NUMEL = 18


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def metrics(state) -> list[dict]:
    return [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]


def test_steps_whose_metrics_a_crash_lost_are_written_back_on_restart(pki, tmp_path):
    """Item 6: after a kill between a step's snapshot and its metrics record, the record came back
    for no step; now recovery writes it from the ledger (training figures exact, evaluation null)."""
    state = tmp_path / "s"
    with start_server(pki, state, cohort=1, over_selection=1.0, total_steps=5) as st:
        c0 = connect(pki, st, 0)
        for i in range(3):
            a = c0.check_in(10).assignment
            c0.upload(a, torch.full((NUMEL,), 0.01 * (i + 1)), 10, train_loss=1.0 + i, examples_seen=10 * (i + 1))
        c0.close()
    full = metrics(state)
    assert [m["round"] for m in full] == [1, 2, 3]
    # the on-disk state a kill -9 leaves when steps 2 and 3 were snapshotted but not yet recorded
    (state / "metrics.jsonl").write_text(json.dumps(full[0]) + "\n")
    with start_server(pki, state, cohort=1, over_selection=1.0, total_steps=5) as st:
        assert status(st)["version"] == 3
        c0 = connect(pki, st, 0)
        c0.upload(c0.check_in(10).assignment, torch.full((NUMEL,), 0.01), 10, train_loss=4.0, examples_seen=40)
        c0.close()
    after = metrics(state)
    assert [m["round"] for m in after] == [1, 2, 3, 4]
    for old, new in zip(full[1:], after[1:3]):
        assert new["recovered"] is True and new["loss"] is None
        for k in ("train_loss", "examples_seen", "clients", "staleness_mean", "staleness_max"):
            assert new[k] == old[k], k
    assert after[3]["examples_seen"] == full[2]["examples_seen"] + 40 and "recovered" not in after[3]


def test_a_second_server_on_the_same_state_directory_is_refused_with_one_line(pki, tmp_path):
    """Item 7: the state directory is locked (flock) while a server uses it."""
    with start_server(pki, tmp_path / "s") as st:
        with pytest.raises(InUse) as e:
            start_server(pki, tmp_path / "s")
        msg = str(e.value)
        assert "\n" not in msg and "in use by another flotilla serve" in msg and str(tmp_path / "s") in msg
        assert isinstance(e.value, ValueError)  # the CLI prints ValueErrors as one line, exit 2
        assert status(st)["version"] == 0  # the first one is unaffected
    with start_server(pki, tmp_path / "s") as st:  # released when the first one stopped
        assert status(st)["version"] == 0


def test_a_server_that_fails_to_start_lets_go_of_its_state_directory(pki, tmp_path):
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0) as st:
        with connect(pki, st, 0) as c:
            c.upload(c.check_in(10).assignment, torch.full((NUMEL,), 0.01), 10)
    with pytest.raises(ValueError, match="saved model has 18 weights"):
        start_server(pki, tmp_path / "s", model=torch.nn.Linear(5, 4))
    with start_server(pki, tmp_path / "s") as st:
        assert status(st)["version"] == 1


def test_a_second_server_on_the_same_port_is_refused_with_one_line(pki, tmp_path):
    """Item 7: no SO_REUSEPORT: the second bind fails, and says why; the first keeps every client."""
    with start_server(pki, tmp_path / "a") as first:
        server = FlotillaServer(
            tiny_model(),
            tls=pki.tls(),
            tokens=TokenTable.load(pki.paths["tokens_json"]),
            state_dir=tmp_path / "b",
            settings=CoordinatorSettings(),
            fsync=False,
        )
        with pytest.raises(InUse) as e:
            ServerThread(server, port=first.port)
        assert "\n" not in str(e.value) and f":{first.port}: the port is in use" in str(e.value)
        for _ in range(5):  # every connection reaches the first server
            with connect(pki, first, 0) as c:
                assert c.status()["state_dir"] == str(tmp_path / "a")
    with start_server(pki, tmp_path / "b") as st:  # the refused server let go of its state directory
        assert status(st)["version"] == 0


def test_a_key_that_does_not_match_its_certificate_is_named(pki, tmp_path):
    other = PKI(tmp_path / "other", devices=1)
    tls = TLSFiles(str(pki.paths["server_pem"]), str(other.paths["server_key"]))
    server = FlotillaServer(
        tiny_model(), tls=tls, tokens=TokenTable.load(pki.paths["tokens_json"]), state_dir=tmp_path / "s", fsync=False
    )
    with pytest.raises(ValueError) as e:
        ServerThread(server)
    assert "network.tls.key" in str(e.value) and "\n" not in str(e.value)


def test_sealed_updates_lost_in_a_restart_are_in_the_ledger_removed_and_shown(pki, tmp_path):
    """Item 8: the lost update had no ledger record, its pending file stayed, and lost_on_restart
    was in neither status nor metrics."""
    from tests.test_network_privacy import start_server as start_private

    kw = dict(mode="async", concurrency=4, buffer_size=2, total_steps=5, secure_buffer=True)
    state = tmp_path / "s"
    with start_private(pki, state, **kw) as st:
        c0 = connect(pki, st, 0)
        c0.upload(c0.check_in(10).assignment, torch.full((NUMEL,), 0.1), 10)
        c0.close()
    assert len(list((state / "pending").iterdir())) == 1
    with start_private(pki, state, **kw) as st:
        s = status(st)
        assert (s["lost_on_restart"], s["dropped_by_reason"], s["buffered"]) == (1, {"lost_on_restart": 1}, 0)
        assert not list((state / "pending").iterdir())
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        c0.upload(c0.check_in(10).assignment, torch.full((NUMEL,), 0.1), 10)
        c1.upload(c1.check_in(10).assignment, torch.full((NUMEL,), 0.1), 10)
        c0.close()
        c1.close()
    ledger = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    [lost] = [r for r in ledger if r["event"] == "dropped"]
    assert lost["reason"] == "lost_on_restart" and lost["seqs"] == [0] and "restart" in lost["why"]
    assert [r["seqs"] for r in ledger if r["event"] == "step"] == [[1, 2]]
    assert metrics(state)[-1]["lost_on_restart"] == 1
    with start_private(pki, state, **kw) as st:  # counted once, not again at the next restart
        assert status(st)["lost_on_restart"] == 1
