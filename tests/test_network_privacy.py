"""User-level DP and the async secure buffer in network mode (in-process server over loopback TLS)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import grpc
import pytest
import torch

from flotilla.client import Refused
from flotilla.core.client import ClientSpec
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, ServerThread
from flotilla.privacy import UserLevelSpec, epsilon
from tests.network_helpers import PKI, connect, status, tiny_model
from tests.network_helpers import start_server as start_with

NUMEL = 18  # nn.Linear(5, 3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def start_server(pki, state_dir, *, privacy=None, secure_buffer=False, linger_s=0.0, **settings) -> ServerThread:
    """tests.network_helpers.start_server with the server's privacy argument."""
    return start_with(
        pki, state_dir, linger_s=linger_s, server={"privacy": privacy, "secure_buffer": secure_buffer}, **settings
    )


def assignment(conn):
    ci = conn.check_in(10)
    assert ci.action == "train", ci
    return ci.assignment


def dp(**kw) -> UserLevelSpec:
    kw.setdefault("delta", 1e-3)
    kw.setdefault("amplification", False)
    return UserLevelSpec(**kw)


def test_sync_dp_clips_each_device_to_S_over_the_expected_cohort(pki, tmp_path):
    S = 0.5
    with start_server(
        pki,
        tmp_path / "s",
        cohort=2,
        over_selection=1.0,
        weighting="uniform",
        total_steps=3,
        privacy=dp(clip_norm=S, noise_multiplier=0.0),
    ) as st:
        w0 = st.server.coord.weights.clone()
        conns = [connect(pki, st, i) for i in range(2)]
        asg = [assignment(c) for c in conns]
        huge = torch.full((NUMEL,), 1e4)
        conns[0].upload(asg[0], huge, 10)
        assert conns[1].upload(asg[1], torch.zeros(NUMEL), 10000) == (1, 1)  # example counts do not weigh
        moved = st.server.coord.weights - w0
        assert math.isclose(float(moved.norm()), S / 2, rel_tol=1e-5)  # ||clip(d)|| / expected cohort
        assert torch.allclose(moved, huge / huge.norm() * S / 2, atol=1e-7)
        assert status(st)["privacy"]["epsilon"] is None  # z = 0: no guarantee, reported as such
        for c in conns:
            c.close()


def test_sync_dp_reports_epsilon_growing_with_steps_and_stops_at_the_budget(pki, tmp_path):
    z, d = 1.0, 1e-3
    e1, e2, e3 = (epsilon(z, 1.0, t, d) for t in (1, 2, 3))  # q = 1: no amplification (the network default)
    budget = (e2 + e3) / 2  # affords exactly two rounds
    with start_server(
        pki,
        tmp_path / "s",
        cohort=2,
        over_selection=1.0,
        weighting="uniform",
        total_steps=10,
        privacy=dp(clip_norm=1.0, noise_multiplier=z, max_epsilon=budget, delta=d),
    ) as st:
        s0 = status(st)
        assert s0["privacy"]["epsilon"] == 0.0 and s0["step_limit"] == 2 and s0["privacy"]["sample_rate"] == 1.0
        conns = [connect(pki, st, i) for i in range(3)]
        seen = []
        for _ in range(2):
            asg = [assignment(c) for c in conns[:2]]
            for c, a in zip(conns, asg):
                c.upload(a, torch.full((NUMEL,), 0.01), 10)
            seen.append(status(st)["privacy"]["epsilon"])
        assert seen == pytest.approx([e1, e2]) and e1 < e2 <= budget
        end = status(st)
        assert end["done"] and end["version"] == 2 and end["privacy"]["budget_spent"]
        ci = conns[2].check_in(10)
        assert ci.action == "done" and "privacy budget spent" in ci.message
        for c in conns:
            c.close()
    records = [json.loads(x) for x in st.server.store.run_dir.metrics_file.read_text().splitlines()]
    assert [r["epsilon"] for r in records] == pytest.approx([e1, e2])


def test_budget_refuses_uploads_after_it_is_spent(pki, tmp_path):
    z, d = 1.0, 1e-3
    budget = (epsilon(z, 1.0, 1, d) + epsilon(z, 1.0, 2, d)) / 2  # one round only
    with start_server(
        pki,
        tmp_path / "s",
        cohort=1,
        over_selection=1.0,
        weighting="uniform",
        total_steps=10,
        privacy=dp(clip_norm=1.0, noise_multiplier=z, max_epsilon=budget, delta=d),
    ) as st:
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        a0 = assignment(c0)
        c0.upload(a0, torch.full((NUMEL,), 0.01), 10)
        before = status(st)
        assert before["done"] and before["version"] == 1
        assert c0.upload(a0, torch.full((NUMEL,), 0.01), 10) == (0, 1)  # a retry: the same answer, counted once
        with pytest.raises(Refused) as e:
            c0.upload(a0, torch.full((NUMEL,), 0.02), 10)
        assert e.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
        assert c1.check_in(10).action == "done"
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"] and after["accepted"] == 1
        c0.close()
        c1.close()


