"""Synchronous secure aggregation in flotilla serve: the 4-round masking protocol between real gRPC
connections via the server (flotilla.network.secagg)."""

from __future__ import annotations

import json
import math
import threading

import grpc
import pytest
import torch

from flotilla.client import Connection, Refused
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.secagg import SecAggParams
from flotilla.network.server import FlotillaServer, ServerThread
from tests.network_helpers import PKI, start_server

NUMEL = 18  # nn.Linear(5, 3)
N = 5
EXAMPLES = [10, 30, 20, 40, 25]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=N)


def start(pki, state_dir, masking=None, linger_s=0.0, privacy=None, **settings) -> ServerThread:
    kw = dict(mode="sync", cohort=N, over_selection=1.0, total_steps=3, retry_after_s=0.05, secagg_stage_s=1.0)
    kw.update(settings)
    return start_server(pki, state_dir, linger_s=linger_s, server={"secure_masking": masking, "privacy": privacy}, **kw)


def deltas():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(NUMEL, generator=g) * 0.1 for _ in range(N)]


def checked_in(pki, st):
    conns = [Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca) for i in range(N)]
    out = []
    for c in conns:
        ci = c.check_in(10)
        assert ci.action == "train", ci
        out.append(ci.assignment)
    return conns, out


def run_devices(conns, assignments, d, stop_after=None):
    """Every device runs its part in a thread; returns each one's result (version, -1 if it dropped, or the error)."""
    stop_after = stop_after or {}
    results: list = [None] * N

    def go(i):
        try:
            results[i] = conns[i].secagg_round(assignments[i], d[i], EXAMPLES[i], stop_after=stop_after.get(i))
        except Refused as e:
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


def expected(w0, d, include):
    n = torch.tensor([float(EXAMPLES[i]) for i in include])
    return w0 + sum(n[k] * d[i] for k, i in enumerate(include)) / n.sum()


MASK = SecAggParams(clip=1.0, max_weight=100.0, degree=None)


def test_sync_secagg_matches_the_plaintext_round_and_the_server_never_holds_a_delta(pki, tmp_path):
    d = deltas()
    with start(pki, tmp_path / "plain") as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        for i in range(N):
            conns[i].upload(a[i], d[i], EXAMPLES[i])
        plain = st.server.coord.weights.clone()
        assert st.server.coord.version == 1
    with start(pki, tmp_path / "masked", masking=MASK) as st:
        assert torch.equal(st.server.coord.weights, w0)
        conns, a = checked_in(pki, st)
        assert all(x.secagg for x in a)
        with pytest.raises(Refused) as e:  # a plaintext upload is refused before its bytes are read
            conns[0].upload_raw(a[0].ticket, a[0].version, "float32", [NUMEL], d[0].numpy(), EXAMPLES[0])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "masked inputs" in str(e.value)
        assert run_devices(conns, a, d) == [1] * N
        masked = st.server.coord.weights.clone()
        s = st.call(st.server.coord.status)
        assert (s["version"], s["accepted"]) == (1, N)
        assert st.server.coord.secagg is None  # the round's protocol state is gone
    # fixed-point error: clip / q per summand (q = (2^31 - 1) // N), far below float32 noise here
    assert torch.allclose(masked, plain, rtol=0, atol=1e-6)
    assert torch.allclose(masked, expected(w0, d, range(N)), rtol=0, atol=1e-6)
    ledger = [json.loads(x) for x in (tmp_path / "masked" / "ledger.jsonl").read_text().splitlines()]
    accepted = [r for r in ledger if r["event"] == "accepted"]
    assert len(accepted) == N and all(r["norm"] is None for r in accepted)  # no norm: the server never saw a delta
    assert not any((tmp_path / "masked").rglob("*.bin")) and not any(
        p.is_file()
        and p.stat().st_size >= 4 * NUMEL
        and p.suffix not in (".safetensors", ".jsonl", ".yaml", ".json", ".key")
        for p in (tmp_path / "masked").rglob("*")
    )


def test_requests_larger_than_a_message_travel_in_parts_with_the_same_result(pki, tmp_path, monkeypatch):
    from flotilla.network import secagg

    seen = []
    real_add = secagg.RequestParts.add

    def add(self, device, ticket_id, req):
        seen.append((device, req["index"], req["count"]))
        return real_add(self, device, ticket_id, req)

    monkeypatch.setattr(secagg.RequestParts, "add", add)
    d = deltas()
    small = SecAggParams(clip=1.0, max_weight=100.0, degree=None, max_request_bytes=450)
    with start(pki, tmp_path / "parts", masking=small) as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        assert run_devices(conns, a, d) == [1] * N
        assert torch.allclose(st.server.coord.weights, expected(w0, d, range(N)), rtol=0, atol=1e-6)
    # every device sent at least one request (its shares, its masked input) in two or more parts
    assert len({dev for dev, _, count in seen if count >= 2}) == N


