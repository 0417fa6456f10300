"""The in-place training core: flat model, local SGD, aggregation, one round."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flotilla
from flotilla.core.aggregate import UpdateRejected, WeightedMean
from flotilla.core.client import ClientSpec, LocalTrainer
from flotilla.core.flat import FlatModel
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.sim.sync import SyncFedAvg, sample_cohort
from flotilla.tasks.models import CharLSTM, SmallCNN
from tests.helpers import synthetic_dataset


def test_flat_model_parameters_are_views_into_one_vector():
    model = SmallCNN()
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatModel(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # binding keeps the initial values
    flat.flat.fill_(0.5)
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_flat_lstm_trains_through_the_views():
    model = CharLSTM(vocab_size=10, embed_dim=4, hidden=8, layers=2)
    flat = FlatModel(model)
    x = torch.randint(0, 10, (3, 7))
    out = model(x)
    F.cross_entropy(out, torch.tensor([1, 2, 3])).backward()
    assert flat.grad.abs().sum() > 0  # gradients land in the flat grad buffer
    flat.flat.zero_()
    assert torch.equal(model(x), model.head.bias.expand(3, -1))  # LSTM reads the flat storage


def test_one_client_one_step_equals_centralised_sgd():
    data = synthetic_dataset(num_clients=1, per_client=16)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    reference = nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    alg = SyncFedAvg(
        model,
        data,
        F.cross_entropy,
        cohort=1,
        client=ClientSpec(steps=1, batch_size=16, lr=0.3),
        server=ServerOptimizerSpec("fedavg", lr=1.0),
    )
    alg.step()
    # Centralised: one SGD step on the full batch (batch = all 16 examples, order irrelevant).
    x, y = data.fetch(data.train_indices[0])
    opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.allclose(alg.weights, expected, atol=1e-6)


def test_client_momentum_matches_torch_sgd():
    data = synthetic_dataset(num_clients=1, per_client=30)
    torch.manual_seed(1)
    model, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    flat = FlatModel(model)
    spec = ClientSpec(steps=3, batch_size=10, lr=0.1, momentum=0.9, weight_decay=0.01)
    trainer = LocalTrainer(flat, F.cross_entropy, spec)
    start = flat.flat.clone()
    delta = torch.empty_like(start)
    trainer.train(data, 0, start, seed=7, delta_out=delta)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x, y in data.train_batches(0, 10, torch.Generator().manual_seed(7), steps=3):
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]) - start
    assert torch.allclose(delta, expected, atol=1e-6)


def test_weighted_mean_and_rejections_leave_state_intact():
    agg = WeightedMean(3)
    agg.add(torch.tensor([1.0, 2.0, 3.0]), 1.0)
    agg.add(torch.tensor([3.0, 2.0, 1.0]), 3.0)
    for bad, msg in [
        (torch.tensor([float("nan"), 0.0, 0.0]), "non-finite"),
        (torch.zeros(4), "shape"),
        (torch.zeros(3, dtype=torch.float64), "dtype"),
    ]:
        with pytest.raises(UpdateRejected, match=msg):
            agg.add(bad, 1.0, client=17)
    with pytest.raises(UpdateRejected, match="weight"):
        agg.add(torch.zeros(3), -1.0)
    assert agg.count == 2
    assert agg.result().tolist() == pytest.approx([2.5, 2.0, 1.5])


def test_cohort_sampling_is_without_replacement_and_reproducible():
    a = sample_cohort(3, 5, 100, 30)
    assert len(set(a.tolist())) == 30 and a.max() < 100
    assert (a == sample_cohort(3, 5, 100, 30)).all()
    assert not (a == sample_cohort(3, 6, 100, 30)).all()


def test_training_is_deterministic_and_learns():
    data = synthetic_dataset(num_clients=10, per_client=40)

    def go():
        torch.manual_seed(0)
        return flotilla.train(nn.Linear(5, 3), data, rounds=8, cohort=4, client={"lr": 0.2, "batch_size": 8})

    a, b = go(), go()
    assert torch.equal(a.weights, b.weights)
    assert a.history[-1]["accuracy"] > a.history[0]["accuracy"] - 1e-9
    assert a.history[-1]["accuracy"] > 0.6  # 3 classes: chance is ~0.33


def test_resume_is_bit_identical(tmp_path):
    data = synthetic_dataset(num_clients=10, per_client=40)
    kw = dict(rounds=6, cohort=3, client={"lr": 0.2, "momentum": 0.5}, server={"optimizer": "fedadam", "lr": 0.05})
    torch.manual_seed(0)
    whole = flotilla.train(nn.Linear(5, 3), data, run_dir=tmp_path / "whole", **kw)
    torch.manual_seed(0)
    flotilla.train(nn.Linear(5, 3), data, run_dir=tmp_path / "part", **{**kw, "rounds": 4})  # "interrupted" at 4
    torch.manual_seed(123)  # a different fresh init must not matter: the checkpoint wins
    resumed = flotilla.train(nn.Linear(5, 3), data, run_dir=tmp_path / "part", resume=True, **kw)
    assert torch.equal(whole.weights, resumed.weights)
    rounds = [r["round"] for r in resumed.history]
    assert rounds == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "part" / "model.safetensors").exists() and (tmp_path / "part" / "plot.png").exists()


def test_user_datasets_mapping_api():
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    train = {
        name: TensorDataset(torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g)) for name in "abc"
    }
    test = {
        name: TensorDataset(torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g)) for name in "abc"
    }
    result = flotilla.train(nn.Linear(4, 2), (train, test), rounds=2, cohort=2)
    assert len(result.history) == 2 and result.history[-1]["eval_examples"] == 18
    with pytest.raises(ValueError, match="cohort"):
        flotilla.train(nn.Linear(4, 2), train, rounds=1, cohort=4)