def test_async_dpfedbuff_clips_to_S_over_K_and_keeps_one_update_per_device(pki, tmp_path):
    S = 0.5
    with start_server(
        pki,
        tmp_path / "s",
        mode="async",
        concurrency=4,
        buffer_size=2,
        weighting="uniform",
        total_steps=3,
        retry_after_s=0.01,
        privacy=dp(clip_norm=S, noise_multiplier=0.0),
    ) as st:
        w0 = st.server.coord.weights.clone()
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        first, second = assignment(c0), assignment(c0)  # asking again revokes the first ticket
        with pytest.raises(Refused) as e:
            c0.upload(first, torch.full((NUMEL,), 1.0), 10)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "live assignment" in str(e.value)
        c0.upload(second, torch.full((NUMEL,), 1e4), 10)
        before = status(st)
        assert c0.check_in(10).action == "wait"  # one update per device per release
        after = status(st)
        assert after["rejected_by_reason"] == {"revoked": 1} and after["buffered"] == before["buffered"] == 1
        assert c1.upload(assignment(c1), torch.zeros(NUMEL), 10) == (1, 1)
        moved = st.server.coord.weights - w0
        assert math.isclose(float(moved.norm()), S / 2, rel_tol=1e-5)  # clip(d) / K (staleness 0: s = 1)
        assert status(st)["privacy"]["sample_rate"] == 1.0
        c0.close()
        c1.close()


def test_serve_config_privacy_defaults_to_no_amplification_and_refuses_what_it_cannot_honour(tmp_path):
    import yaml

    from flotilla.config import ConfigError, load_config
    from flotilla.experiment.serve import server_from_config

    keys = PKI(tmp_path / "pki", devices=4)
    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 4, "examples_per_client": 5},
        "rounds": 3,
        "cohort": 2,
        "privacy": {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}},
        "network": {
            "tls": {"cert": str(keys.paths["server_pem"]), "key": str(keys.paths["server_key"])},
            "tokens": str(keys.paths["tokens_json"]),
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    server = server_from_config(load_config(path), state_dir=tmp_path / "a")
    assert server.coord.privacy.plan.sample_rate == 1.0 and server.coord.settings.weighting == "uniform"
    server.store.close()
    server = server_from_config(load_config(path, ["privacy.user_level.amplification=true"]), state_dir=tmp_path / "b")
    assert server.coord.privacy.plan.sample_rate == 0.5  # cohort / enrolled devices, as asked
    server.store.close()
    # sample-level DP: the devices run DP-SGD; every assignment carries its settings
    server = server_from_config(
        load_config(path, ["privacy.sample_level={noise_multiplier: 0.8, max_grad_norm: 0.5}"]),
        state_dir=tmp_path / "c",
    )
    assert json.loads(server.client_json)["dp_sgd"] == {
        "noise_multiplier": 0.8,
        "max_grad_norm": 0.5,
        "delta": 1e-5,
        "accountant": "rdp",
        "secure_mode": False,
        "grad_sample_mode": "auto",  # the device picks the same mode for the model as the server would
    }
    server.store.close()
    with pytest.raises(ConfigError, match="sampling: poisson needs the server to draw"):
        server_from_config(load_config(path, ["privacy.user_level.sampling=poisson"]), state_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="delta"):
        server_from_config(load_config(path, ["privacy.user_level.delta=0.3"]), state_dir=tmp_path / "e")
    cfg.pop("privacy")
    cfg["secure_aggregation"] = {}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match="needs a public bound on a device's weight"
    ):  # sync masking: see test_network_secagg
        load_config(path)
    server = server_from_config(load_config(path, ["mode=async", "async={buffer_size: 2}"]), state_dir=tmp_path / "f")
    assert server.coord.sealed and server.coord.aggregator.buffer_size == 2
    server.store.close()
    both = load_config(
        path,
        [
            "mode=async",
            "async={buffer_size: 2}",
            "privacy={user_level: {clip_norm: 1.0, noise_multiplier: 1.0, delta: 0.001}}",
        ],
    )
    server = server_from_config(both, state_dir=tmp_path / "g")
    assert server.coord.sealed and server.coord.privacy.plan.sample_rate == 1.0
    server.store.close()


