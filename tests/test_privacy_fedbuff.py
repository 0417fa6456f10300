"""DP-FedBuff: DP-FedAvg's mechanism once per FedBuff buffer of K updates, on the simulated fleet."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.config import validate
from flotilla.core.aggregate import UpdateRejected
from flotilla.core.client import ClientSpec
from flotilla.core.fedbuff import FedBuff, FedBuffServer
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec
from flotilla.core.staleness import Staleness
from flotilla.fleet import make_fleet
from flotilla.privacy import DPFedBuff, PrivacyError, epsilon, make_private
from flotilla.runs.rundir import RunDir
from flotilla.sim.fleet import AsyncFleetSim
from tests.helpers import synthetic_dataset


def test_one_buffer_release_clips_before_staleness_weighting_and_adds_noise_once():
    n, K, S = 50_000, 4, 1.0
    plain = FedBuff(n, K, Staleness("polynomial", exponent=1.0))
    buf = DPFedBuff(plain, clip_norm=S, noise_multiplier=0.0, seed=0)
    server = FedBuffServer(torch.zeros(n), buf, ServerOptimizer(ServerOptimizerSpec("fedavg"), n))
    huge = torch.full((n,), 100.0)
    server.submit(huge, 1.0, 0, client=0)  # tau 0: weight 1
    server.version = 1
    server.submit(huge, 1.0, 0, client=1)  # tau 1: weight 1/2
    assert server.submit(huge, 1.0, 1, client=1).accepted is False  # client 1 is already in this buffer
    server.submit(torch.zeros(n), 1.0, 1, client=2)
    res = server.submit(torch.zeros(n), 1.0, 1, client=3)
    assert res.stepped and buf.count == 0 and buf.duplicates_dropped == 1
    # moved by (S + S/2) / K along the direction of `huge`
    assert float(server.weights.norm()) == pytest.approx(1.5 * S / K, rel=1e-4)
    with pytest.raises(UpdateRejected, match="weight 1"):
        buf.add(huge, 20.0, 0, client=5)

    noisy = DPFedBuff(FedBuff(n, K), clip_norm=S, noise_multiplier=2.0, seed=1)
    for c in range(K):
        noisy.add(torch.zeros(n), 1.0, 0, client=c)
    assert noisy.full
    assert float(noisy.result().std()) == pytest.approx(2.0 * S / K, rel=0.02)


def build_async(data, **kw):
    torch.manual_seed(0)
    f = make_fleet(
        population=400,
        seed=3,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        speed={"dist": "lognormal", "median": 10, "sigma": 1.0},
    )
    args = dict(
        fleet=f,
        concurrency=10,
        buffer_size=4,
        client=ClientSpec(steps=2, batch_size=8, lr=0.1),
        server=ServerOptimizerSpec("fedavgm", lr=0.7),
        weighting="uniform",
        max_staleness=8,
    )
    args.update(kw)
    return AsyncFleetSim, dict(model=nn.Linear(5, 3), dataset=data, loss_fn=F.cross_entropy, **args)


def test_dp_fedbuff_on_the_fleet_accounts_per_buffer_and_resumes_bit_identically(tmp_path):
    data = synthetic_dataset(num_clients=40, per_client=10)
    spec = {
        "user_level": {
            "clip_norm": 0.5,
            "noise_multiplier": 1.0,
            "delta": 1e-3,
            "adaptive_clipping": {"count_noise_multiplier": 2.0},
        },
        "sample_level": {"noise_multiplier": 0.5},
    }
    whole = make_private(*build_async(data), spec, rounds=6, eval_every=3)
    hist = [whole.step() for _ in range(6)]
    assert isinstance(whole.inner.server.buffer, DPFedBuff)
    assert hist[-1]["epsilon"] == pytest.approx(epsilon(1.0, 4 / 40, 6, 1e-3))  # q = K / population, per buffer
    assert all(r["dp_updates"] == 4 for r in hist) and hist[-1]["sample_epsilon_max"] > 0
    assert hist[-1]["clip_norm"] != 0.5

    part = make_private(*build_async(data), spec, rounds=6, eval_every=3)
    for _ in range(3):
        part.step()
    rd = RunDir(tmp_path)
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.save_state(part.state_dict(), {"round": part.round})
    resumed = make_private(*build_async(data), spec, rounds=6, eval_every=3)
    resumed.load_state_dict(rd.load_state())
    rest = [resumed.step() for _ in range(3)]
    assert torch.equal(whole.weights, resumed.weights)
    assert rest[-1]["clip_norm"] == hist[-1]["clip_norm"]


def test_dp_fedbuff_refusals():
    data = synthetic_dataset(num_clients=40, per_client=10)
    user = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}
    with pytest.raises(PrivacyError, match="fedasync is not covered"):
        make_private(*build_async(data, algorithm="fedasync"), {"user_level": user}, rounds=5)
    with pytest.raises(PrivacyError, match="weighting='uniform'"):
        make_private(*build_async(data, weighting="examples"), {"user_level": user}, rounds=5)
    with pytest.raises(PrivacyError, match="'poisson' is for synchronous rounds"):
        make_private(*build_async(data), {"user_level": {**user, "sampling": "poisson"}}, rounds=5)
    # without amplification the accountant assumes nothing about who lands in a buffer: q = 1
    private = make_private(*build_async(data), {"user_level": {**user, "amplification": False}}, rounds=5)
    assert private.plan.sample_rate == 1.0
    base = {"task": {"name": "fashion-mnist", "num_clients": 100}, "rounds": 10, "mode": "async"}
    with pytest.raises(Exception, match="sampling: poisson is for sync rounds"):
        validate({**base, "privacy": {"user_level": {**user, "delta": 1e-4, "sampling": "poisson"}}})
    cfg = validate({**base, "privacy": {"user_level": {**user, "delta": 1e-4}}})
    assert cfg.weighting == "uniform"
