"""Staleness weights, the FedBuff buffer and server, FedAsync mixing (hand-computed)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flotilla.sim.sync as sync_mod
from flotilla.core.aggregate import UpdateRejected
from flotilla.core.client import ClientSpec
from flotilla.core.fedbuff import FedAsyncServer, FedBuff, FedBuffServer
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec
from flotilla.core.staleness import Staleness, constant, hinge, polynomial
from flotilla.fleet import make_fleet
from flotilla.sim.fleet import AsyncFleetSim
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset


@pytest.mark.parametrize("tau", [0, 1, 2, 3, 7, 50])
def test_staleness_weights_match_their_formulas(tau):
    assert constant()(tau) == 1.0
    for a in (0.0, 0.5, 1.0):
        assert polynomial(a)(tau) == pytest.approx(1.0 / (1.0 + tau) ** a)
    assert polynomial(0.5)(tau) == pytest.approx(1.0 / math.sqrt(1.0 + tau))
    a, b = 10.0, 4.0
    expected = 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    assert hinge(a, b)(tau) == pytest.approx(expected)
    for s in (constant(), polynomial(0.5), hinge(3.0, 2.0)):
        assert s.weights(np.array([tau]))[0] == pytest.approx(s(tau))


def test_staleness_refuses_bad_parameters():
    with pytest.raises(ValueError, match="staleness.kind"):
        Staleness("cubic")
    with pytest.raises(ValueError, match="staleness.exponent"):
        Staleness("polynomial", exponent=-1)
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        polynomial()(-1)


def test_staleness_normalised_at_the_average_weighs_1_there_and_more_when_fresher():
    s = Staleness("polynomial", exponent=0.5, average=3.0)  # FLSim's avg_staleness
    assert s(3) == pytest.approx(1.0)
    assert s(0) == pytest.approx(2.0)  # sqrt(1 + 3) / sqrt(1 + 0)
    assert s(8) == pytest.approx(2.0 / 3.0)  # sqrt(4) / sqrt(9)
    assert s.weights(np.array([0, 3, 8])).tolist() == pytest.approx([2.0, 1.0, 2.0 / 3.0])
    h = Staleness("hinge", a=1.0, b=2.0, average=4.0)  # raw s(4) = 1/3
    assert h(0) == pytest.approx(3.0) and h(4) == pytest.approx(1.0)
    assert Staleness("constant", average=5.0)(9) == 1.0
    buf = FedBuff(2, 2, s, normalize="mean")  # the buffer uses the normalised weight
    assert buf.add(torch.tensor([1.0, 0.0]), 1.0, tau=0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="staleness.average"):
        Staleness("polynomial", average=-1.0)


def test_normalised_staleness_is_refused_with_user_level_dp():
    from flotilla.privacy import DPFedBuff, PrivacyError
    from flotilla.secure.fedbuff import SecureFedBuff

    normalised = Staleness("polynomial", average=2.0)
    with pytest.raises(PrivacyError, match="staleness.average"):
        DPFedBuff(FedBuff(4, 2, normalised), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="staleness.average"):
        SecureFedBuff(4, 2, normalised, version_fn=lambda: 0, dp_clip=1.0)
    SecureFedBuff(4, 2, normalised, version_fn=lambda: 0)  # without DP the weights may exceed 1


def test_fedbuff_mean_and_sum_normalisation_hand_computed():
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    s = polynomial(0.5)
    buf = FedBuff(2, 2, s, normalize="mean")
    assert buf.add(d1, 3.0, tau=0) == 1.0
    assert buf.add(d2, 1.0, tau=3) == pytest.approx(0.5)
    assert buf.full
    # (3 * 1 * d1 + 1 * 0.5 * d2) / (3 + 1)
    assert buf.result().tolist() == pytest.approx([0.75, 0.25])
    summed = FedBuff(2, 2, s, normalize="sum")
    summed.add(d1, 3.0, tau=0)
    summed.add(d2, 1.0, tau=3)
    assert summed.result().tolist() == pytest.approx([1.5, 0.5])  # K x mean
    # With uniform weights "sum" is the plain sum of staleness-weighted deltas (FLSim).
    plain = FedBuff(2, 2, s, normalize="sum")
    plain.add(d1, 1.0, tau=0)
    plain.add(d2, 1.0, tau=3)
    assert plain.result().tolist() == pytest.approx((d1 + 0.5 * d2).tolist())


def test_fedbuff_drops_too_stale_and_rejects_bad_updates_without_changing_state():
    buf = FedBuff(3, 2, constant(), max_staleness=2)
    buf.add(torch.ones(3), 1.0, tau=2)
    assert buf.add(torch.ones(3), 1.0, tau=3) == 0.0
    assert buf.count == 1 and buf.dropped_stale == 1
    for bad, kw, msg in [
        (torch.tensor([float("nan"), 0, 0]), {}, "non-finite"),
        (torch.zeros(4), {}, "shape"),
        (torch.zeros(3), {"weight": 0.0}, "weight"),
        (torch.zeros(3), {"tau": -1}, "future"),
    ]:
        args = {"weight": 1.0, "tau": 0, **kw}
        with pytest.raises(UpdateRejected, match=msg):
            buf.add(bad, args["weight"], args["tau"], client=5)
    assert buf.count == 1 and buf.result().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="async.buffer_size"):
        FedBuff(3, 0)


def test_fedbuff_server_steps_every_k_updates_with_the_server_optimizer():
    w = torch.zeros(2)
    spec = ServerOptimizerSpec("fedavgm", lr=0.5, momentum=0.9)
    srv = FedBuffServer(w, FedBuff(2, 2, constant()), ServerOptimizer(spec, 2))
    r1 = srv.submit(torch.tensor([1.0, 1.0]), 1.0, base_version=0)
    assert not r1.stepped and srv.version == 0 and w.tolist() == [0.0, 0.0]
    r2 = srv.submit(torch.tensor([3.0, -1.0]), 1.0, base_version=0)
    assert r2.stepped and srv.version == 1
    assert w.tolist() == pytest.approx([1.0, 0.0])  # 0.5 * mean([1,1],[3,-1]) = 0.5*[2,0]
    srv.submit(torch.tensor([0.0, 0.0]), 1.0, base_version=0)  # tau = 1
    r4 = srv.submit(torch.tensor([0.0, 0.0]), 1.0, base_version=1)
    assert r4.stepped and r4.version == 2
    assert w.tolist() == pytest.approx([1.0 + 0.5 * 0.9 * 2.0, 0.0])  # momentum carries the first step


def test_fedasync_mixing_hand_computed():
    w = torch.tensor([1.0, 1.0])
    srv = FedAsyncServer(w, mixing=0.5, staleness=polynomial(1.0))
    base = torch.tensor([0.0, 2.0])
    delta = torch.tensor([1.0, 1.0])  # client model = [1, 3]
    srv.version = 1
    r = srv.submit(delta, base, base_version=0)  # tau = 1: a = 0.5 * 1/2 = 0.25
    assert r.staleness == 1 and r.weight == pytest.approx(0.5) and srv.version == 2
    assert w.tolist() == pytest.approx([0.75 * 1 + 0.25 * 1, 0.75 * 1 + 0.25 * 3])
    with pytest.raises(ValueError, match="async.mixing"):
        FedAsyncServer(w, mixing=0.0)


def test_fedasync_mixing_weight_is_capped_at_one_with_normalised_staleness():
    """Issue 11 item 20: with ``average`` set, s(0) = sqrt(1 + 10) > 1, so alpha * s(0) = 3.32 moved
    w from 0 to 3.3166, past the client's model 1. The mix must stay a convex combination."""
    st = Staleness("polynomial", exponent=0.5, average=10)
    w = torch.zeros(1)
    srv = FedAsyncServer(w, mixing=1.0, staleness=st)
    r = srv.submit(torch.ones(1), torch.zeros(1), base_version=0)  # fresh: client model = 1
    assert w.tolist() == [1.0]  # a = 1: the client's model, not 3.3166
    assert r.weight == pytest.approx(math.sqrt(11)) and srv.mixing_weight(r.weight) == 1.0
    # a stale update whose alpha * s(tau) < 1 is not affected by the cap: tau = 20, s = sqrt(11/21)
    srv.version = 21
    w.zero_()
    srv.submit(torch.ones(1), torch.zeros(1), base_version=1)
    assert w.item() == pytest.approx(math.sqrt(11 / 21))
    # alpha = 0.5: capped while 0.5 s(tau) > 1 (fresh), scaled below
    half = FedAsyncServer(torch.zeros(1), mixing=0.5, staleness=st)
    assert half.mixing_weight(st(0)) == 1.0 and half.mixing_weight(st(100)) == pytest.approx(0.5 * math.sqrt(11 / 101))


