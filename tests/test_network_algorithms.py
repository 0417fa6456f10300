"""Client algorithms over the network (flotilla serve + flotilla.client.Device): FedProx's mu in the
assignment, SCAFFOLD's c with the download and delta c_i with the upload, against the simulator."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.algorithms.fedprox import FedProxTrainer
from flotilla.client import Connection, Device, Refused
from flotilla.core.client import ClientSpec, LocalTrainer, client_seed
from flotilla.core.flat import FlatModel
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.experiment.compose import build_algorithm
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, ServerThread
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset
from tests.network_helpers import PKI, tiny_model

NUMEL = 18  # nn.Linear(5, 3)
DEVICES = 4  # the token table's devices: SCAFFOLD's N
SEED = 3
SPEC = ClientSpec(steps=3, batch_size=8, lr=0.1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=DEVICES)


def server(pki, state_dir, algorithm, model=None, **settings) -> FlotillaServer:
    settings = {"selection_window_s": 0.0, "seed": SEED, **settings}
    return FlotillaServer(
        model if model is not None else tiny_model(),
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=state_dir,
        settings=CoordinatorSettings(**settings),
        client=SPEC,
        fsync=False,
        linger_s=1.0,
        client_algorithm=algorithm,
    )


def connect(pki, st, i) -> Connection:
    return Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca)


def assignment(conn):
    ci = conn.check_in(10)
    assert ci.action == "train", ci
    return ci.assignment


def run_devices(pki, st, ds, n) -> list[Device]:
    devices = [Device(f"localhost:{st.port}", pki.token(i), nn.Linear(5, 3), ds, client=i, ca=pki.ca) for i in range(n)]
    threads = [threading.Thread(target=d.run) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return devices


# -- FedProx --------------------------------------------------------------------------------------
def test_fedprox_mu_reaches_the_device_and_its_update_is_the_simulators(pki, tmp_path):
    ds = synthetic_dataset(num_clients=DEVICES, per_client=20)
    with ServerThread(server(pki, tmp_path / "s", {"name": "fedprox", "mu": 0.5}, cohort=1, total_steps=1)) as st:
        w0 = st.server.coord.weights.clone()
        with connect(pki, st, 0) as c:
            a = assignment(c)
            assert a.algorithm == {"name": "fedprox", "mu": 0.5}
        run_devices(pki, st, ds, 1)
        got = st.server.coord.weights - w0
    # the simulator's FedProx client update, and FedAvg's, on the same data, seed and start
    seed = client_seed(SEED, 0, 0)
    flat = FlatModel(tiny_model())
    prox, avg = torch.empty(NUMEL), torch.empty(NUMEL)
    FedProxTrainer(flat, F.cross_entropy, SPEC, 0.5).train(ds, 0, w0, seed, prox)
    LocalTrainer(flat, F.cross_entropy, SPEC).train(ds, 0, w0, seed, avg)
    assert torch.allclose(got, prox, atol=1e-6, rtol=0)
    assert (got - avg).abs().max() > 1e-3  # mu changed the update: not FedAvg's


def test_a_plain_run_sends_no_algorithm_and_only_the_weights(pki, tmp_path):
    with ServerThread(server(pki, tmp_path / "s", None, cohort=1)) as st, connect(pki, st, 0) as c:
        a = assignment(c)
        assert a.algorithm is None and "algorithm" not in st.server.client_json
        assert c.download(a.version).numel() == NUMEL


# -- SCAFFOLD -------------------------------------------------------------------------------------
def test_scaffold_over_the_network_equals_the_simulator(pki, tmp_path):
    """Every device in every round (cohort = N = 4), so the network run repeats SyncFedAvg with
    SCAFFOLD: same cohorts, seeds and data; only the order updates are summed in differs."""
    ds = synthetic_dataset(num_clients=DEVICES, per_client=20)
    rounds = 3
    sim = build_algorithm(
        SyncFedAvg,
        dict(
            model=tiny_model(),
            dataset=ds,
            loss_fn=F.cross_entropy,
            cohort=DEVICES,
            client=SPEC,
            server=ServerOptimizerSpec(),
            weighting="examples",
            seed=SEED,
        ),
        client_algorithm={"name": "scaffold", "store": "memory"},
        rounds=rounds,
    )[0]
    for _ in range(rounds):
        sim.step()
    srv = server(pki, tmp_path / "s", {"name": "scaffold"}, cohort=DEVICES, over_selection=1.0, total_steps=rounds)
    with ServerThread(srv) as st:
        devices = run_devices(pki, st, ds, DEVICES)
    coord = st.server.coord
    assert coord.version == rounds and coord.variates.population == DEVICES
    assert torch.allclose(coord.weights, sim.weights, atol=1e-6, rtol=0)
    assert torch.allclose(coord.variates.c, sim.variates.c, atol=1e-6, rtol=0)
    assert float(coord.variates.c.abs().max()) > 1e-2  # c moved
    ci, ci_sim = torch.empty(NUMEL), torch.empty(NUMEL)
    for i, d in enumerate(devices):  # each device kept its c_i across rounds
        assert d.variates.store.get(i, ci) and sim.variates.store.get(i, ci_sim)
        assert torch.allclose(ci, ci_sim, atol=1e-6, rtol=0)
    # c is the mean of the devices' c_i (each c_i is the sum of that device's accepted delta c_i)
    mean = torch.stack([d.variates.store._rows[i] for i, d in enumerate(devices)]).sum(0) / DEVICES
    assert torch.allclose(coord.variates.c, mean, atol=1e-6, rtol=0)
    metrics = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["scaffold_c_norm"] == pytest.approx(float(coord.variates.c.norm()), rel=1e-6)


def test_scaffold_devices_in_async_fedbuff_keep_c_the_mean_of_their_c_i(pki, tmp_path):
    ds = synthetic_dataset(num_clients=DEVICES, per_client=20)
    srv = server(
        pki,
        tmp_path / "s",
        {"name": "scaffold"},
        mode="async",
        concurrency=DEVICES,
        buffer_size=2,
        total_steps=3,
        retry_after_s=0.05,
    )
    with ServerThread(srv) as st:
        devices = run_devices(pki, st, ds, DEVICES)
    coord = st.server.coord
    assert coord.version == 3 and coord.variates.pending_count == 0
    assert sum(len(d.variates.store) for d in devices) >= 2
    rows = [d.variates.store._rows.get(i, torch.zeros(NUMEL)) for i, d in enumerate(devices)]
    assert torch.allclose(coord.variates.c, torch.stack(rows).sum(0) / DEVICES, atol=1e-6, rtol=0)
    assert float(coord.variates.c.abs().max()) > 1e-2


def payload(delta, dc) -> torch.Tensor:
    return torch.stack([delta, dc])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scaffold_server_adds_accepted_delta_c_only_and_restores_c_after_a_restart(pki, tmp_path, mode):
    """c += sum(accepted delta c_i) / N at each step; refused uploads add nothing; an update accepted
    before a restart still counts after it, and c itself is in the snapshot."""
    kw = dict(cohort=2, over_selection=1.5) if mode == "sync" else dict(buffer_size=2, concurrency=4)
    g = torch.Generator().manual_seed(0)
    dcs = [torch.randn(NUMEL, generator=g) for _ in range(4)]
    delta = torch.full((NUMEL,), 0.01)
    with ServerThread(server(pki, tmp_path / "s", {"name": "scaffold"}, mode=mode, total_steps=3, **kw)) as st:
        coord = st.server.coord
        conns = [connect(pki, st, i) for i in range(3)]
        a = [assignment(c) for c in conns]
        assert a[0].algorithm["name"] == "scaffold"
        w = conns[0].download(a[0].version)
        assert w.numel() == 2 * NUMEL and torch.equal(w[:NUMEL], coord.weights) and not w[NUMEL:].any()
        # refused: no delta c_i, a non-finite one, one over max_update_abs; none of them counts
        for bad, reason in [
            (delta, "shape"),
            (payload(delta, torch.full((NUMEL,), float("nan"))), "non-finite"),
            (payload(delta, torch.full((NUMEL,), 2e6)), "max_update_abs"),
        ]:
            with pytest.raises(Refused, match=reason):
                conns[2].upload(a[2], bad, 10)
        assert coord.variates.pending_count == 0
        conns[0].upload(a[0], payload(delta, dcs[0]), 10)  # accepted, pending
        for c in conns:
            c.close()
    assert coord.version == 0 and coord.variates.pending_count == 1
    # restart: the pending delta c_i is read back with its update
    with ServerThread(server(pki, tmp_path / "s", {"name": "scaffold"}, mode=mode, total_steps=3, **kw)) as st:
        coord = st.server.coord
        assert coord.variates.pending_count == 1 and torch.equal(coord.variates.pending, dcs[0])
        with connect(pki, st, 1) as c:
            c.upload(assignment(c), payload(delta, dcs[1]), 10)  # the step
        assert coord.version == 1
        c1 = coord.variates.c.clone()
        assert torch.allclose(c1, (dcs[0] + dcs[1]) / DEVICES, atol=1e-7, rtol=0)
        with connect(pki, st, 2) as c:  # the download carries the new c
            w = c.download(assignment(c).version)
            assert torch.equal(w[NUMEL:], c1)
    with ServerThread(server(pki, tmp_path / "s", {"name": "scaffold"}, mode=mode, total_steps=3, **kw)) as st:
        assert torch.equal(st.server.coord.variates.c, c1)  # c came back from the snapshot


def test_scaffold_state_without_c_is_refused(pki, tmp_path):
    with ServerThread(server(pki, tmp_path / "s", None, cohort=1, total_steps=2)) as st, connect(pki, st, 0) as c:
        c.upload(assignment(c), torch.zeros(NUMEL), 10)
    with pytest.raises(ValueError, match="scaffold.c"):
        server(pki, tmp_path / "s", {"name": "scaffold"}, cohort=1, total_steps=2)


def test_scaffold_refused_with_user_level_dp_and_secure_aggregation(pki, tmp_path):
    from flotilla.network.dp import network_user_level
    from flotilla.privacy import PrivacySpec

    spec = PrivacySpec.from_dict({"user_level": {"noise_multiplier": 1.0, "clip_norm": 1.0}})
    with pytest.raises(ValueError, match="privacy.user_level"):
        FlotillaServer(
            tiny_model(),
            tls=pki.tls(),
            tokens=TokenTable.load(pki.paths["tokens_json"]),
            state_dir=tmp_path / "a",
            settings=CoordinatorSettings(weighting="uniform"),
            privacy=network_user_level(spec.user_level, False),
            client_algorithm={"name": "scaffold"},
        )
    with pytest.raises(ValueError, match="secure aggregation"):
        FlotillaServer(
            tiny_model(),
            tls=pki.tls(),
            tokens=TokenTable.load(pki.paths["tokens_json"]),
            state_dir=tmp_path / "b",
            settings=CoordinatorSettings(mode="async"),
            secure_buffer=True,
            client_algorithm={"name": "scaffold"},
        )


def test_fedprox_refused_with_dp_sgd_on_the_devices(pki, tmp_path):
    from flotilla.privacy import PrivacySpec

    spec = PrivacySpec.from_dict({"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}})
    with pytest.raises(ValueError, match="privacy.sample_level"):
        FlotillaServer(
            tiny_model(),
            tls=pki.tls(),
            tokens=TokenTable.load(pki.paths["tokens_json"]),
            state_dir=tmp_path / "a",
            dp_sgd=spec.sample_level,
            client_algorithm={"name": "fedprox", "mu": 0.1},
        )


def test_a_device_refuses_an_algorithm_it_does_not_know(pki):
    ds = synthetic_dataset(num_clients=1, per_client=8)
    d = Device("localhost:1", "token", nn.Linear(5, 3), ds, ca=pki.ca)
    d._prepare({}, None)
    with pytest.raises(ValueError, match="client.algorithm .*not one this SDK can run"):
        d._trainer_for(SPEC, None, {"name": "ditto"})
    d.conn.close()


def test_flotilla_serve_builds_fedprox_and_scaffold_servers_from_the_config(pki, tmp_path):
    import yaml

    from flotilla.config import ConfigError, load_config
    from flotilla.experiment.serve import server_from_config

    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 4, "examples_per_client": 5},
        "rounds": 1,
        "cohort": 2,
        "network": {
            "tls": {"cert": str(pki.paths["server_pem"]), "key": str(pki.paths["server_key"])},
            "tokens": str(pki.paths["tokens_json"]),
        },
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    srv = server_from_config(load_config(path, ["client.algorithm={name: fedprox, mu: 0.3}"]), state_dir=tmp_path / "a")
    srv.store.close()
    assert json.loads(srv.client_json)["algorithm"] == {"name": "fedprox", "mu": 0.3} and srv.coord.variates is None
    srv = server_from_config(load_config(path, ["client.algorithm={name: scaffold}"]), state_dir=tmp_path / "b")
    srv.store.close()
    assert srv.coord.variates.population == DEVICES and srv.coord.rows == 2
    with pytest.raises(ConfigError, match="secure aggregation would hide"):
        load_config(path, ["client.algorithm={name: scaffold}", "secure_aggregation={}"])
