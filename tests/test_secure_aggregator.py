"""SecureAggregator: the aggregator interface over secure aggregation matches the plaintext
weighted mean within the fixed-point bound, with dropouts, and trains like plaintext FedAvg."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.aggregate import UpdateRejected, WeightedMean
from flotilla.core.client import ClientSpec
from flotilla.secure import DropoutSim, SecAggAborted, SecureAggregator
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset

N = 3_000


def _deltas(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) * 0.05 for _ in range(n)], [float(1 + i % 7) for i in range(n)]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(
    "dropout,degree",
    [
        (None, None),
        (DropoutSim(advertise=0.1, share=0.1, mask=0.1, unmask=0.1, seed=3), None),
        (DropoutSim(mask=0.1, unmask=0.1, seed=4), "auto"),
    ],
)
def test_secure_mean_matches_plaintext_mean(dropout, degree, bits):
    n = 20
    ds, ws = _deltas(n)
    agg = SecureAggregator(N, n, clip=0.5, max_weight=10, bits=bits, degree=degree, dropout=dropout)
    for i, (d, w) in enumerate(zip(ds, ws)):
        agg.add(d, w, i)
    ref = WeightedMean(N)
    for i in agg.included:
        ref.add(ds[i].clamp(-0.5, 0.5), ws[i], i)
    lost = {c for c, s in agg.dropped.items() if s != "unmask"}
    assert agg.count == len(agg.included) == n - len(lost)
    err = (agg.result() - ref.result()).abs().max().item()
    assert err <= agg.error_bound()
    assert agg.weight_sum == pytest.approx(ref.total_weight, rel=1e-6)
    assert agg.result() is agg.result()


def test_unfilled_slots_are_dropouts_and_rounds_repeat():
    ds, ws = _deltas(6)
    agg = SecureAggregator(N, cohort=10, max_weight=10)
    for _ in range(2):
        agg.reset()
        for i in range(6):  # 4 of 10 invited clients never report
            agg.add(ds[i], ws[i], i)
        ref = WeightedMean(N)
        for i in range(6):
            ref.add(ds[i], ws[i])
        assert (agg.result() - ref.result()).abs().max() <= agg.error_bound()


def test_too_many_dropouts_abort_the_round():
    ds, ws = _deltas(5)
    agg = SecureAggregator(N, 5, max_weight=10, dropout=DropoutSim(mask=0.6))
    for i in range(5):
        agg.add(ds[i], ws[i], i)
    with pytest.raises(SecAggAborted):
        agg.result()
    with pytest.raises(SecAggAborted):
        agg.result()
    agg = SecureAggregator(N, 5, max_weight=10, dropout=DropoutSim(advertise=0.6))
    with pytest.raises(SecAggAborted):
        agg.add(ds[0], ws[0], 0)


def test_rejections_leave_the_round_intact():
    ds, ws = _deltas(3)
    agg = SecureAggregator(N, 3, max_weight=10)
    with pytest.raises(UpdateRejected, match="max_weight"):
        agg.add(ds[0], 11.0, 0)
    bad = ds[0].clone()
    bad[3] = float("nan")
    with pytest.raises(UpdateRejected):
        agg.add(bad, 1.0, 0)
    for i in range(3):
        agg.add(ds[i], ws[i], i)
    with pytest.raises(UpdateRejected, match="cohort"):
        agg.add(ds[0], 1.0, 9)
    ref = WeightedMean(N)
    for i in range(3):
        ref.add(ds[i], ws[i])
    assert (agg.result() - ref.result()).abs().max() <= agg.error_bound()


def test_noise_hook_sees_the_unmasked_sum():
    ds, _ = _deltas(4)
    seen = []
    agg = SecureAggregator(N, 4, noise_fn=lambda s: seen.append(s.clone()) or s + 1.0)
    for i in range(4):
        agg.add(ds[i], 1.0, i)
    out = agg.result()
    assert torch.allclose(seen[0], sum(ds), atol=1e-5)
    assert torch.allclose(out, (sum(ds) + 1.0) / 4, atol=1e-5)


def test_training_with_secure_aggregation_matches_plaintext():
    data = synthetic_dataset(num_clients=10, per_client=40)

    def run(aggregator):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        alg = SyncFedAvg(
            model,
            data,
            F.cross_entropy,
            cohort=5,
            client=ClientSpec(lr=0.2, batch_size=8),
            aggregator=aggregator(sum(p.numel() for p in model.parameters())),
        )
        for _ in range(8):
            alg.step()
        x, y = zip(*(next(data.test_batches(c, 100)) for c in range(10)))
        acc = (model(torch.cat(x)).argmax(1) == torch.cat(y)).float().mean().item()
        return alg.weights, acc

    w_plain, acc_plain = run(WeightedMean)
    w_sec, acc_sec = run(lambda n: SecureAggregator(n, cohort=5, clip=4.0, max_weight=40, degree="auto"))
    assert (w_plain - w_sec).abs().max() < 1e-4  # 8 rounds of ~1e-6 quantisation error
    assert acc_sec == pytest.approx(acc_plain, abs=0.03)
    assert acc_plain > 0.6
