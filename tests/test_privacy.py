"""Differential privacy: accountant vectors, DP-FedAvg mechanism, DP-SGD client, config refusals."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.api import train
from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientResult, ClientSpec, LocalTrainer
from flotilla.core.flat import FlatModel
from flotilla.core.protocols import Components, Shape
from flotilla.privacy import (
    AdaptiveClippingSpec,
    DPFedAvg,
    DPLocalTrainer,
    GaussianSumNoise,
    PrivacyError,
    PrivacyParts,
    PrivacySpec,
    SampleLevelSpec,
    calibrate_noise,
    delta_noise_multiplier,
    dpsgd_schedule,
    epsilon,
    make_dp_compatible,
    make_private,
    poisson_cohort,
)
from flotilla.sim.sync import SyncFedAvg
from flotilla.tasks.models import CharLSTM
from tests.helpers import synthetic_dataset


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


# --- accountant ----------------------------------------------------------------------------------
def test_dpsgd_epsilon_matches_opacus_published_vector():
    # N=60,000, batch 256, sigma 1.1, 60 epochs, delta 1e-5 -> epsilon ~2.60 (RDP), Opacus' MNIST example.
    q, steps = 256 / 60000, int(60 / (256 / 60000))
    assert epsilon(1.1, q, steps, 1e-5, "rdp") == pytest.approx(2.60, abs=0.01)
    # The per-client schedule Opacus' make_private builds for a DataLoader of 256 (q = 1/235, 235 steps/epoch).
    q2, steps2 = dpsgd_schedule(60000, 256, epochs=60)
    assert (q2, steps2) == (1 / 235, 60 * 235)
    assert epsilon(1.1, q2, steps2, 1e-5) == pytest.approx(2.60, abs=0.01)
    # Our cached-curve RDP path gives exactly what Opacus' RDPAccountant gives.
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, q, steps)]
    assert epsilon(1.1, q, steps, 1e-5, "rdp") == acc.get_epsilon(1e-5)
    # PRV is tighter than RDP for the same mechanism.
    assert 2.2 < epsilon(1.1, q, steps, 1e-5, "prv") < 2.6


def _dp_accounting_eps(q, z, steps, delta, kind):
    dp_accounting = pytest.importorskip("dp_accounting")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    acc = (
        dp_accounting.rdp.RdpAccountant()
        if kind == "rdp"
        else dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    )
    return acc.compose(event).get_epsilon(delta)


def test_user_level_epsilon_agrees_with_dp_accounting():
    """A sync DP-FedAvg schedule (population 100, cohort 10, z=1.2): the epsilon the run reports after
    its rounds, and the epsilon of longer schedules, agree with Google's dp-accounting within 2%."""
    ds = synthetic_dataset(num_clients=100, per_client=2)
    kw = dict(
        model=mlp(),
        dataset=ds,
        loss_fn=F.cross_entropy,
        cohort=10,
        weighting="uniform",
        client=ClientSpec(steps=1, batch_size=2),
    )
    private = make_private(
        SyncFedAvg,
        kw,
        {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.2, "delta": 1e-3}},
        rounds=8,
        eval_every=4,
    )
    history = [private.step() for _ in range(8)]
    assert [r["round"] for r in history if "epsilon" in r] == [4, 8]
    assert private.plan.sample_rate == 0.1
    theirs = _dp_accounting_eps(0.1, 1.2, 8, 1e-3, "rdp")
    assert history[-1]["epsilon"] == pytest.approx(theirs, rel=0.02)
    for steps in (100, 1000):
        assert private.epsilon(steps) == pytest.approx(_dp_accounting_eps(0.1, 1.2, steps, 1e-3, "rdp"), rel=0.02)
    prv = make_private(
        SyncFedAvg,
        dict(model=mlp(), dataset=ds, loss_fn=F.cross_entropy, cohort=10, weighting="uniform"),
        {"accountant": "prv", "user_level": {"clip_norm": 1.0, "noise_multiplier": 1.2, "delta": 1e-3}},
        rounds=8,
    )
    assert prv.epsilon(300) == pytest.approx(_dp_accounting_eps(0.1, 1.2, 300, 1e-3, "pld"), rel=0.02)


