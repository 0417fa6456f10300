"""Privacy, secure aggregation and client algorithms compose when an algorithm is built: a
combination that would skip DP or secure aggregation is refused then, never installed unused
(issue 11 item 18: DP on a ParallelFedAvg used to install an aggregator its step never called)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.aggregate import WeightedMean
from flotilla.core.client import ClientSpec
from flotilla.core.protocols import Components
from flotilla.experiment.compose import build_algorithm
from flotilla.fleet.fleet import make_fleet
from flotilla.privacy import PrivacyError, make_private
from flotilla.secure.wiring import make_secure
from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim
from flotilla.sim.parallel import ParallelFedAvg
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset

USER_DP = {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}}


def _kw(**extra):
    data = synthetic_dataset(num_clients=12, per_client=6)
    return dict(
        model=nn.Linear(5, 3),
        dataset=data,
        loss_fn=F.cross_entropy,
        cohort=4,
        weighting="uniform",
        client=ClientSpec(steps=1, batch_size=3),
        **extra,
    )


@pytest.mark.parametrize("privacy", [USER_DP, {"sample_level": {"noise_multiplier": 1.0}}])
def test_dp_on_worker_processes_is_refused_when_built(privacy):
    with pytest.raises(PrivacyError, match="workers: DP trains every client in one process"):
        make_private(ParallelFedAvg, _kw(workers=2), privacy, rounds=3)


def test_secure_aggregation_on_worker_processes_is_refused_when_built():
    with pytest.raises(ValueError, match="secure_aggregation: .*ParallelFedAvg"):
        make_secure(ParallelFedAvg, _kw(workers=2), {})


def test_a_component_an_algorithm_would_not_use_is_refused():
    kw = _kw(workers=2)
    with pytest.raises(ValueError, match="workers: each worker process"):
        ParallelFedAvg(**kw, components=Components(aggregator=WeightedMean))
    data = synthetic_dataset(num_clients=12, per_client=6)
    fleet = make_fleet(population=100, seed=0, train_sizes=data.train_sizes.numpy(), model_bytes=72)
    common = dict(model=nn.Linear(5, 3), dataset=data, loss_fn=F.cross_entropy, fleet=fleet)
    with pytest.raises(ValueError, match=r"AsyncFleetSim\(fedasync\): does not use the buffer"):
        AsyncFleetSim(**common, concurrency=4, algorithm="fedasync", components=Components(buffer=lambda b, v: b))
    with pytest.raises(ValueError, match="SyncFleetSim: does not use the sampler"):
        SyncFleetSim(**common, cohort=3, components=Components(sampler=lambda *a: None))


def test_dp_on_in_process_rounds_really_clips_and_noises():
    """The composed algorithm's step goes through the DP aggregator: with z = 0 and a tiny clip norm
    the model moves by at most S (the mean of clipped updates), far less than plain FedAvg."""
    plain = SyncFedAvg(**_kw())
    w0 = plain.weights.clone()
    plain.step()
    private, _ = build_algorithm(
        SyncFedAvg, _kw(), privacy={"user_level": {"clip_norm": 1e-4, "noise_multiplier": 0.0, "delta": 1e-3}}, rounds=3
    )
    p0 = private.weights.clone()
    private.step()
    assert float((plain.weights - w0).norm()) > 1e-2
    assert float((private.weights - p0).norm()) <= 1e-4 * 1.0001
    assert private.aggregator.clip_norm == 1e-4 and private.aggregator.count == 4


def test_refusals_happen_before_the_model_is_touched():
    kw = _kw(workers=2)
    before = [p.detach().clone() for p in kw["model"].parameters()]
    with pytest.raises(PrivacyError):
        build_algorithm(ParallelFedAvg, kw, privacy={"sample_level": {"noise_multiplier": 1.0}}, rounds=3)
    assert all(torch.equal(a, b) for a, b in zip(before, kw["model"].parameters()))
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in kw["model"].modules())