def _two_buffers(pki, st) -> torch.Tensor:
    """The same four updates, two buffers of K = 2 (one update with staleness 1); the final weights."""
    c = [connect(pki, st, i) for i in range(4)]
    a = [assignment(c[i]) for i in range(3)]  # all from version 0
    g = torch.Generator().manual_seed(5)
    d = [torch.randn(NUMEL, generator=g) * 0.1 for _ in range(4)]
    c[0].upload(a[0], d[0], 10)
    assert c[1].upload(a[1], d[1], 30) == (1, 1)  # first release
    a3 = assignment(c[3])  # from version 1
    c[2].upload(a[2], d[2], 20)  # staleness 1
    assert c[3].upload(a3, d[3], 40) == (3, 2)  # second release
    for x in c:
        x.close()
    return st.server.coord.weights.clone()


def test_async_secure_buffer_matches_plaintext_fedbuff(pki, tmp_path):
    from flotilla.core.staleness import Staleness

    kw = dict(
        mode="async",
        concurrency=4,
        buffer_size=2,
        total_steps=5,
        retry_after_s=0.01,
        staleness=Staleness("polynomial", 0.5),
    )
    with start_server(pki, tmp_path / "plain", **kw) as st:
        plain = _two_buffers(pki, st)
    with start_server(pki, tmp_path / "sealed", secure_buffer=True, **kw) as st:
        sealed = _two_buffers(pki, st)
        s = status(st)
        assert (s["version"], s["accepted"], s["rejected"]) == (2, 4, 0)
    ledger = [json.loads(x) for x in (tmp_path / "sealed" / "ledger.jsonl").read_text().splitlines()]
    assert [r["norm"] for r in ledger if r["event"] == "accepted"] == [None] * 4  # the server never saw a delta
    assert torch.allclose(sealed, plain, rtol=0, atol=1e-6)


def test_async_secure_buffer_refuses_tampered_and_plaintext_uploads(pki, tmp_path):
    from flotilla.secure.buffer import Assignment as BufferAssignment
    from flotilla.secure.buffer import seal_update

    with start_server(
        pki, tmp_path / "s", mode="async", concurrency=4, buffer_size=2, total_steps=5, secure_buffer=True
    ) as st:
        c0 = connect(pki, st, 0)
        a = assignment(c0)
        assert len(a.buffer_key) == 32 and len(a.buffer_nonce) == 16 and a.id == a.buffer_nonce.hex()
        before = status(st)
        sealed = seal_update(
            torch.full((NUMEL,), 0.1), 10.0, BufferAssignment(a.device, a.version, a.buffer_nonce, a.buffer_key)
        )
        bad = bytearray(sealed.ciphertext)
        bad[40] ^= 1
        with pytest.raises(Refused) as e:
            c0.upload_raw(a.ticket, a.version, "sealed", [NUMEL], bytes(bad), 10, ephemeral_pk=sealed.ephemeral_pk)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "tampered" in str(e.value).lower()
        with pytest.raises(Refused) as e:  # plaintext to a sealed server
            c0.upload_raw(a.ticket, a.version, "float32", [NUMEL], torch.zeros(NUMEL).numpy(), 10)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "seal the update" in str(e.value)
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"]
        assert (after["buffered"], after["accepted"]) == (0, 0)
        assert after["rejected_by_reason"] == {"tampered": 1, "dtype": 1}
        assert st.server.coord.aggregator.count == 0
        # The buffer is unchanged, so the genuine ciphertext for the same assignment still counts once.
        assert c0.upload_raw(
            a.ticket, a.version, "sealed", [NUMEL], sealed.ciphertext, 10, ephemeral_pk=sealed.ephemeral_pk
        ) == (0, 0)
        # a retry of the same upload gets the same answer and is not added again
        assert c0.upload_raw(
            a.ticket, a.version, "sealed", [NUMEL], sealed.ciphertext, 10, ephemeral_pk=sealed.ephemeral_pk
        ) == (0, 0)
        assert st.server.coord.aggregator.count == 1
        c0.close()