def test_target_epsilon_calibrates_noise_and_is_met():
    z = calibrate_noise(2.0, 1e-5, 0.05, 200)
    assert 1.99 - 0.01 <= epsilon(z, 0.05, 200, 1e-5) <= 2.0
    assert epsilon(z * 0.97, 0.05, 200, 1e-5) > 2.0 - 0.01  # not grossly over-noised
    with pytest.raises(PrivacyError, match=r"target_epsilon: epsilon=1e-06 .* cannot be met in 200 steps"):
        calibrate_noise(1e-6, 1e-5, 0.05, 200)


# --- user level: the mechanism -------------------------------------------------------------------
def test_noise_of_a_zero_release_has_the_predicted_std():
    n, S, z, m = 400_000, 2.0, 1.5, 10
    agg = DPFedAvg(n, clip_norm=S, noise_multiplier=z, expected_cohort=m, seed=3)
    agg.reset()
    for c in range(7):  # the realised cohort (7) does not matter: the sum is divided by m
        agg.add(torch.zeros(n), 1.0, c)
    out = agg.result().clone()
    sd = z * S / m
    # sample sd of n normals: relative standard error 1/sqrt(2n) ~ 0.0011; 0.6% is > 5 standard errors
    assert float(out.std()) == pytest.approx(sd, rel=0.006)
    assert abs(float(out.mean())) < 5 * sd / math.sqrt(n)
    # Normal shape: ~68.3% within one sd (standard error ~0.07%)
    assert float((out.abs() < sd).float().mean()) == pytest.approx(0.6827, abs=0.004)
    # A second release draws fresh noise.
    agg.reset()
    assert float(torch.corrcoef(torch.stack([out, agg.result()]))[0, 1]) == pytest.approx(0.0, abs=0.01)


def test_gaussian_sum_noise_for_the_secure_aggregators():
    noise = GaussianSumNoise(clip_norm=2.0, noise_multiplier=0.5, seed=1)
    first = noise(torch.zeros(200_000))
    assert float(first.std()) == pytest.approx(1.0, rel=0.01) and noise.releases == 1
    assert not torch.equal(first, noise(torch.zeros(200_000)))
    assert torch.equal(first, GaussianSumNoise(2.0, 0.5, seed=1)(torch.zeros(200_000)))  # replays from the seed...
    secure = [GaussianSumNoise(2.0, 0.5, seed=1, secure_noise=True)(torch.zeros(1000)) for _ in range(2)]
    assert not torch.equal(secure[0], secure[1])  # ...unless secure


def test_adaptive_clipping_splits_the_noise_and_moves_S_towards_the_quantile():
    z, sb = 1.0, 5.0
    zd = delta_noise_multiplier(z, sb)
    assert (zd**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z)  # the pair composes to one Gaussian of z
    n = 200_000
    agg = DPFedAvg(
        n,
        clip_norm=1.0,
        noise_multiplier=z,
        expected_cohort=10,
        seed=0,
        adaptive=AdaptiveClippingSpec(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=sb),
    )
    agg.reset()
    out = agg.result()
    assert float(out.std()) == pytest.approx(zd * 1.0 / 10, rel=0.01)
    # Every update far below S: S shrinks; far above: S grows (noise on the count is small vs cohort 100).
    norms = []
    agg = DPFedAvg(
        4,
        clip_norm=1.0,
        noise_multiplier=0.5,
        expected_cohort=100,
        seed=0,
        adaptive=AdaptiveClippingSpec(count_noise_multiplier=5.0),
    )
    for _ in range(30):
        agg.reset()
        for c in range(100):
            agg.add(torch.full((4,), 0.05), 1.0, c)  # norm 0.1
        agg.result()
        norms.append(agg.clip_norm)
    assert norms[-1] < 0.3 and norms[0] < 1.0
    with pytest.raises(PrivacyError, match="count_noise_multiplier"):
        delta_noise_multiplier(2.0, 0.9)


