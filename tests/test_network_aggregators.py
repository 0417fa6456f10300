"""Scale-out (issue 14, the server): ``serve --aggregators N`` takes the same steps as one process
(aggregators serve the model and take the uploads), and an aggregator without the coordinator's key
is refused with one line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from flotilla.network.aggregator import AggregatorServer, AggregatorThread
from flotilla.network.auth import TokenTable
from tests.network_helpers import PKI, connect, start_server, status

NUMEL = 18
K, STEPS, DEVICES = 2, 3, 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=DEVICES)


def aggregator(pki, state, name: str, key: bytes | None = None, **kw) -> AggregatorServer:
    return AggregatorServer(
        name=name,
        coordinator=f"localhost:{kw.pop('port')}",
        key=key if key is not None else (state / "aggregator.key").read_text().strip().encode(),
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=state / "aggregators" / name,
        ca=pki.ca,
        fsync=False,
        **kw,
    )


def delta(step: int, device: int) -> torch.Tensor:
    # multiples of 2^-10 well inside float32's exact range: every sum is exact in any order, so one
    # process and two partial sums must give bit-identical models
    return (torch.arange(NUMEL, dtype=torch.float32) - 7 + 3 * device - 5 * step) * 2.0**-10


def feed(pki, st, direct: int = -1) -> list[tuple[str, int, str | None]]:
    """K updates per step from devices 0..K-1 (one ticket each, staleness 0); returns (assignment,
    seq, aggregator address) acked.  Update number ``direct`` goes to the server itself."""
    from flotilla.client import Connection

    acked = []
    conns = {}
    for step in range(STEPS):
        for d in range(step % 2, step % 2 + K):
            c = connect(pki, st, d)
            ci = c.check_in(10)
            while ci.action == "wait":  # a device rests retry_after_s after an accepted update
                time.sleep(ci.retry_after_s)
                ci = c.check_in(10)
            assert ci.action == "train", ci
            a = ci.assignment
            if len(acked) == direct:  # an SDK that ignores the aggregator: the coordinator still takes it
                a.aggregator = None
            up = (
                c
                if not a.aggregator
                else conns.setdefault(a.aggregator, {}).setdefault(d, Connection(a.aggregator, pki.token(d), ca=pki.ca))
            )
            if a.aggregator:  # the aggregator serves the version's weights, as fetched from the coordinator
                assert torch.equal(up.download(a.version), c.download(a.version))
            seq, _ = up.upload(a, delta(step, d), 10, train_loss=1.0, examples_seen=10)
            acked.append((a.id, seq, a.aggregator))
            c.close()
        deadline = time.time() + 20
        while status(st)["version"] < step + 1:
            assert time.time() < deadline, status(st)
            time.sleep(0.02)
    for by in conns.values():
        for c in by.values():
            c.close()
    return acked


def ledger(state) -> list[dict]:
    return [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]


def test_two_aggregators_take_the_same_steps_as_one_process(pki, tmp_path):
    one = start_server(
        pki,
        tmp_path / "one",
        mode="async",
        concurrency=DEVICES,
        buffer_size=K,
        total_steps=STEPS,
        retry_after_s=0.05,
        linger_s=2.0,
    )
    try:
        feed(pki, one)
        want = status(one)
    finally:
        one.stop()
    state = tmp_path / "scaled"
    st = start_server(
        pki,
        state,
        mode="async",
        concurrency=DEVICES,
        buffer_size=K,
        total_steps=STEPS,
        retry_after_s=0.05,
        linger_s=2.0,  # the aggregators learn that the last step is committed, and delete its files
        server={"aggregators": 2},
    )
    aggs = []
    try:
        aggs = [AggregatorThread(aggregator(pki, state, f"agg-{i}", port=st.port)) for i in range(2)]
        acked = feed(pki, st, direct=K * STEPS - 1)
        got = status(st)
        deadline = time.time() + 5  # each aggregator deletes the files of committed updates (next Watch)
        while any((state / "aggregators").glob("*/pending/*.bin")) and time.time() < deadline:
            time.sleep(0.05)
        left = list((state / "aggregators").glob("*/pending/*.bin"))
    finally:
        for a in aggs:
            a.stop()
        st.stop()
    assert got["version"] == want["version"] == STEPS
    assert got["weights_sha256"] == want["weights_sha256"]  # the same model, bit for bit
    # every update but the direct one went through an aggregator, both took some, the ledger books each
    assert {a for _, _, a in acked} == {f"localhost:{x.port}" for x in aggs} | {None}
    records = ledger(state)
    accepted = {r["seq"]: r for r in records if r["event"] == "accepted"}
    assert sorted(accepted) == list(range(K * STEPS))
    assert [r.get("aggregator") for r in accepted.values()].count(None) == 1
    assert {r.get("aggregator") for r in accepted.values()} == {"agg-0", "agg-1", None}
    assert [s for r in records if r["event"] == "step" for s in r["seqs"]] == list(range(K * STEPS))
    assert {(r["assignment"], s) for s, r in accepted.items()} == {(i, s) for i, s, _ in acked}
    assert not left  # each aggregator deleted the files of its committed updates


def test_an_aggregator_without_the_coordinators_key_is_refused_with_one_line(pki, tmp_path):
    state = tmp_path / "state"
    st = start_server(pki, state, mode="async", concurrency=2, buffer_size=2, total_steps=1, server={"aggregators": 1})
    try:
        with pytest.raises(PermissionError, match="wrong or missing aggregator key") as e:
            AggregatorThread(aggregator(pki, state, "intruder", key=b"0" * 64, port=st.port))
        assert "\n" not in str(e.value)
        assert status(st)["rejected_by_reason"].get("aggregator_auth", 0) >= 1
        # a device's check-in waits while the aggregator is missing: no assignment goes nowhere
        c = connect(pki, st, 0)
        assert c.check_in(10).action == "wait"
        c.close()
    finally:
        st.stop()


def test_a_second_aggregator_beyond_the_expected_count_is_refused(pki, tmp_path):
    state = tmp_path / "state"
    st = start_server(pki, state, mode="async", concurrency=2, buffer_size=2, total_steps=1, server={"aggregators": 1})
    first = None
    try:
        first = AggregatorThread(aggregator(pki, state, "agg-0", port=st.port))
        with pytest.raises(
            PermissionError, match="would be aggregator 2 of a coordinator started with --aggregators 1"
        ):
            AggregatorThread(aggregator(pki, state, "agg-9", port=st.port))
    finally:
        if first is not None:
            first.stop()
        st.stop()


@pytest.mark.parametrize(
    "settings, why",
    [
        ({"mode": "sync"}, "scale-out runs async FedBuff"),
        (
            {"mode": "async", "server": {"aggregators": 2, "secure_buffer": True}},
            "secure aggregation run in one process",
        ),
    ],
)
def test_what_the_aggregators_do_not_run_is_refused_with_one_line(pki, tmp_path, settings, why):
    from flotilla.network.coordinator import CoordinatorSettings
    from flotilla.network.server import FlotillaServer
    from tests.network_helpers import tiny_model

    server = settings.pop("server", {"aggregators": 2})
    with pytest.raises(ValueError, match=why):
        FlotillaServer(
            tiny_model(),
            tls=pki.tls(),
            tokens=TokenTable.load(pki.paths["tokens_json"]),
            state_dir=tmp_path / "s",
            settings=CoordinatorSettings(**settings),
            fsync=False,
            **server,
        )
    FlotillaServer(  # the state directory was let go (and nothing half-built holds it)
        tiny_model(), tls=pki.tls(), tokens=TokenTable.load(pki.paths["tokens_json"]), state_dir=tmp_path / "s"
    ).store.close()
