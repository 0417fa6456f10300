"""client.vectorize: K clients trained at once on stacked weights equal the sequential LocalTrainer.

Tolerance: per-client deltas agree to 1e-6 absolute (measured ~4e-8 here: the batched
convolution and matmul sum in another order than K separate calls)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flotilla.config import ConfigError
from flotilla.core.client import ClientSpec, LocalTrainer, client_seed
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel
from flotilla.core.vectorized import VectorizedTrainer
from flotilla.sim.sync import SyncFedAvg
from flotilla.tasks.models import CharLSTM, SmallCNN

TOL = 1e-6
SIZES = [13, 5, 22, 0, 9, 6]  # unequal: clients run out of steps at different times (and one has none)


def _images(sizes=SIZES, seed=0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x, y = torch.randn(2 * n, 1, 28, 28, generator=g), torch.randint(0, 10, (2 * n,), generator=g)
    train, test, o = [], [], 0
    for s in sizes:
        train.append(torch.arange(o, o + s))
        test.append(n + torch.arange(o, o + s))
        o += s
    return FederatedDataset("images", lambda i: (x[i], y[i]), train, test)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def _both(make_model, spec: ClientSpec, k: int, dataset=None):
    """(sequential deltas, results), (vectorized deltas, results) for every client of the dataset."""
    dataset = dataset or _images()
    torch.manual_seed(1)
    flat = FlatModel(make_model())
    start = flat.flat.clone()
    clients = list(range(dataset.num_clients))
    seeds = [client_seed(5, 2, c) for c in clients]
    seq = torch.empty(len(clients), flat.numel)
    seq_results = [
        LocalTrainer(flat, F.cross_entropy, spec).train(dataset, c, start, s, seq[i])
        for i, (c, s) in enumerate(zip(clients, seeds))
    ]
    vec = torch.full((len(clients), flat.numel), float("nan"))
    before = flat.flat.clone()
    trainer = VectorizedTrainer(flat, F.cross_entropy, spec, k)
    vec_results = []
    for lo in range(0, len(clients), k):
        vec_results += trainer.train(dataset, clients[lo : lo + k], start, seeds[lo : lo + k], vec[lo : lo + k])
    assert torch.equal(flat.flat, before)  # the vectorized path never touches the model's own weights
    return (seq, seq_results), (vec, vec_results)


@pytest.mark.parametrize("make_model", [SmallCNN, _mlp], ids=["SmallCNN", "MLP"])
@pytest.mark.parametrize(
    "spec",
    [
        ClientSpec(epochs=2, batch_size=8, lr=0.05),
        ClientSpec(steps=4, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["epochs", "steps+momentum"],
)
def test_vectorized_deltas_equal_sequential(make_model, spec):
    (seq, seq_r), (vec, vec_r) = _both(make_model, spec, k=4)  # 6 clients: a group of 4, then one of 2
    assert (vec - seq).abs().max().item() <= TOL
    assert seq.abs().max().item() > 1e-3  # they did train
    for a, b in zip(seq_r, vec_r):
        assert (a.client, a.num_examples, a.examples_seen, a.steps) == (
            b.client,
            b.num_examples,
            b.examples_seen,
            b.steps,
        )
        assert abs(a.loss - b.loss) <= 1e-5
    # Early finishers are masked: in epochs mode client 1 (5 examples) takes 2 steps, client 2 takes 6.
    if spec.steps is None:
        assert [r.steps for r in vec_r] == [4, 2, 6, 0, 4, 2]
        assert torch.equal(vec[3], torch.zeros_like(vec[3]))  # no data: no change at all


def test_vectorized_round_matches_sequential_round():
    data = _images([12, 30, 5, 18, 25, 9, 14, 3])
    spec = ClientSpec(epochs=1, batch_size=10, lr=0.05)
    runs = []
    for k in (1, 3):
        torch.manual_seed(0)
        alg = SyncFedAvg(SmallCNN(), data, F.cross_entropy, cohort=7, client=spec, seed=3, vectorize=k)
        records = [alg.step() for _ in range(2)]
        runs.append((alg.weights.clone(), records))
    (w1, r1), (w3, r3) = runs
    assert (w1 - w3).abs().max().item() <= TOL
    assert [r["examples_seen"] for r in r1] == [r["examples_seen"] for r in r3]
    assert abs(r1[-1]["train_loss"] - r3[-1]["train_loss"]) <= 1e-5


def test_vectorize_refuses_what_it_cannot_stack():
    data = _images([10, 10])
    with pytest.raises(
        ValueError, match=r"client.vectorize: must be an integer >= 1 \(1: one client after another\), got 0"
    ):
        SyncFedAvg(_mlp(), data, F.cross_entropy, cohort=2, vectorize=0)
    with pytest.raises(ValueError, match=r"client.vectorize: the model's layer lstm \(LSTM\)"):
        SyncFedAvg(CharLSTM(10), data, F.cross_entropy, cohort=2, vectorize=2)
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with pytest.raises(ValueError, match=r"client.vectorize: the model's layer 1 \(BatchNorm2d\)"):
        SyncFedAvg(bn, data, F.cross_entropy, cohort=2, vectorize=2)


def test_lstm_under_vmap_is_correct_but_unbatched():
    """Why recurrent layers are refused: vmap runs nn.LSTM through its per-example fallback (a loop,
    no speed-up); the result itself is right."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = CharLSTM(12, hidden=8)
    params = {k: v.detach().expand(2, *v.shape).clone() for k, v in model.named_parameters()}
    x, y = torch.randint(0, 12, (2, 3, 5)), torch.randint(0, 12, (2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = vmap(grad(lambda p, xb, yb: F.cross_entropy(functional_call(model, p, (xb,)), yb)))(params, x, y)
    assert any("batching rule" in str(w.message) for w in caught)
    one = {k: v[1] for k, v in params.items()}
    g1 = grad(lambda p: F.cross_entropy(functional_call(model, p, (x[1],)), y[1]))(one)
    assert all(torch.allclose(g[k][1], g1[k], atol=1e-6) for k in g1)


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"workers": 2}, "worker processes"),
        ({"mode": "async"}, "mode: async or fleet"),
        ({"client": {"vectorize": 4, "algorithm": {"name": "fedprox", "mu": 0.1}}}, "client.algorithm fedprox"),
        (
            {"privacy": {"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
            "privacy.sample_level",
        ),
    ],
)
def test_vectorize_config_refusals(extra, says):
    from flotilla.config import validate

    raw = {"task": {"name": "fashion-mnist"}, "rounds": 1, "client": {"vectorize": 4}, **extra}
    with pytest.raises(ConfigError) as e:
        validate(raw)
    msg = str(e.value)
    assert "client.vectorize:" in msg and says in msg and "set client.vectorize: 1" in msg
    assert len(msg.splitlines()) == 2  # "invalid config:" and the one line


