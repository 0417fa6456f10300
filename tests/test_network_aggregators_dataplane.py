"""Scale-out aggregators serve downloads and uploads on their own data plane (issue 14, the server).

The assignment names the aggregator's data port (``aggregator_data_port``); uploads through it give
the ledger and model of gRPC uploads (one upload function for both transports); a check-in there is
refused UNIMPLEMENTED (devices check in with the coordinator) and an unknown token is refused; a
device that cannot reach the port falls back to gRPC and still trains; exactly-once holds across a
restart of an aggregator, which registers again with its data port; the coordinator's own data
plane takes the devices' check-ins."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import torch

from flotilla.client import Connection, Refused
from flotilla.network.aggregator import AggregatorThread
from flotilla.network.dataplane_client import DataClient, DataRefusal
from flotilla.network.partials import KEY_HEADER
from flotilla.network.wire import pb
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, run_devices, start_server, status
from tests.test_network_aggregators import aggregator, delta, ledger

NUMEL = 18
K, STEPS = 2, 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def scaled(pki, state, n: int, **settings):
    """A coordinator expecting ``n`` aggregators, and the ``n`` aggregators (threads)."""
    kw = dict(mode="async", concurrency=4, buffer_size=K, total_steps=STEPS, retry_after_s=0.02, linger_s=2.0)
    st = start_server(pki, state, server={"aggregators": n}, **{**kw, **settings})
    aggs = []
    try:
        aggs = [AggregatorThread(aggregator(pki, state, f"agg-{i}", port=st.port)) for i in range(n)]
    except BaseException:
        st.stop()
        raise
    return st, aggs


def stop(st, aggs) -> None:
    for a in aggs:
        a.stop()
    st.stop()


def feed(pki, st, aggs, data_plane: bool) -> list[tuple[str, int]]:
    """K updates per step from devices 0..K-1, each downloaded from and uploaded to the aggregator
    its assignment names, through that aggregator's data plane (or gRPC); returns (assignment, seq)."""
    ports = {f"localhost:{a.port}": a.agg.data_bound for a in aggs}
    acked, conns = [], {}
    try:
        for step in range(STEPS):
            for d in range(step % 2, step % 2 + K):
                c = Connection(f"localhost:{st.port}", pki.token(d), ca=pki.ca)
                ci = c.check_in(10)
                while ci.action == "wait":
                    time.sleep(ci.retry_after_s)
                    ci = c.check_in(10)
                a = ci.assignment
                assert a.aggregator_data_port == ports[a.aggregator] > 0  # the assignment names its data port
                up = conns.setdefault(
                    (a.aggregator, d), Connection(a.aggregator, pki.token(d), ca=pki.ca, data_plane=data_plane)
                )
                up.data_port = a.aggregator_data_port  # as Device.uploader does
                assert torch.equal(up.download(a.version), c.download(a.version))  # the coordinator's weights
                seq, _ = up.upload(a, delta(step, d), 10, train_loss=1.0, examples_seen=10)
                acked.append((a.id, seq))
                c.close()
            deadline = time.time() + 20
            while status(st)["version"] < step + 1:
                assert time.time() < deadline, status(st)
                time.sleep(0.02)
    finally:
        for c in conns.values():
            c.close()
    return acked


def test_uploads_through_the_aggregators_data_planes_give_the_ledger_and_model_of_grpc(pki, tmp_path):
    keys = ("seq", "device", "norm", "digest", "base_version", "weight", "alpha", "aggregator")
    runs = {}
    for via in ("grpc", "data"):
        st, aggs = scaled(pki, tmp_path / via, 2)
        try:
            acked = feed(pki, st, aggs, data_plane=via == "data")
            served = [dict(a.agg.dataplane.served) for a in aggs]
            accepted = [a.agg.counters["accepted"] for a in aggs]
            # the aggregators' receive buffers are reused (network/bodies.py), and all given back
            made = [a.agg.bodies.made for a in aggs]
            assert sum(made) < sum(accepted) and [a.agg.bodies.free for a in aggs] == made
            runs[via] = (
                status(st)["weights_sha256"],
                [tuple(e[k] for k in keys) for e in ledger(tmp_path / via) if e["event"] == "accepted"],
            )
        finally:
            stop(st, aggs)
        assert len(acked) == K * STEPS and all(n > 0 for n in accepted)  # both aggregators took some
        if via == "grpc":
            assert served == [{"check_in": 0, "download": 0, "upload": 0}] * 2
        else:  # every download and upload went through the aggregators' data planes
            assert [(s["download"], s["upload"]) for s in served] == [(n, n) for n in accepted]
            assert all(s["check_in"] == 0 for s in served)
    assert runs["data"] == runs["grpc"] and len(runs["data"][1]) == K * STEPS


