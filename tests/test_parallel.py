"""Worker processes over the cohort (flotilla.sim.parallel)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flotilla
from flotilla.core.aggregate import UpdateRejected, WeightedMean
from flotilla.core.client import ClientSpec
from flotilla.sim.parallel import ParallelFedAvg, split_cohort
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset

SPEC = ClientSpec(epochs=1, batch_size=4, lr=0.2)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _run(cls, rounds=3, **kw):
    data = synthetic_dataset(num_clients=12, per_client=12)
    alg = cls(_model(), data, F.cross_entropy, cohort=6, client=SPEC, seed=3, **kw)
    try:
        metrics = [alg.step() for _ in range(rounds)]
    finally:
        if hasattr(alg, "close"):
            alg.close()
    return alg, metrics


def test_split_cohort_is_balanced_deterministic_and_keeps_cohort_order():
    clients = [7, 3, 9, 1, 5]
    sizes = [10, 50, 10, 20, 20]
    shares = split_cohort(clients, sizes, 2)
    assert shares == split_cohort(clients, sizes, 2)
    assert sorted(sum(shares, [])) == sorted(clients)
    loads = [sum(sizes[clients.index(c)] for c in s) for s in shares]
    assert max(loads) - min(loads) <= 10  # 50 | 20+20+10 (+10)
    for s in shares:  # cohort order inside each share
        assert s == [c for c in clients if c in s]
    assert split_cohort(clients, sizes, 1) == [clients]
    assert split_cohort([4], [3], 3) == [[4], [], []]


def test_one_worker_is_bit_identical_to_sync_fedavg():
    seq, m_seq = _run(SyncFedAvg)
    par, m_par = _run(ParallelFedAvg, workers=1)
    assert torch.equal(seq.weights, par.weights)
    assert [m["train_loss"] for m in m_seq] == [m["train_loss"] for m in m_par]


def test_two_workers_match_sequential_and_are_deterministic():
    seq, m_seq = _run(SyncFedAvg)
    a, m_a = _run(ParallelFedAvg, workers=2)
    b, _ = _run(ParallelFedAvg, workers=2)
    assert torch.equal(a.weights, b.weights)  # fixed worker count: bit-identical
    assert torch.allclose(seq.weights, a.weights, atol=1e-5)  # regrouped float sum only
    initial = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert not torch.allclose(a.weights, initial)  # it trained
    assert m_a[-1]["examples_seen"] == m_seq[-1]["examples_seen"] == 6 * 12
    assert abs(m_a[-1]["train_loss"] - m_seq[-1]["train_loss"]) < 1e-5


def test_workers_use_separate_processes_and_stop_on_close():
    data = synthetic_dataset(num_clients=6, per_client=8)
    alg = ParallelFedAvg(_model(), data, F.cross_entropy, cohort=4, client=SPEC, workers=2)
    alg.step()
    procs = list(alg._procs)
    assert len(procs) == 1 and procs[0].is_alive() and procs[0].pid != __import__("os").getpid()
    alg.close()
    assert not procs[0].is_alive()
    alg.step()  # restarts its workers
    assert alg.round == 2
    alg.close()


def test_checkpoint_resume_with_workers_is_bit_identical():
    full, _ = _run(ParallelFedAvg, rounds=4, workers=2)
    data = synthetic_dataset(num_clients=12, per_client=12)
    first = ParallelFedAvg(_model(), data, F.cross_entropy, cohort=6, client=SPEC, seed=3, workers=2)
    first.step()
    first.step()
    state = first.state_dict()
    first.close()
    second = ParallelFedAvg(_model(5), data, F.cross_entropy, cohort=6, client=SPEC, seed=3, workers=2)
    second.load_state_dict(state)
    second.step()
    second.step()
    second.close()
    assert torch.equal(full.weights, second.weights)


def test_bad_update_in_a_worker_is_rejected_and_leaves_state_intact():
    data = synthetic_dataset(num_clients=6, per_client=8)
    x, y = data.fetch(torch.arange(96))
    poisoned = x.clone()
    poisoned[data.train_indices[5]] = float("nan")  # client 5's data makes a NaN delta
    data.fetch = lambda idx: (poisoned[idx], y[idx])
    alg = ParallelFedAvg(_model(), data, F.cross_entropy, cohort=6, client=SPEC, workers=2)
    before = alg.weights.clone()
    with pytest.raises(UpdateRejected, match="client 5"):
        alg.step()
    assert torch.equal(alg.weights, before) and alg.round == 0
    alg.close()


def test_invalid_worker_settings_are_refused():
    data = synthetic_dataset(num_clients=4, per_client=4)
    with pytest.raises(ValueError, match="workers"):
        ParallelFedAvg(_model(), data, F.cross_entropy, cohort=2, workers=0)
    with pytest.raises(ValueError, match="aggregator"):
        ParallelFedAvg(_model(), data, F.cross_entropy, cohort=2, workers=2, aggregator=WeightedMean(10))


def test_train_api_with_workers_matches_within_rounding():
    data = synthetic_dataset(num_clients=10, per_client=10)
    one = flotilla.train(_model(), data, rounds=3, cohort=5, client=SPEC, seed=1)
    two = flotilla.train(_model(), data, rounds=3, cohort=5, client=SPEC, seed=1, workers=2)
    assert torch.allclose(one.weights, two.weights, atol=1e-5)
    assert two.history[-1]["accuracy"] == pytest.approx(one.history[-1]["accuracy"], abs=0.02)