def test_fedbuff_k1_c1_constant_equals_sequential_fedavg_with_cohort_1(monkeypatch):
    data = synthetic_dataset(num_clients=6, per_client=20)
    spec = ClientSpec(steps=3, batch_size=8, lr=0.2, momentum=0.5)
    server = ServerOptimizerSpec("fedavg", lr=1.0)
    fleet = make_fleet(
        population=40,
        seed=3,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        speed={"dist": "lognormal", "median": 10, "sigma": 1.0},
    )
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    reference = copy.deepcopy(model)
    rounds = 8
    alg = AsyncFleetSim(
        model,
        data,
        F.cross_entropy,
        fleet=fleet,
        concurrency=1,
        algorithm="fedbuff",
        buffer_size=1,
        staleness=constant(),
        client=spec,
        server=server,
        seed=7,
        trace=True,
    )
    for _ in range(rounds):
        m = alg.step()
        assert m["staleness_max"] == 0
    done = [(tid, dev) for _, kind, tid, dev, _ in alg.sched.trace if kind == "done"]
    # With one client in flight and every device always eligible, trip ids run 0, 1, 2, ... so the
    # async sim seeds client training exactly like SyncFedAvg seeds round r.
    assert [tid for tid, _ in done] == list(range(rounds))
    clients = [dev % data.num_clients for _, dev in done]
    monkeypatch.setattr(sync_mod, "sample_cohort", lambda seed, r, pop, cohort: np.array([clients[r]]))
    seq = SyncFedAvg(reference, data, F.cross_entropy, cohort=1, client=spec, server=server, seed=7)
    for _ in range(rounds):
        seq.step()
    assert torch.equal(alg.weights, seq.weights)