def test_a_model_whose_masked_input_exceeds_the_default_message_limit_aggregates_exactly(pki, tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)  # 1,001,000 parameters: ~5.3 MB of masked input as JSON > 4 MiB
    numel = sum(p.numel() for p in model.parameters())
    server = FlotillaServer(
        model,
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=tmp_path / "big",
        settings=CoordinatorSettings(
            mode="sync",
            cohort=3,
            over_selection=1.0,
            total_steps=1,
            selection_window_s=0.0,
            retry_after_s=0.05,
            secagg_stage_s=30.0,
        ),
        fsync=False,
        secure_masking=SecAggParams(clip=1.0, max_weight=100.0, degree=None),
    )
    assert server.coord.masked.max_request_bytes < 5 * numel
    with ServerThread(server) as st:
        w0 = st.server.coord.weights.clone()
        conns = [Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca) for i in range(3)]
        a = [c.check_in(10).assignment for c in conns]
        g = torch.Generator().manual_seed(1)
        d = [torch.randn(numel, generator=g) * 1e-4 for _ in range(3)]
        results = [None] * 3
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, conns[i].secagg_round(a[i], d[i], EXAMPLES[i])))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [1, 1, 1]
        n = torch.tensor(EXAMPLES[:3], dtype=torch.float32)
        want = w0 + sum(n[i] * d[i] for i in range(3)) / n.sum()
        assert torch.allclose(st.server.coord.weights, want, rtol=0, atol=1e-7)


def test_request_parts_are_checked_and_a_bad_part_ends_only_that_devices_request():
    from flotilla.network.secagg import RequestParts, split_request

    req = {
        "op": "masked",
        "ticket": "t" * 40,
        "msg": {"y": {"dtype": "uint32", "b64": "QUJD" * 200}, "q": 'a"b\\c' * 30},
    }
    parts = split_request(req, 300)
    assert len(parts) > 3 and all(len(json.dumps(p)) <= 300 for p in parts)
    assert split_request(req, 10**6) == [req]
    asm = RequestParts(max_chars=10_000)
    with pytest.raises(ValueError, match="part 0 first"):
        asm.add("dev", "tid", parts[1])
    for bad in (parts[2], dict(parts[1], count=99), {**parts[1], "data": 5}, {**parts[1], "index": True}):
        assert asm.add("dev", "tid", parts[0]) is None and "dev" in asm.pending
        assert asm.add("other", "tid2", parts[0]) is None
        with pytest.raises(ValueError):
            asm.add("dev", "tid", bad)
        assert "dev" not in asm.pending and "other" in asm.pending  # the device starts over; others are untouched
    asm.add("dev", "tid", parts[0])
    with pytest.raises(ValueError, match="same assignment"):
        asm.add("dev", "another", parts[1])
    assert asm.add("dev", "tid", parts[0]) is None
    out = None
    for p in parts[1:]:
        assert out is None
        out = asm.add("dev", "tid", p)
    assert json.loads(out) == req and "dev" not in asm.pending
    with pytest.raises(ValueError, match="larger than"):
        tiny = RequestParts(max_chars=100)
        tiny.add("dev", "tid", parts[0])


def test_a_stray_part_over_the_network_is_refused(pki, tmp_path):
    with start(pki, tmp_path / "s", masking=MASK) as st:
        conns, a = checked_in(pki, st)
        c = conns[0]
        assert c.secagg_call({"op": "join", "ticket": a[0].ticket, "num_examples": 10})["status"] == "ok"
        with pytest.raises(Refused) as e:
            c.secagg_call({"op": "part", "ticket": a[0].ticket, "index": 1, "count": 3, "data": "{}"})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "part 0 first" in str(e.value)
        assert (
            c.secagg_call({"op": "part", "ticket": a[0].ticket, "index": 0, "count": 2, "data": '{"op": "get", '})[
                "status"
            ]
            == "ok"
        )
        with pytest.raises(Refused) as e:  # reassembled, it is not a protocol message
            c.secagg_call(
                {
                    "op": "part",
                    "ticket": a[0].ticket,
                    "index": 1,
                    "count": 2,
                    "data": f'"ticket": "{a[0].ticket}", "want": "directory"}}',
                }
            )
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "reassembled" in str(e.value)
        assert st.server.coord.secagg.server.u1 == frozenset()