def test_vectorize_refuses_a_custom_client_update():
    from flotilla.core.protocols import Components

    data = _images([10, 10])
    with pytest.raises(ValueError, match="client.vectorize: stacks plain local SGD"):
        SyncFedAvg(
            _mlp(), data, F.cross_entropy, cohort=2, vectorize=2, components=Components(client_update=LocalTrainer)
        )


@pytest.mark.parametrize(
    "keys",
    [{}, {"weighting": "uniform", "privacy": {"user_level": {"clip_norm": 0.05, "noise_multiplier": 0.5}}}],
    ids=["fedavg", "user-level-dp"],
)
def test_vectorized_train_through_the_api(keys):
    """Through the config; user-level DP composes unchanged (each delta is clipped as it is added, the
    same seeded noise), as would secure aggregation: the aggregator sees the deltas one by one."""
    import flotilla

    data = _images([10, 14, 6, 8])
    out = {}
    for k in (1, 2):
        torch.manual_seed(0)
        client = {"vectorize": k, "batch_size": 5}
        r = flotilla.train(_mlp(), data, rounds=2, cohort=3, seed=1, client=client, **keys)
        out[k] = r.weights, r.history
    assert (out[1][0] - out[2][0]).abs().max().item() <= TOL
    if keys:  # clipped: every delta was larger than the bound, and noise was added
        assert out[1][1][-1]["clipped_fraction"] == out[2][1][-1]["clipped_fraction"] == 1.0