def test_a_check_in_or_an_unknown_token_on_an_aggregators_data_plane_is_refused(pki, tmp_path):
    st, aggs = scaled(pki, tmp_path / "s", 1)
    agg = aggs[0].agg
    ca = open(pki.ca, "rb").read()
    good = DataClient("localhost", agg.data_bound, pki.token(0), ca=ca)
    bad = DataClient("localhost", agg.data_bound, "not-a-token", ca=ca)
    sdk = Connection(f"localhost:{aggs[0].port}", "not-a-token", ca=pki.ca)
    try:
        with pytest.raises(DataRefusal) as e:  # devices check in with the coordinator
            good.check_in(pb.CheckInRequest(num_examples=10))
        assert (e.value.reply.code, e.value.reply.reason) == ("UNIMPLEMENTED", "invalid")
        assert "coordinator" in e.value.reply.message
        assert good.download(0, lambda n: memoryview(bytearray(n))) == 4 * NUMEL  # the connection still serves
        with pytest.raises(DataRefusal) as e:
            bad.download(0, lambda n: memoryview(bytearray(n)))
        assert (e.value.reply.code, e.value.reply.reason) == ("UNAUTHENTICATED", "auth")
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = c.check_in(10).assignment
        body = delta(0, 0).numpy().tobytes()
        h = pb.UploadHeader(ticket=a.ticket, base_version=a.version, dtype="float32", shape=[NUMEL], num_examples=10)
        with pytest.raises(DataRefusal) as e:  # refused at its header: no body byte travels
            bad.upload(h, body)
        assert (e.value.reply.code, e.value.reply.reason) == ("UNAUTHENTICATED", "auth")
        sdk.data_port = a.aggregator_data_port  # the SDK raises the Refused a gRPC refusal raises
        with pytest.raises(Refused) as e:
            sdk.upload(a, delta(0, 0), 10)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.reason == "auth"
        served = dict(agg.dataplane.served)
        assert agg.counters["rejected.auth"] == 3 and agg.counters["accepted"] == 0
        assert status(st)["accepted"] == 0  # nothing booked
        r = good.upload(h, body)  # the device's own token: accepted, as update #0
        # the rest the coordinator's claim answer names (its retry_after_s, 0.02 s here)
        assert (r.seq, r.version) == (0, 0) and 0 < r.rest_s <= 0.02
    finally:
        for x in (good, bad, sdk):
            x.close()
        stop(st, aggs)
    assert served == {"check_in": 1, "download": 2, "upload": 2}


def test_a_device_that_cannot_reach_the_aggregators_data_port_uses_grpc_and_trains(pki, tmp_path):
    st, aggs = scaled(pki, tmp_path / "s", 1, concurrency=2, total_steps=2)
    agg = aggs[0].agg
    try:
        port, plane = agg.data_bound, agg.dataplane
        plane.stop()  # nothing answers on the port the assignments name (a firewall, say)
        reports = run_devices(st, pki, synthetic_dataset(num_clients=2, per_client=20), 2)
        named = st.call(lambda: st.server.hub.aggregators["agg-0"].data_port)
        version = status(st)["version"]
    finally:
        stop(st, aggs)
    assert named == port > 0 and version == 2
    assert plane.served == {"check_in": 0, "download": 0, "upload": 0}
    accepted = [r["assignment"] for r in ledger(tmp_path / "s") if r["event"] == "accepted"]
    assert sorted(x["assignment"] for r in reports.values() for x in r.accepted) == sorted(accepted)
    assert agg.counters["accepted"] == len(accepted) == 2 * K  # all through the aggregator, over gRPC