def test_a_huge_update_moves_the_model_by_at_most_S_over_cohort():
    S, m = 0.5, 4
    agg = DPFedAvg(6, clip_norm=S, noise_multiplier=0.0, expected_cohort=m)
    agg.reset()
    agg.add(torch.full((6,), 1e6), 1.0, 0)
    assert float(agg.result().norm()) == pytest.approx(S / m, rel=1e-5)

    # Through a whole round: one client sends a huge delta, the others nothing.
    class Stub(LocalTrainer):
        def train(self, dataset, client, start, seed, delta_out):
            delta_out.zero_()
            if client == huge:
                delta_out.fill_(1e8)
            return ClientResult(client, dataset.num_train(client), 1, 1, 0.0)

    ds = synthetic_dataset(num_clients=8)
    kw = dict(model=mlp(), dataset=ds, loss_fn=F.cross_entropy, cohort=m, weighting="uniform")
    parts = PrivacyParts(
        {"user_level": {"clip_norm": S, "noise_multiplier": 0.0, "delta": 0.01}}, SyncFedAvg.shape(**kw), rounds=1
    )
    private = parts.wrap(SyncFedAvg(**kw, components=parts.components.merged(Components(client_update=Stub))))
    from flotilla.sim.sync import sample_cohort

    huge = int(sample_cohort(0, 0, 8, m)[0])
    before = private.weights.clone()
    private.step()
    moved = float((private.weights - before).norm())
    assert moved == pytest.approx(S / m, rel=1e-5)


def test_poisson_cohorts_and_an_empty_cohort_still_releases_noise():
    sizes = [len(poisson_cohort(1, r, 1000, 20)) for r in range(300)]
    assert np.mean(sizes) == pytest.approx(20, abs=1.0) and len(set(sizes)) > 5
    ds = synthetic_dataset(num_clients=200, per_client=2)
    kw = dict(
        model=mlp(), dataset=ds, loss_fn=F.cross_entropy, cohort=1, weighting="uniform", client=ClientSpec(steps=1)
    )
    private = make_private(
        SyncFedAvg, kw, {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling": "poisson"}}, rounds=10
    )
    empty = next(r for r in range(10) if len(poisson_cohort(0, r, 200, 1)) == 0)  # P(empty) = (1 - 1/200)^200 ~ 37%
    for _ in range(empty):
        private.step()
    before = private.weights.clone()
    record = private.step()
    assert record["clients"] == 0 and not torch.equal(before, private.weights)


# --- budget, resume ---------------------------------------------------------------------------
def test_training_stops_cleanly_when_the_budget_is_spent(tmp_path):
    ds = synthetic_dataset(num_clients=20, per_client=4)
    spec = {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "max_epsilon": 3.0, "delta": 1e-3}}
    result = train(
        mlp(), ds, rounds=100, cohort=4, privacy=spec, client={"steps": 1, "batch_size": 4}, eval={"every": 5}
    )
    last = result.history[-1]
    n = len(result.history)
    assert 1 < n < 100 and last["privacy_budget_spent"] is True
    assert last["epsilon"] <= 3.0 < epsilon(1.0, 0.2, n + 1, 1e-3)
    assert "accuracy" in last and last["accuracy"] is not None  # the final (budget) step is evaluated
    with pytest.raises(PrivacyError, match="budget"):
        train(
            mlp(),
            ds,
            rounds=10,
            cohort=4,
            privacy={"user_level": {"clip_norm": 1.0, "noise_multiplier": 0.1, "max_epsilon": 0.5}},
        )
    # a budget that does not bind: all rounds run and nothing is flagged
    loose = train(
        mlp(),
        ds,
        rounds=3,
        cohort=4,
        privacy={"user_level": {**spec["user_level"], "max_epsilon": 50.0}},
        client={"steps": 1, "batch_size": 4},
    )
    assert len(loose.history) == 3 and "privacy_budget_spent" not in loose.history[-1]


def test_resume_is_bit_identical_with_adaptive_clipping_and_dp_sgd(tmp_path):
    ds = synthetic_dataset(num_clients=20, per_client=6)
    spec = {
        "sample_level": {"noise_multiplier": 0.8, "max_grad_norm": 1.0},
        "user_level": {
            "clip_norm": 0.3,
            "noise_multiplier": 1.0,
            "sampling": "poisson",
            "adaptive_clipping": {"count_noise_multiplier": 2.0},
        },
    }
    kw = dict(cohort=3, privacy=spec, client={"epochs": 1, "batch_size": 3}, output={"checkpoint_every": 1})
    full = train(mlp(), ds, rounds=3, run_dir=tmp_path / "full", **kw)
    train(mlp(), ds, rounds=2, run_dir=tmp_path / "part", **kw)
    resumed = train(mlp(), ds, rounds=3, run_dir=tmp_path / "part", resume=True, **kw)
    assert torch.equal(full.weights, resumed.weights)
    assert full.history[-1]["clip_norm"] == resumed.history[-1]["clip_norm"] != 0.3
    assert full.history[-1]["sample_epsilon_max"] > 0