@pytest.mark.parametrize("mode", ["dp-sync", "sealed-async"])
def test_sdk_devices_train_with_dp_or_the_secure_buffer(pki, tmp_path, mode):
    """SDK devices (flotilla.client.Device) in threads run to the end unchanged: the assignment
    tells them to seal, and DP is all on the server."""
    import threading

    from torch import nn

    from flotilla.client import Device
    from tests.helpers import synthetic_dataset

    data = synthetic_dataset(num_clients=4, per_client=20)
    kw = (
        dict(cohort=2, weighting="uniform", privacy=dp(clip_norm=1.0, noise_multiplier=0.5))
        if mode == "dp-sync"
        else dict(mode="async", concurrency=3, buffer_size=2, retry_after_s=0.05, secure_buffer=True)
    )
    with start_server(pki, tmp_path / "s", total_steps=3, linger_s=1.0, **kw) as st:

        def device(i):
            torch.manual_seed(i)
            Device(f"localhost:{st.port}", pki.token(i), nn.Linear(5, 3), data, client=i, ca=pki.ca).run()

        threads = [threading.Thread(target=device, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        s = status(st)
    # over-selection: late ones only (a late device may also find its round's model gone: version_gone)
    assert s["version"] == 3 and set(s["rejected_by_reason"]) <= {"late", "version_gone"}
    if mode == "dp-sync":
        assert 0 < s["privacy"]["epsilon"] < math.inf


def test_secure_buffer_restart_drops_the_enclaves_unreleased_updates_and_goes_on(pki, tmp_path):
    """The buffer's key lives only in memory: after a restart, ciphertexts buffered before it are
    lost (counted), old assignments are refused, and training continues with the new key."""
    kw = dict(mode="async", concurrency=4, buffer_size=2, total_steps=5, secure_buffer=True)
    with start_server(pki, tmp_path / "s", **kw) as st:
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        c0.upload(assignment(c0), torch.full((NUMEL,), 0.1), 10)
        old = assignment(c1)
        key = old.buffer_key
    with start_server(pki, tmp_path / "s", **kw) as st:
        s = status(st)
        assert (s["version"], s["buffered"], s["lost_on_restart"]) == (0, 0, 1)
        c1 = connect(pki, st, 1)
        with pytest.raises(Refused) as e:
            c1.upload(old, torch.full((NUMEL,), 0.1), 10)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "check in again" in str(e.value)
        c0 = connect(pki, st, 0)
        a0, a1 = assignment(c0), assignment(c1)
        assert a0.buffer_key == a1.buffer_key != key
        c0.upload(a0, torch.full((NUMEL,), 0.1), 10)
        assert c1.upload(a1, torch.full((NUMEL,), 0.1), 10) == (2, 1)
        c0.close()
        c1.close()


def test_async_secure_buffer_with_dp_devices_clip_and_the_buffer_noises(pki, tmp_path):
    S = 0.5
    with start_server(
        pki,
        tmp_path / "s",
        mode="async",
        concurrency=4,
        buffer_size=2,
        total_steps=5,
        weighting="uniform",
        retry_after_s=0.01,
        secure_buffer=True,
        privacy=dp(clip_norm=S, noise_multiplier=0.0),
    ) as st:
        w0 = st.server.coord.weights.clone()
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        given_up, a0 = assignment(c0), assignment(c0)  # asking again gives the first one up
        assert a0.clip_norm == S and a0.seal_weight == 1.0
        c0.upload(a0, torch.full((NUMEL,), 1e4), 10)  # the SDK clips before sealing
        with pytest.raises(Refused) as e:
            c0.upload(given_up, torch.full((NUMEL,), 1.0), 10)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS  # one update per device per release
        assert c0.check_in(10).action == "wait"  # ... so no new work until the release
        assert c1.upload(assignment(c1), torch.zeros(NUMEL), 10) == (1, 1)
        moved = st.server.coord.weights - w0
        assert float(moved.norm()) <= S / 2 and math.isclose(float(moved.norm()), S / 2, rel_tol=1e-5)
        s = status(st)
        assert s["privacy"]["clip_norm"] == S and s["rejected_by_reason"] == {"duplicate": 1}
    with start_server(
        pki,
        tmp_path / "t",
        mode="async",
        concurrency=4,
        buffer_size=2,
        total_steps=5,
        weighting="uniform",
        secure_buffer=True,
        privacy=dp(clip_norm=S, noise_multiplier=1.0),
    ) as st:
        c0 = connect(pki, st, 0)
        a = assignment(c0)
        unclipped = seal_raw(a, torch.full((NUMEL,), 1.0))  # a device that does not clip
        with pytest.raises(Refused) as e:
            c0.upload_raw(
                a.ticket, a.version, "sealed", [NUMEL], unclipped.ciphertext, 10, ephemeral_pk=unclipped.ephemeral_pk
            )
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_norm" in str(e.value)
        assert status(st)["privacy"]["epsilon"] == 0.0
        c0.close()


def seal_raw(a, delta):
    from flotilla.secure.buffer import Assignment as BufferAssignment
    from flotilla.secure.buffer import seal_update

    return seal_update(delta, 1.0, BufferAssignment(a.device, a.version, a.buffer_nonce, a.buffer_key))


def test_secure_buffer_enforces_the_networks_max_update_norm(pki, tmp_path):
    with start_server(
        pki,
        tmp_path / "s",
        mode="async",
        concurrency=4,
        buffer_size=2,
        total_steps=5,
        secure_buffer=True,
        max_update_norm=1.0,
    ) as st:
        with connect(pki, st, 0) as c0:
            with pytest.raises(Refused) as e:
                c0.upload(assignment(c0), torch.full((NUMEL,), 1.0), 10)  # norm sqrt(18) > 1
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_norm" in str(e.value)
            assert c0.upload(assignment(c0), torch.full((NUMEL,), 0.1), 10) == (0, 0)


def test_devices_run_dp_sgd_seeded_on_the_device_and_account_their_own_epsilon(pki, tmp_path):
    from torch import nn

    from flotilla.client import Device
    from flotilla.privacy import SampleLevelSpec
    from flotilla.privacy.accountant import dpsgd_schedule
    from tests.helpers import synthetic_dataset

    data = synthetic_dataset(num_clients=2, per_client=20)
    sample = SampleLevelSpec(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3)
    server = FlotillaServer(
        tiny_model(),
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=tmp_path / "s",
        fsync=False,
        linger_s=1.0,
        dp_sgd=sample,
        client=ClientSpec(epochs=1, batch_size=5, lr=0.1),
        settings=CoordinatorSettings(
            mode="sync", cohort=2, over_selection=1.0, total_steps=3, selection_window_s=0.0, retry_after_s=0.02
        ),
    )
    reports = [None, None]
    with ServerThread(server) as st:
        devices = [
            Device(f"localhost:{st.port}", pki.token(i), nn.Linear(5, 3), data, client=i, ca=pki.ca) for i in range(2)
        ]
        threads = [threading.Thread(target=lambda i=i: reports.__setitem__(i, devices[i].run())) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert status(st)["version"] == 3
    q, steps = dpsgd_schedule(20, 5, 1)
    for r in reports:  # three participations of `steps` DP-SGD steps each, composed on the device
        assert len(r.accepted) == 3 and not r.refused
        assert math.isclose(r.epsilon, epsilon(1.1, q, 3 * steps, 1e-3), rel_tol=1e-9)
        assert math.isclose(r.accepted[0]["epsilon"], epsilon(1.1, q, steps, 1e-3), rel_tol=1e-9)
    # the batch sampling and noise come from the device, not from the assignment's seed: the same
    # assignment trained twice gives two different deltas (plain SGD would give the same one twice)
    dev = devices[0]
    a = dataclasses.replace(_an_assignment(), client=ClientSpec(epochs=1, batch_size=5, lr=0.1), dp_sgd=sample)
    dev.start.copy_(server.coord.weights)
    dev._train(a)
    first = dev.delta.clone()
    dev._train(a)
    assert not torch.equal(first, dev.delta)
    plain = dataclasses.replace(a, dp_sgd=None)
    dev2 = Device("localhost:1", pki.token(1), nn.Linear(5, 3), data, client=0, ca=pki.ca)
    dev2._prepare({}, None)
    dev2.start.copy_(server.coord.weights)
    dev2._train(plain)
    first = dev2.delta.clone()
    dev2._train(plain)
    assert torch.equal(first, dev2.delta)


def _an_assignment():
    from flotilla.network.client import Assignment

    return Assignment("id", "ticket", 0, 0, 1234, ClientSpec(), 18, 60.0)


def test_a_recurrent_model_is_made_dp_compatible_on_both_sides_so_the_flat_vectors_agree(pki, tmp_path):
    from flotilla.client import Device
    from flotilla.privacy import SampleLevelSpec
    from flotilla.tasks.models import CharLSTM
    from tests.helpers import synthetic_dataset

    sample = SampleLevelSpec()
    torch.manual_seed(0)
    server = FlotillaServer(
        CharLSTM(20, 4, 8),
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=tmp_path / "s",
        fsync=False,
        dp_sgd=sample,
        settings=CoordinatorSettings(),
    )
    dev = Device("localhost:1", pki.token(0), CharLSTM(20, 4, 8), synthetic_dataset(num_clients=1), ca=pki.ca)
    dev._prepare({}, sample)
    names = lambda flat: [(n, tuple(p.shape)) for n, p in flat.model.named_parameters()]  # noqa: E731
    assert names(server.flat) == names(dev.flat)
    assert [n for n, _ in names(dev.flat)][1:4] == ["lstm.weight_ih_l0", "lstm.bias_ih_l0", "lstm.weight_hh_l0"]
    server.store.close()