def test_exactly_once_across_a_restart_of_an_aggregator_serving_its_data_plane(pki, tmp_path):
    state, steps, devices = tmp_path / "s", 8, 3
    st, aggs = scaled(pki, state, 1, concurrency=devices, total_steps=steps)
    hub = st.server.hub
    reports = {}
    data = synthetic_dataset(num_clients=devices, per_client=20)
    runner = threading.Thread(target=lambda: reports.update(run_devices(st, pki, data, devices)))
    runner.start()
    try:
        deadline = time.time() + 20
        while not (status(st)["version"] >= 2 and status(st)["buffered"] >= 1):  # it holds an update
            assert time.time() < deadline, status(st)
            time.sleep(0.005)
        old = aggs[0].agg
        old_port, before = old.data_bound, dict(old.dataplane.served)
        aggs[0].stop()
        aggs[0] = AggregatorThread(aggregator(pki, state, "agg-0", port=st.port))
        new = aggs[0].agg
        new_port = new.data_bound
        registered = st.call(lambda: (hub.aggregators["agg-0"].boot, hub.aggregators["agg-0"].data_port))
        runner.join(60)
        coordinator = dict(st.server.dataplane.served)
        deadline = time.time() + 5  # the aggregator deletes the files of committed updates (next Watch)
        while list(state.glob("aggregators/*/pending/*.bin")) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop(st, aggs)
    assert not runner.is_alive() and len(reports) == devices
    assert old.dataplane is None and old.data_bound == 0  # stopped with its aggregator
    assert before["upload"] >= 2  # the devices uploaded through the data plane before the restart
    # the coordinator's own data plane took the devices' check-ins after their first, not the bytes
    assert coordinator["check_in"] >= devices and (coordinator["download"], coordinator["upload"]) == (0, 0)
    # the restarted aggregator registered again, with its data port (the last run's, free again)
    assert registered == (new.boot, new_port) and new.boot != old.boot and new_port == old_port > 0
    rs = ledger(state)
    accepted = {r["seq"]: r for r in rs if r["event"] == "accepted"}
    applied = [s for r in rs if r["event"] == "step" for s in r["seqs"]]
    assert sorted(accepted) == list(range(steps * K))  # dense seqs, K per step
    assert len({r["assignment"] for r in accepted.values()}) == len(accepted)  # no assignment twice
    assert sorted(applied) == sorted(accepted)  # every accepted update in exactly one step
    assert [r["version"] for r in rs if r["event"] == "step"] == list(range(1, steps + 1))
    told = sorted(x["assignment"] for r in reports.values() for x in r.accepted)
    assert told == sorted(r["assignment"] for r in accepted.values())  # every ack booked, every booking acked
    assert not list(state.glob("aggregators/*/pending/*.bin"))  # nothing left behind


class Aborted(Exception):
    pass


class Context:
    """What the control service's handlers read of a gRPC call: the aggregator key, the peer, abort."""

    def __init__(self, key: bytes):
        self.md = ((KEY_HEADER, key.decode()),)

    def invocation_metadata(self):
        return self.md

    def peer(self) -> str:
        return "test"

    async def abort(self, code, details, *_):
        raise Aborted(code, details)


def test_a_registration_without_a_data_port_is_served_over_grpc_and_a_bad_port_is_refused(pki, tmp_path):
    st = start_server(pki, tmp_path / "s", mode="async", concurrency=2, buffer_size=2, server={"aggregators": 1})
    hub = st.server.hub
    ctx = Context(hub.key)
    try:
        with pytest.raises(Aborted) as e:
            st.call(
                hub.register, json.dumps({"name": "agg-0", "address": "localhost:1", "data_port": 70000}).encode(), ctx
            )
        assert e.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "data_port 70000" in e.value.args[1]
        assert not hub.aggregators  # nothing registered
        # an aggregator from before data planes: no data_port in its payload
        st.call(hub.register, json.dumps({"name": "agg-0", "address": "localhost:1", "boot": "b"}).encode(), ctx)
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            ci = c.check_in(10)
            spec = json.loads(st.call(lambda: hub.client_json(st.server.client_json, ci.device_id)))
    finally:
        st.stop()
    assert ci.action == "train" and ci.assignment.aggregator == "localhost:1"
    assert ci.assignment.aggregator_data_port == 0 and "aggregator_data_port" not in spec  # gRPC only


def test_an_sdk_older_than_aggregator_data_ports_is_not_sent_the_key(pki, tmp_path, caplog):
    """An SDK before wire.SDK_VERSION 2 built ClientSpec from every assignment key, so the key is
    withheld from it (it uploads over gRPC, as it always did); and this SDK ignores, with a
    warning, keys a newer server may add."""
    from flotilla.network.client import _client_spec

    st, aggs = scaled(pki, tmp_path / "s", 1)
    address, data_port = f"localhost:{aggs[0].port}", aggs[0].agg.data_bound
    try:
        specs = {}
        for i, version in enumerate(("1", "", "2")):
            with Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca) as c:
                r = c._check_in(pb.CheckInRequest(num_examples=10, sdk_version=version), metadata=c.metadata)
                assert r.action == pb.CheckInReply.TRAIN
                specs[version] = json.loads(r.assignment.client_json)
    finally:
        stop(st, aggs)
    assert "aggregator_data_port" not in specs["1"] and "aggregator_data_port" not in specs[""]
    assert specs["2"]["aggregator_data_port"] == data_port > 0
    assert all(s["aggregator"] == address for s in specs.values())
    spec = {k: v for k, v in specs["2"].items() if k not in ("aggregator", "aggregator_data_port")}
    with caplog.at_level("WARNING", logger="flotilla.client"):
        got = _client_spec({**spec, "some_future_setting": 3})
    assert got == _client_spec(spec) and "some_future_setting" in caplog.text