# --- sample level: DP-SGD on the client -------------------------------------------------------
def test_dp_trainer_without_noise_or_clipping_is_full_batch_sgd():
    """sigma=0, huge C and q=1 (batch >= client size): DP-SGD is exactly full-batch SGD, which checks
    the per-sample gradients, the normalisation by the expected batch and the flat binding."""
    ds = synthetic_dataset()
    m1, m2 = mlp(), mlp()
    f1, f2 = FlatModel(m1), FlatModel(m2)
    spec = ClientSpec(steps=5, batch_size=100, lr=0.5, momentum=0.5)
    plain = LocalTrainer(f1, F.cross_entropy, spec)
    private = DPLocalTrainer(f2, F.cross_entropy, spec, SampleLevelSpec(noise_multiplier=0.0, max_grad_norm=1e9))
    start = f1.flat.clone()
    d1, d2 = torch.empty_like(start), torch.empty_like(start)
    plain.train(ds, 3, start, 7, d1)
    r = private.train(ds, 3, start, 7, d2)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)
    assert (r.sample_rate, r.steps, r.examples_seen) == (1.0, 5, 100) and r.epsilon == math.inf
    # the trainer leaves parameters and grads bound to the flat vectors
    assert all(p.grad.data_ptr() >= f2.grad.data_ptr() for p in f2.params)
    f2.flat.add_(1.0)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in f2.params]), f2.flat)


def test_dp_sgd_clips_per_example_and_reports_the_clients_epsilon():
    ds = synthetic_dataset(per_client=40)
    f = FlatModel(mlp())
    C, lr = 1e-3, 1.0
    t = DPLocalTrainer(
        f,
        F.cross_entropy,
        ClientSpec(steps=1, batch_size=1000, lr=lr),
        SampleLevelSpec(noise_multiplier=0.0, max_grad_norm=C),
    )
    start, d = f.flat.clone(), torch.empty(f.numel)
    t.train(ds, 0, start, 1, d)
    assert 0 < float(d.norm()) <= lr * C * (1 + 1e-4)  # mean of 40 clipped gradients: norm <= C
    t.close()  # one private trainer per model at a time: Opacus' hooks are removed here
    # with noise: reproducible per seed, and the result carries Opacus' epsilon for (sigma, q, steps)
    t = DPLocalTrainer(
        f,
        F.cross_entropy,
        ClientSpec(epochs=2, batch_size=10, lr=0.1),
        SampleLevelSpec(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-4),
    )
    a, b = torch.empty(f.numel), torch.empty(f.numel)
    r = t.train(ds, 2, start, 5, a)
    t.train(ds, 2, start, 5, b)
    assert torch.equal(a, b) and (r.sample_rate, r.steps) == (0.25, 8)
    assert r.epsilon == pytest.approx(epsilon(1.1, 0.25, 8, 1e-4))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_char_lstm_becomes_dplstm_and_per_sample_grads_work_on_the_flat_model():
    from opacus import GradSampleModule
    from opacus.layers import DPLSTM

    torch.manual_seed(0)
    model = CharLSTM(vocab_size=20, embed_dim=4, hidden=8, layers=2)
    x = torch.randint(0, 20, (5, 7))
    y = torch.randint(0, 20, (5,))
    with torch.no_grad():
        before = model(x)
    same = make_dp_compatible(model)
    assert same is model and isinstance(model.lstm, DPLSTM)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # same weights, same function
    flat = FlatModel(model)
    gsm = GradSampleModule(model)
    F.cross_entropy(gsm(x), y).backward()
    per_sample = torch.cat([p.grad_sample.reshape(5, -1) for p in flat.params], dim=1)
    for p in flat.params:
        p.grad_sample = None
    for i in range(5):
        flat.grad.zero_()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(per_sample[i], flat.grad, rtol=1e-4, atol=1e-6)
    gsm.to_standard_module()
    with pytest.raises(PrivacyError, match="BatchNorm|buffers|batch"):
        make_dp_compatible(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))


