"""Client algorithms (flotilla/algorithms): each checked against its paper's update rule by a hand
computation on a linear model, resumed bit-identically, and refused where it cannot work."""

import numpy as np
import pytest
import torch
from torch import nn

import flotilla
from flotilla.algorithms import Setting, algorithm_parts
from flotilla.algorithms.finetune import PersonalizeConfig, PersonalizedEvaluation, finetune_spec
from flotilla.algorithms.scaffold import ScaffoldConfig
from flotilla.algorithms.store import DiskStore, MemoryStore, load_store_state, store_state
from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientSpec, LocalTrainer
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.experiment.compose import build_algorithm
from flotilla.sim.sync import SyncFedAvg, sample_cohort
from flotilla.tasks import Task
from tests.helpers import synthetic_dataset

DIM = 3


def regression_data(sizes=(4, 6, 5), seed=0) -> tuple[FederatedDataset, list[tuple[np.ndarray, np.ndarray]]]:
    """Linear regression clients with different optima (heterogeneous), and their data in numpy."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, train, start = [], [], [], 0
    for i, n in enumerate(sizes):
        x = torch.randn(n, DIM, generator=g)
        w_i = torch.randn(DIM, generator=g) * (i + 1)
        xs.append(x)
        ys.append(x @ w_i)
        train.append(torch.arange(start, start + n))
        start += n
    X, Y = torch.cat(xs), torch.cat(ys)
    ds = FederatedDataset("regression", lambda idx: (X[idx], Y[idx]), train, train)
    return ds, [(x.double().numpy(), y.double().numpy()) for x, y in zip(xs, ys)]


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean() / 2  # gradient: X^T (X w - y) / n


def linear(seed=1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(DIM, 1, bias=False)


def grad(w, x, y):
    return x.T @ (x @ w - y) / len(y)


# A client's whole data is one batch (batch_size >= its size): the hand computation needs no shuffling order.
SPEC = ClientSpec(steps=2, batch_size=100, lr=0.1)


def build(ds, algorithm, cohort=2, weighting="examples", classify=False, **kw):
    """SyncFedAvg with ``algorithm`` composed in: a linear regression, or (classify) a 5 -> 3 classifier."""
    model, loss = (linear_cls(), nn.functional.cross_entropy) if classify else (linear(), mse)
    kwargs = dict(
        model=model,
        dataset=ds,
        loss_fn=loss,
        cohort=cohort,
        client=SPEC,
        server=ServerOptimizerSpec(),
        weighting=weighting,
        seed=5,
    )
    return build_algorithm(SyncFedAvg, kwargs, client_algorithm=algorithm, rounds=10, **kw)[0]


def fedavg_mean(w, deltas, sizes):
    return w + sum(n * d for n, d in zip(sizes, deltas)) / sum(sizes)


# -- FedProx -------------------------------------------------------------------------------------
def test_fedprox_matches_its_local_objective_by_hand():
    ds, data = regression_data()
    mu = 0.5
    alg = build(ds, {"name": "fedprox", "mu": mu})
    w = alg.weights.double().numpy().copy()
    for r in range(2):
        deltas, sizes = [], []
        for c in sample_cohort(5, r, ds.num_clients, 2).tolist():
            x, y = data[c]
            v = w.copy()
            for _ in range(SPEC.steps):  # grad of F_k + mu/2 ||v - w||^2
                v = v - SPEC.lr * (grad(v, x, y) + mu * (v - w))
            deltas.append(v - w)
            sizes.append(len(y))
        w = fedavg_mean(w, deltas, sizes)
        alg.step()
        np.testing.assert_allclose(alg.weights.double().numpy(), w, rtol=1e-5, atol=1e-6)
    # and it is not FedAvg: the proximal term changed the result
    plain = build(ds, None)
    for _ in range(2):
        plain.step()
    assert not torch.allclose(plain.weights, alg.weights, atol=1e-4)


def test_fedprox_mu_zero_is_fedavg_bit_for_bit():
    ds = synthetic_dataset()
    a, b = build(ds, {"name": "fedprox", "mu": 0.0}, classify=True), build(ds, None, classify=True)
    assert type(a.trainer) is LocalTrainer  # mu = 0 swaps nothing in
    for _ in range(2):
        a.step(), b.step()
    assert torch.equal(a.weights, b.weights)


# -- SCAFFOLD -----------------------------------------------------------------------------------
def test_scaffold_matches_option_two_by_hand():
    ds, data = regression_data()
    N = ds.num_clients
    alg = build(ds, {"name": "scaffold"})
    w = alg.weights.double().numpy().copy()
    c = np.zeros(DIM)
    ci = {}
    K, lr = SPEC.steps, SPEC.lr
    for r in range(3):
        deltas, sizes, dcs = [], [], []
        for i in sample_cohort(5, r, N, 2).tolist():
            x, y = data[i]
            c_i = ci.get(i, np.zeros(DIM))
            v = w.copy()
            for _ in range(K):  # y <- y - lr (g_i(y) - c_i + c)
                v = v - lr * (grad(v, x, y) - c_i + c)
            new = c_i - c + (w - v) / (K * lr)  # option II
            dcs.append(new - c_i)
            ci[i] = new
            deltas.append(v - w)
            sizes.append(len(y))
        w = fedavg_mean(w, deltas, sizes)  # x <- x + mean(delta y) (examples-weighted here)
        c = c + len(dcs) / N * np.mean(dcs, axis=0)  # c <- c + |S|/N mean(delta c_i), unweighted
        alg.step()
        np.testing.assert_allclose(alg.weights.double().numpy(), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(alg.variates.c.double().numpy(), c, rtol=1e-5, atol=1e-6)
        for i, v in ci.items():
            got = torch.empty(DIM)
            assert alg.variates.store.get(i, got)
            np.testing.assert_allclose(got.double().numpy(), v, rtol=1e-5, atol=1e-6)
    assert len(ci) == N  # every client was seen over 3 rounds: round 1 was FedAvg, later ones were corrected


def test_scaffold_first_round_is_fedavg_and_later_rounds_are_not():
    ds = synthetic_dataset()
    a, b = build(ds, {"name": "scaffold"}, classify=True), build(ds, None, classify=True)
    a.step(), b.step()
    assert torch.equal(a.weights, b.weights)  # c = c_i = 0: no correction yet
    a.step(), b.step()
    assert not torch.equal(a.weights, b.weights)


def test_scaffold_update_never_accepted_changes_no_variate():
    # A client with no training data trains nothing: its c_i is not stored and c does not move for it.
    ds, _ = regression_data(sizes=(4, 0, 5))
    alg = build(ds, {"name": "scaffold"}, cohort=3)
    alg.step()
    assert alg.variates.store.clients() == [0, 2]


def _fleet_run(extra, rounds, run_dir=None, resume=False, ds=None):
    ds = ds or synthetic_dataset(num_clients=10)
    return flotilla.train(linear_cls(), ds, rounds=rounds, run_dir=run_dir, resume=resume, seed=2, **extra)


def linear_cls():
    torch.manual_seed(0)
    return nn.Linear(5, 3)


FLEETS = {
    "sync": {"cohort": 3},
    "fleet-sync": {"cohort": 3, "fleet": {"population": 40}},
    "fedbuff": {"mode": "async", "fleet": {"population": 40}, "async": {"concurrency": 5, "buffer_size": 3}},
}


@pytest.mark.parametrize("where", list(FLEETS))
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_scaffold_resumes_bit_identically(tmp_path, where, store):
    extra = {
        **FLEETS[where],
        "client": {"lr": 0.1, "algorithm": {"name": "scaffold", "store": store, "store_dir": str(tmp_path / "cv")}},
        "eval": {"every": 100},
    }
    full = _fleet_run(extra, 4)
    _fleet_run(extra, 2, run_dir=tmp_path / "run")
    resumed = _fleet_run(extra, 4, run_dir=tmp_path / "run", resume=True)
    assert torch.equal(full.weights, resumed.weights)
    assert resumed.history[-1]["scaffold_c_norm"] == full.history[-1]["scaffold_c_norm"] > 0
    assert not any((tmp_path / "cv").glob("*"))  # the disk store's file is removed when the run closes


@pytest.mark.parametrize("where", ["fleet-sync", "fedbuff"])
def test_scaffold_server_variate_is_the_mean_of_the_clients_in_the_fleet(where):
    from flotilla.experiment.run import build as build_run

    cfg = validate(
        {
            "task": {"name": "python"},
            "rounds": 3,
            "seed": 1,
            **FLEETS[where],
            "client": {"algorithm": {"name": "scaffold"}},
        }
    )
    task = Task("python", synthetic_dataset(num_clients=10), linear_cls(), nn.functional.cross_entropy)
    alg = build_run(cfg, task)[0]
    for _ in range(3):
        alg.step()
        cv = alg.variates
        ids = cv.store.clients()
        assert ids
        total = torch.zeros_like(cv.c)
        row = torch.empty_like(cv.c)
        for i in ids:
            cv.store.get(i, row)
            total += row
        # c + (accepted, unreleased delta c_i) / N == mean over all N clients of c_i
        torch.testing.assert_close(cv.c + cv.pending / 10, total / 10, rtol=1e-5, atol=1e-6)


def test_fedprox_resumes_bit_identically(tmp_path):
    extra = {"cohort": 3, "client": {"algorithm": {"name": "fedprox", "mu": 0.3}}}
    full = _fleet_run(extra, 4)
    _fleet_run(extra, 2, run_dir=tmp_path / "run")
    assert torch.equal(full.weights, _fleet_run(extra, 4, run_dir=tmp_path / "run", resume=True).weights)


def test_scaffold_checkpoint_without_its_state_is_refused(tmp_path):
    _fleet_run({"cohort": 3}, 2, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="no SCAFFOLD state"):
        _fleet_run(
            {"cohort": 3, "client": {"algorithm": {"name": "scaffold"}}}, 4, run_dir=tmp_path / "run", resume=True
        )


# -- the per-client store ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_store_holds_only_clients_written(tmp_path, kind):
    store = MemoryStore(4) if kind == "memory" else DiskStore(4, tmp_path)
    out = torch.full((4,), 7.0)
    assert not store.get(10**9, out) and torch.equal(out, torch.full((4,), 7.0))  # never seen: nothing stored
    if kind == "disk":
        assert not list(tmp_path.iterdir())  # the file is created lazily
    store.put(10**9, torch.arange(4.0))
    store.put(3, torch.ones(4))
    store.put(10**9, torch.arange(4.0) * 2)  # rewritten in place
    assert store.get(10**9, out) and torch.equal(out, torch.arange(4.0) * 2)
    if kind == "disk":
        assert store.path.stat().st_size == 2 * 4 * 4  # two rows: the file grows with clients seen, not ids
    state = store_state(store, "x.")
    other = MemoryStore(4) if kind == "disk" else DiskStore(4, tmp_path)
    load_store_state(other, state, "x.")
    assert other.clients() == [3, 10**9] and other.get(3, out) and torch.equal(out, torch.ones(4))
    store.close(), other.close()
    assert not list(tmp_path.iterdir())


def test_scaffold_auto_store_goes_to_disk_for_large_populations():
    from flotilla.algorithms.scaffold import ScaffoldParts
    from flotilla.core.protocols import Shape

    big = Shape("x", "round", "uniform", 10, 10**8, None, "uniform", 0)
    small = Shape("x", "round", "uniform", 10, 100, None, "uniform", 0)
    cfg = ScaffoldConfig(name="scaffold")
    assert isinstance(ScaffoldParts(cfg, big)._variates(10).store, DiskStore)
    assert isinstance(ScaffoldParts(cfg, small)._variates(10).store, MemoryStore)


# -- personalisation ---------------------------------------------------------------------------------
def test_personalized_evaluation_fine_tunes_each_client_by_hand():
    ds, data = regression_data()
    flat = FlatModel(linear())
    w = flat.flat.clone()
    spec = finetune_spec(PersonalizeConfig(steps=3, lr=0.2), SPEC)
    assert (spec.steps, spec.lr, spec.batch_size) == (3, 0.2, SPEC.batch_size)
    ev = PersonalizedEvaluation(flat, ds, [0, 1, 2], mse, spec, seed=0)
    got = ev(w)
    total = 0.0
    wn = w.double().numpy()
    for x, y in data:
        v = wn.copy()
        for _ in range(3):
            v = v - 0.2 * grad(v, x, y)
        total += ((x @ v - y) ** 2 / 2).sum()  # tested on its own (here: its training) data
    assert got["personal_loss"] == pytest.approx(total / sum(len(y) for _, y in data), rel=1e-5)
    assert torch.equal(flat.flat, w)  # the shared model is left as given


def test_personalized_metrics_reported_next_to_global_ones():
    ds = synthetic_dataset(num_clients=6)
    r = flotilla.train(linear_cls(), ds, rounds=2, cohort=3, eval={"personalize": {"steps": 10}})
    last = r.history[-1]
    assert {"accuracy", "personal_accuracy", "personal_loss", "personal_client_acc_p10"} <= set(last)
    assert last["personal_accuracy"] > last["accuracy"]  # each client's own labels: fine-tuning helps
    plain = flotilla.train(linear_cls(), ds, rounds=2, cohort=3)
    assert torch.equal(plain.weights, r.weights)  # evaluation never changes training


# -- config and refusals ------------------------------------------------------------------------------
BASE = {"task": {"name": "fashion-mnist", "num_clients": 20}, "rounds": 2}


def test_config_reads_the_algorithm_section():
    cfg = validate({**BASE, "client": {"algorithm": {"name": "fedprox", "mu": 0.05}}})
    assert cfg.client.algorithm.name == "fedprox" and cfg.client.algorithm.mu == 0.05
    assert validate({**BASE}).client.algorithm is None
    dumped = cfg.model_dump(mode="json")
    assert validate(dumped).client.algorithm == cfg.client.algorithm  # the saved config validates back


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"client": {"algorithm": {"name": "foo"}}}, "client.algorithm: Input tag 'foo'"),
        ({"client": {"algorithm": {"name": "fedprox", "mu": -1}}}, "client.algorithm.mu: Input should be greater"),
        ({"client": {"algorithm": {"name": "scaffold", "extra": 1}}}, "client.algorithm.extra: unknown key"),
        (
            {
                "client": {"algorithm": {"name": "fedprox"}},
                "privacy": {"sample_level": {"noise_multiplier": 1, "max_grad_norm": 1}},
            },
            "client.algorithm: fedprox changes the local step",
        ),
        (
            {
                "client": {"algorithm": {"name": "scaffold"}},
                "privacy": {"user_level": {"clip_norm": 1, "noise_multiplier": 1}},
            },
            "would not be differentially private",
        ),
        ({"client": {"algorithm": {"name": "scaffold"}}, "secure_aggregation": {}}, "secure aggregation would hide"),
        (
            {"client": {"algorithm": {"name": "scaffold"}}, "mode": "async", "async": {"algorithm": "fedasync"}},
            "async.algorithm: fedasync applies every update on its own",
        ),
        ({"client": {"algorithm": {"name": "scaffold"}}, "workers": 2}, "(workers: 1)"),
        ({"client": {"algorithm": {"name": "fedprox"}}, "workers": 2}, "(workers: 1)"),
        ({"eval": {"personalize": {"steps": 0}}}, "eval.personalize.steps"),
        (
            {
                "eval": {"personalize": {"steps": 2}},
                "privacy": {"sample_level": {"noise_multiplier": 1, "max_grad_norm": 1}},
            },
            "eval.personalize: fine-tunes the shared model",
        ),
    ],
)
def test_config_refusals(extra, message):
    with pytest.raises(ConfigError) as e:
        validate({**BASE, **extra})
    assert message in str(e.value), str(e.value)


def test_user_level_dp_with_fedprox_composes():
    cfg = validate(
        {
            **BASE,
            "client": {"algorithm": {"name": "fedprox"}},
            "privacy": {"user_level": {"clip_norm": 1, "noise_multiplier": 1}},
        }
    )
    assert cfg.client.algorithm.name == "fedprox"


def test_build_refuses_what_config_would_and_clashing_components():
    ds = synthetic_dataset()
    with pytest.raises(ValueError, match="secure aggregation would hide"):
        build(ds, {"name": "scaffold"}, classify=True, secure_aggregation={})
    with pytest.raises(ValueError, match="replaces the local step"):
        build(
            ds,
            {"name": "fedprox", "mu": 0.1},
            classify=True,
            privacy={"sample_level": {"noise_multiplier": 1, "max_grad_norm": 1}},
        )
    from flotilla.sim.parallel import ParallelFedAvg

    kwargs = dict(model=linear_cls(), dataset=ds, loss_fn=nn.functional.cross_entropy, cohort=2, workers=2)
    with pytest.raises(ValueError, match="(workers: 1)"):
        build_algorithm(ParallelFedAvg, kwargs, client_algorithm={"name": "scaffold"}, rounds=1)
    shape = SyncFedAvg.shape(dataset=ds, cohort=2)
    assert algorithm_parts({"name": "fedavg"}, shape, Setting.of(shape)).components.given() == []


def test_serve_takes_fedprox_and_scaffold_and_refuses_personalized_evaluation():
    """FedProx and SCAFFOLD run over the network (tests/test_network_algorithms.py): serve gets past
    them to the network files; eval.personalize is still refused."""
    from flotilla.experiment.serve import server_from_config

    net = {"tls": {"cert": "c.pem", "key": "k.pem"}, "tokens": "t.txt"}
    for algorithm in ({"name": "scaffold"}, {"name": "fedprox", "mu": 0.1}):
        try:
            cfg = validate({**BASE, "client": {"algorithm": algorithm}, "network": net})
        except ConfigError as e:  # the network section's own checks (files exist) may come first
            pytest.skip(f"network section not valid here: {e}")
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            server_from_config(cfg)
        assert not isinstance(e.value, ConfigError) and "network" in str(e.value), e.value
    cfg = validate({**BASE, "eval": {"personalize": {"steps": 2}}, "network": net})
    with pytest.raises(ConfigError, match="eval.personalize"):
        server_from_config(cfg)


def test_train_reaches_the_algorithms_by_yaml_names():
    ds = synthetic_dataset(num_clients=6)
    r = flotilla.train(linear_cls(), ds, rounds=2, cohort=3, client={"algorithm": {"name": "scaffold"}})
    assert r.history[-1]["scaffold_clients"] > 0
    with pytest.raises(ConfigError, match="client.algorithm.mu"):
        flotilla.train(linear_cls(), ds, rounds=1, client={"algorithm": {"name": "fedprox", "mu": "x"}})


def test_disk_store_file_goes_with_the_store_even_unclosed(tmp_path):
    import gc

    store = DiskStore(4, tmp_path)
    store.put(1, torch.ones(4))
    assert len(list(tmp_path.iterdir())) == 1
    del store
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_fedprox_runs_under_user_level_dp_and_secure_aggregation():
    from flotilla.algorithms.fedprox import FedProxTrainer
    from flotilla.secure.aggregator import SecureAggregator

    alg = build(
        synthetic_dataset(num_clients=6),
        {"name": "fedprox", "mu": 0.1},
        cohort=3,
        weighting="uniform",
        classify=True,
        privacy={"user_level": {"clip_norm": 1.0, "noise_multiplier": 0.5, "delta": 1e-3}},
        secure_aggregation={},
    )
    assert type(alg.inner.trainer) is FedProxTrainer and isinstance(alg.inner.aggregator, SecureAggregator)
    record = alg.step()
    assert record["epsilon"] > 0 and torch.isfinite(alg.weights).all()


def test_help_lists_each_algorithm_and_its_keys():
    from flotilla.config import describe_options

    lines = describe_options()
    assert any(line.startswith("client.algorithm (name: scaffold): SCAFFOLD") for line in lines)
    assert any(line.startswith("  client.algorithm.mu: float, default 0.01") for line in lines)
    assert any(line.startswith("  eval.personalize.steps:") for line in lines)
    assert not any("Annotated[" in line for line in lines)