def test_dropouts_after_the_masked_input_are_recovered_and_before_it_are_left_out(pki, tmp_path):
    d = deltas()
    with start(pki, tmp_path / "s", masking=MASK) as st:
        w0 = st.server.coord.weights.clone()
        conns, a = checked_in(pki, st)
        # device 0 vanishes after its masked input (its update counts); device 1 after sharing keys
        # (its update is lost, its pairwise masks are removed through the survivors' shares)
        res = run_devices(conns, a, d, stop_after={0: "masked", 1: "shares"})
        assert res[0] == -1 and res[1] == -1 and res[2:] == [1, 1, 1]
        got = st.server.coord.weights.clone()
        s = st.call(st.server.coord.status)
        assert (s["version"], s["accepted"]) == (1, 4)
        assert st.server.coord.counters["secagg_dropped"] == 1
    assert torch.allclose(got, expected(w0, d, [0, 2, 3, 4]), rtol=0, atol=1e-6)


def test_below_threshold_the_round_aborts_with_the_model_unchanged_then_runs_again(pki, tmp_path):
    d = deltas()
    with start(pki, tmp_path / "s", masking=MASK) as st:  # threshold 3 of 5
        w0 = st.server.coord.weights.clone()
        before = st.call(st.server.coord.status)
        conns, a = checked_in(pki, st)
        res = run_devices(conns, a, d, stop_after={0: "masked", 1: "masked", 2: "masked"})
        assert res[:3] == [-1, -1, -1]
        assert all(isinstance(r, Refused) and r.code == grpc.StatusCode.ABORTED for r in res[3:]), res
        after = st.call(st.server.coord.status)
        assert after["weights_sha256"] == before["weights_sha256"] and after["version"] == 0 and after["accepted"] == 0
        assert torch.equal(st.server.coord.weights, w0)
        assert st.server.coord.counters["secagg_aborted"] == 1
        # the round starts over: a new selection, fresh tickets; the old ones stay refused
        conns2, a2 = checked_in(pki, st)
        assert {x.id for x in a2}.isdisjoint({x.id for x in a})
        assert conns2[3].secagg_call({"op": "join", "ticket": a[3].ticket, "num_examples": 10})["status"] == "abort"
        assert run_devices(conns2, a2, d) == [1] * N
        assert torch.allclose(st.server.coord.weights, expected(w0, d, range(N)), rtol=0, atol=1e-6)


def test_malformed_and_impersonating_protocol_messages_are_refused(pki, tmp_path):
    with start(pki, tmp_path / "s", masking=MASK) as st:
        conns, a = checked_in(pki, st)
        c = conns[0]
        r = c.secagg_call({"op": "join", "ticket": a[0].ticket, "num_examples": 10})
        assert r["status"] == "ok" and r["id"] == 1
        with pytest.raises(Refused) as e:  # someone else's ticket
            conns[1].secagg_call({"op": "join", "ticket": a[0].ticket, "num_examples": 10})
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        for bad in ({"session": "x"}, "pickle", {"session": "AAAA", "sender": 1, "c_pk": "!!", "s_pk": "AA=="}):
            with pytest.raises(Refused) as e:
                c.secagg_call({"op": "advertise", "ticket": a[0].ticket, "msg": bad})
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        import base64

        from flotilla.secure.protocol import SecAggClient, SecAggConfig

        cf = r["config"]
        cfg = SecAggConfig(
            length=cf["length"],
            cohort=cf["cohort"],
            bits=cf["bits"],
            degree=cf["degree"],
            threshold=cf["threshold"],
            session=base64.b64decode(cf["session"]),
        )
        from flotilla.secure.serialize import dumps

        with pytest.raises(Refused) as e:  # device 0 claims to be protocol client 2
            c.secagg_call({"op": "advertise", "ticket": a[0].ticket, "msg": dumps(SecAggClient(2, cfg).advertise())})
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert st.server.coord.secagg.server.u1 == frozenset()
        assert (
            c.secagg_call({"op": "advertise", "ticket": a[0].ticket, "msg": dumps(SecAggClient(1, cfg).advertise())})[
                "status"
            ]
            == "ok"
        )
        assert st.server.coord.secagg.server.u1 == frozenset({1})