def test_dp_sgd_on_the_lstm_through_the_trainer():
    torch.manual_seed(0)
    model = make_dp_compatible(CharLSTM(vocab_size=12, embed_dim=3, hidden=6))
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randint(0, 12, (40, 5), generator=g), torch.randint(0, 12, (40,), generator=g)
    from flotilla.core.dataset import FederatedDataset

    ds = FederatedDataset("chars", lambda i: (xs[i], ys[i]), [torch.arange(0, 20), torch.arange(20, 40)])
    f = FlatModel(model)
    t = DPLocalTrainer(f, F.cross_entropy, ClientSpec(epochs=1, batch_size=5), SampleLevelSpec(noise_multiplier=1.0))
    d = torch.empty(f.numel)
    r = t.train(ds, 1, f.flat.clone(), 0, d)
    assert r.steps == 4 and float(d.norm()) > 0 and torch.isfinite(d).all()
    with pytest.raises(PrivacyError, match="make_dp_compatible"):
        DPLocalTrainer(FlatModel(CharLSTM(12, 3, 6)), F.cross_entropy, ClientSpec(), SampleLevelSpec())


# --- refusals -------------------------------------------------------------------------------------
BASE = {"task": {"name": "fashion-mnist", "num_clients": 100}, "rounds": 10}


@pytest.mark.parametrize(
    "privacy, extra, message",
    [
        (
            {"user_level": {"clip_norm": 0, "noise_multiplier": 1.0}},
            {},
            r"privacy\.user_level\.clip_norm: Input should be greater than 0",
        ),
        ({"user_level": {"clip_norm": -1, "noise_multiplier": 1.0}}, {}, r"privacy\.user_level\.clip_norm"),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1.0, "delta": 0.01}},
            {},
            r"privacy\.user_level\.delta: 0\.01 is not below 1/population = 1/100",
        ),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1.0, "target_epsilon": 2}},
            {},
            "exactly one of noise_multiplier and target_epsilon",
        ),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1.0}},
            {"weighting": "examples"},
            r"weighting: user-level DP needs weighting: uniform",
        ),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1.0}},
            {"mode": "async", "async": {"algorithm": "fedasync"}},
            "not async.algorithm=fedasync",
        ),
        ({"sample_level": {}}, {"workers": 2}, r"privacy: DP trains every client in one process; set workers: 1"),
        ({}, {}, "privacy: give sample_level and/or user_level"),
        ({"sample_level": {"max_grad_norm": 0}}, {}, r"privacy\.sample_level\.max_grad_norm"),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1, "sampling": "sometimes"}},
            {},
            r"privacy\.user_level\.sampling",
        ),
    ],
)
def test_config_refusals_name_the_key_and_the_reason(privacy, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate({**BASE, "privacy": privacy, **extra})


def test_api_refusals_happen_before_anything_is_built():
    ds = synthetic_dataset(num_clients=20)
    built = []

    class Recording(SyncFedAvg):
        def __init__(self, **kw):
            built.append(1)
            super().__init__(**kw)

    kw = dict(model=mlp(), dataset=ds, loss_fn=F.cross_entropy, cohort=4, weighting="uniform")
    for spec, message in [
        ({"user_level": {"clip_norm": 1, "target_epsilon": 1e-7, "delta": 1e-5}}, "cannot be met in 10 steps"),
        ({"user_level": {"clip_norm": 1, "noise_multiplier": 1, "delta": 0.05}}, "not below 1/population"),
        (
            {"user_level": {"clip_norm": 1, "noise_multiplier": 0.5, "adaptive_clipping": {}}, "sample_level": {}},
            "count_noise_multiplier",
        ),
    ]:
        with pytest.raises(PrivacyError, match=message):
            make_private(Recording, kw, spec, rounds=10)
    assert built == []
    with pytest.raises(PrivacyError, match="weighting='uniform'"):
        make_private(
            SyncFedAvg,
            {**kw, "weighting": "examples"},
            {"user_level": {"clip_norm": 1, "noise_multiplier": 1}},
            rounds=5,
        )
    per_update = Shape("FedAsync", "per_update", "first_arrivals", 1, 20, ds, "uniform", 0)
    with pytest.raises(PrivacyError, match="not covered"):
        PrivacyParts({"user_level": {"clip_norm": 1, "noise_multiplier": 1}}, per_update, rounds=5)
    with pytest.raises(PrivacyError, match="clip_norm"):
        PrivacySpec.from_dict({"user_level": {"clip_norm": 0.0, "noise_multiplier": 1}})