def test_serve_config_builds_sync_masking_and_refuses_what_it_cannot_honour(tmp_path):
    import yaml

    from flotilla.config import ConfigError, load_config
    from flotilla.experiment.serve import server_from_config

    keys = PKI(tmp_path / "pki", devices=4)
    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 4, "examples_per_client": 5},
        "rounds": 3,
        "cohort": 3,
        "secure_aggregation": {"degree": "full", "clip": 0.5},
        "network": {
            "tls": {"cert": str(keys.paths["server_pem"]), "key": str(keys.paths["server_key"])},
            "tokens": str(keys.paths["tokens_json"]),
            "secagg_stage_s": 7.0,
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="needs a public bound on a device's weight"):
        load_config(path)
    server = server_from_config(load_config(path, ["network.max_examples=50"]), state_dir=tmp_path / "a")
    c = server.coord
    assert not c.sealed and c.masked == SecAggParams(clip=0.5, max_weight=50.0, bits=32, degree=None, threshold=None)
    assert c.settings.secagg_stage_s == 7.0
    server.store.close()
    server = server_from_config(load_config(path, ["weighting=uniform"]), state_dir=tmp_path / "b")
    assert server.coord.masked.max_weight == 1.0
    server.store.close()
    with pytest.raises(ConfigError, match="secure_aggregation.dropout"):
        load_config(path, ["weighting=uniform", "secure_aggregation.dropout={mask: 0.1}"])
    # user-level DP: weights 1, the fixed-point range defaults to clip_norm, the server noises the unmasked sum
    dp = "privacy={user_level: {clip_norm: 0.25, noise_multiplier: 1.0, delta: 0.001}}"
    server = server_from_config(load_config(path, [dp, "secure_aggregation.clip=null"]), state_dir=tmp_path / "c")
    c = server.coord
    assert c.settings.weighting == "uniform" and c.masked.max_weight == 1.0 and c.masked.clip == 0.25
    assert c.masked_release is not None and c.masked_release[1] == 3.0  # the expected cohort
    server.store.close()
    with pytest.raises(ConfigError, match="adaptive_clipping"):
        load_config(path, [dp, "privacy.user_level.adaptive_clipping={target_quantile: 0.5}"])


def test_user_level_dp_with_masking_clips_on_devices_and_noises_the_unmasked_sum(pki, tmp_path):
    from flotilla.privacy import UserLevelSpec, epsilon

    S, d = 0.05, deltas()
    d[2] = torch.full((NUMEL,), 10.0)  # far above S: the device clips it before masking
    clipped = [x * min(1.0, S / float(x.norm())) for x in d]
    uniform = SecAggParams(clip=S, max_weight=1.0, degree=None)

    def one_round(z, name):
        user = UserLevelSpec(clip_norm=S, noise_multiplier=z, delta=1e-3, amplification=False)
        with start(pki, tmp_path / name, masking=uniform, privacy=user, weighting="uniform") as st:
            w0 = st.server.coord.weights.clone()
            conns, a = checked_in(pki, st)
            assert run_devices(conns, a, d) == [1] * N
            return w0, st.server.coord.weights.clone(), st.call(st.server.coord.status)

    w0, w1, s = one_round(0.0, "z0")
    # DP-FedAvg's release: the sum of clipped deltas over the expected cohort (N), example counts ignored
    assert torch.allclose(w1, w0 + sum(clipped) / N, rtol=0, atol=1e-6)
    assert s["privacy"]["epsilon"] is None  # z = 0: no guarantee, reported as such
    w0, w1z, s = one_round(1.0, "z1")
    assert math.isclose(s["privacy"]["epsilon"], epsilon(1.0, 1.0, 1, 1e-3), rel_tol=1e-9)
    noise = (w1z - w0 - sum(clipped) / N) * N  # the draw N(0, (z S)^2 I) the server added
    assert 0.3 * S < float(noise.std()) < 1.8 * S  # 18 draws: far outside either bound is ~1e-6 likely


def test_sdk_devices_train_rounds_through_the_masking_protocol(pki, tmp_path):
    """flotilla.client.Device runs unchanged: the check-in says secagg, upload runs the protocol."""
    from torch import nn

    from flotilla.client import Device
    from tests.helpers import synthetic_dataset

    data = synthetic_dataset(num_clients=N, per_client=20)
    with start(
        pki, tmp_path / "s", masking=SecAggParams(max_weight=100.0), total_steps=2, secagg_stage_s=10.0, linger_s=1.0
    ) as st:  # linger: the last round's devices still poll for its result
        reports: list = [None] * N

        def device(i):
            torch.manual_seed(i)
            reports[i] = Device(f"localhost:{st.port}", pki.token(i), nn.Linear(5, 3), data, client=i, ca=pki.ca).run()

        threads = [threading.Thread(target=device, args=(i,)) for i in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        s = st.call(st.server.coord.status)
    assert (s["version"], s["accepted"], s["rejected"]) == (2, 2 * N, 0)
    assert [len(r.accepted) for r in reports] == [2] * N and not any(r.refused for r in reports)
