"""Device tiers (issue 15): assignment, fleet durations, tier-aware selection, compression, HeteroFL, config."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientSpec, LocalTrainer
from flotilla.core.flat import FlatModel
from flotilla.fairness.channel import TierChannel
from flotilla.fairness.config import TiersConfig
from flotilla.fairness.heterofl import HeteroFLMean, HeteroFLUpdate, find_mlps, tier_masks
from flotilla.fairness.parts import assign
from flotilla.fairness.select import TierSampler
from flotilla.fairness.speeds import tercile_multipliers
from flotilla.fairness.tiers import assign_dirichlet, assign_random, check_nonempty
from flotilla.fleet import make_fleet
from flotilla.fleet.durations import TierMultipliers
from tests.helpers import synthetic_dataset


class FixedShares:
    """A numpy-Generator stand-in: the same Dirichlet shares every time, no shuffling."""

    def __init__(self, shares):
        self.shares = np.asarray(shares, dtype=float)

    def dirichlet(self, alpha):
        return self.shares.copy()

    def shuffle(self, x):
        pass


def test_dirichlet_assignment_by_hand():
    # item 7: clients 0-4 (5 users, most popular); item 3: clients 4, 5, 6 (4 already assigned);
    # item 9: clients 7, 8; client 9 holds nothing (goes last).
    items = [[7], [7], [7], [7], [7, 3], [3], [3], [9], [9], []]
    tier = assign_dirichlet(items, alpha=0.5, seed=0, rng=FixedShares([0.2, 0.5, 0.3]))
    # shares sorted descending: 0.5, 0.3, 0.2.  Item 7, n=5: int(2.5)=2 -> smallest tier (all empty:
    # tier 0), int(4.0)-2=2 -> tier 1, the rest (1) -> tier 2.
    assert tier[:5].tolist() == [0, 0, 1, 1, 2]
    # item 3, unassigned 5, 6 (n=2): int(1.0)=1 -> smallest (tier 2, size 1), int(1.6)-1=0 -> next
    # smallest (tier 0, size 2, before tier 1 by index), rest 1 -> tier 1.
    assert tier[5:7].tolist() == [2, 1]
    # sizes now 2, 3, 2.  item 9 (n=2): 1 -> tier 0, 0 -> tier 2, 1 -> tier 1
    assert tier[7:9].tolist() == [0, 1]
    # sizes 3, 4, 2: the client without items goes to the smallest tier (n=1: int(0.5)=0, int(0.8)=0, rest)
    # -> the largest gets the rest: tier 1.
    assert tier[9] == 1


def test_dirichlet_small_alpha_keeps_item_sharers_together_and_is_deterministic():
    rng = np.random.default_rng(0)
    items = [[int(rng.integers(30))] for _ in range(300)]  # 30 items, one per client
    m = assign_dirichlet(items, alpha=1.0, seed=3)  # moderate alpha: the draws matter
    assert np.array_equal(m, assign_dirichlet(items, alpha=1.0, seed=3))
    assert not np.array_equal(m, assign_dirichlet(items, alpha=1.0, seed=4))
    a = assign_dirichlet(items, alpha=1e-4, seed=3)
    # with a tiny alpha one share is ~1: (almost) every item's clients share one tier
    together = sum(len({a[c] for c in range(300) if items[c][0] == i}) == 1 for i in range(30))
    assert together >= 28
    # large alpha: equal shares, every item split over the tiers, so the tiers are balanced
    b = assign_dirichlet(items, alpha=1e4, seed=3)
    counts = np.bincount(b, minlength=3)
    assert counts.max() - counts.min() <= 30 and counts.min() > 0
    mixed = sum(len({b[c] for c in range(300) if items[c][0] == i}) > 1 for i in range(30))
    assert mixed >= 25


def test_random_is_index_mod_3():
    assert assign_random(7).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_empty_tier_is_refused_at_build_time():
    check_nonempty(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"tiers.assignment: the mid and high tiers are left empty"):
        check_nonempty(np.array([0, 0, 0]))
    # every client holds the same single item and alpha is tiny: one tier takes everyone
    ds = synthetic_dataset(num_clients=6, classes=1)
    cfg = TiersConfig(assignment="dirichlet", alpha=1e-6, items="labels")
    with pytest.raises(ValueError, match="left empty"):
        assign(cfg, ds, seed=0)


def test_fleet_durations_scale_with_tier_multipliers():
    tiers = TierMultipliers(np.array([0, 1, 2]), speed=(0.25, 0.5, 1.0), bandwidth=(0.1, 0.5, 1.0))
    kw = dict(population=30, seed=0, train_sizes=np.array([40, 40, 40]), model_bytes=10**6, speed=20.0)
    plain = make_fleet(**kw).trips(0, 200)
    tiered = make_fleet(**kw, tiers=tiers).trips(0, 200)
    assert np.array_equal(plain.client, tiered.client)
    speed = np.array([0.25, 0.5, 1.0])[tiered.client]
    bw = np.array([0.1, 0.5, 1.0])[tiered.client]
    np.testing.assert_allclose(tiered.compute, plain.compute / speed)
    comm = plain.duration - plain.compute
    np.testing.assert_allclose(tiered.duration, plain.compute / speed + comm / bw)
    with pytest.raises(ValueError, match="tiers.speed: multipliers must be > 0"):
        TierMultipliers(np.array([0]), speed=(0.0, 1.0, 1.0), bandwidth=(1.0, 1.0, 1.0))


def test_exclude_low_never_selects_low():
    tier = assign_random(30)
    s = TierSampler(tier, exclude_low=True)
    for r in range(50):
        chosen = s(0, r, 30, 8)
        assert len(set(chosen.tolist())) == 8 and (tier[chosen] != 0).all()
    with pytest.raises(ValueError, match="cohort: 21 is larger than the 20 clients outside the low tier"):
        s(0, 0, 30, 21)


def test_over_select_drops_the_slowest_low_first():
    tier = assign_random(60)
    s = TierSampler(tier, over_select=0.5)
    dropped_low = 0
    for r in range(30):
        chosen = s(1, r, 60, 10)
        drawn = np.random.default_rng([1, r, 0x5EED]).choice(60, size=15, replace=False)
        dropped = np.setdiff1d(drawn, chosen)
        assert len(chosen) == 10 and set(chosen.tolist()) <= set(drawn.tolist()) and len(dropped) == 5
        assert tier[dropped].max() <= tier[chosen].min()  # never keep a slower tier over a faster one
        dropped_low += int((tier[dropped] == 0).sum())
    assert dropped_low > 100  # mostly the low tier goes


def test_per_tier_pruning_and_quantisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    flat = FlatModel(model)
    ds = synthetic_dataset()
    tier = np.array([0, 1, 2] * 3)[: ds.num_clients]
    inner = LocalTrainer(flat, F.cross_entropy, ClientSpec(batch_size=5, lr=0.5))
    ch = TierChannel(inner, flat, tier, quantize_bits={"low": 2}, prune_keep={"mid": 0.25})
    w = flat.flat.clone()
    out = torch.empty(flat.numel)
    ch.train(ds, 0, w, 11, out)  # low: 2 bits per weight matrix, biases untouched
    views = flat.unflatten(out)
    for name in ("0.weight", "2.weight"):
        assert len(torch.unique(views[name])) <= 4
    assert len(torch.unique(views["0.bias"])) > 4
    ch.train(ds, 1, w, 11, out)  # mid: a quarter of the coordinates kept
    assert (out != 0).sum().item() == round(0.25 * flat.numel)
    ref = torch.empty(flat.numel)
    inner.train(ds, 2, w, 11, ref)
    ch.train(ds, 2, w, 11, out)  # high: unchanged
    assert torch.equal(out, ref)


def test_heterofl_slice_trains_exactly_as_the_narrow_network_and_averages_over_holders():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    narrow = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        narrow[0].weight.copy_(wide[0].weight[:3])
        narrow[0].bias.copy_(wide[0].bias[:3])
        narrow[2].weight.copy_(wide[2].weight[:, :3])
        narrow[2].bias.copy_(wide[2].bias)
    ds = synthetic_dataset()
    spec = ClientSpec(batch_size=4, lr=0.3, epochs=2)
    tier = np.array([0, 2] * 4)
    masks = tier_masks(wide, {"low": 0.5})
    assert masks[1] is None and masks[2] is None
    fw, fn = FlatModel(wide), FlatModel(narrow)
    upd = HeteroFLUpdate(LocalTrainer(fw, F.cross_entropy, spec), tier, masks)
    gw = fw.flat.clone()
    dw = torch.empty(fw.numel)
    upd.train(ds, 0, gw, 5, dw)
    dn = torch.empty(fn.numel)
    LocalTrainer(fn, F.cross_entropy, spec).train(ds, 0, fn.flat.clone(), 5, dn)
    vw, vn = fw.unflatten(dw), fn.unflatten(dn)
    torch.testing.assert_close(vw["0.weight"][:3], vn["0.weight"])
    torch.testing.assert_close(vw["2.weight"][:, :3], vn["2.weight"])
    torch.testing.assert_close(vw["2.bias"], vn["2.bias"])
    assert vw["0.weight"][3:].abs().sum() == 0 and vw["0.bias"][3:].abs().sum() == 0
    assert vw["2.weight"][:, 3:].abs().sum() == 0 and vn["0.weight"].abs().sum() > 0
    # the server averages each coordinate over the clients that hold it
    agg = HeteroFLMean(fw.numel, tier, masks)
    d_low, d_high = dw.clone(), torch.ones(fw.numel)
    agg.add(d_low, 1.0, 0)  # client 0: low tier
    agg.add(d_high, 3.0, 1)  # client 1: high tier
    res = fw.unflatten(agg.result())
    torch.testing.assert_close(res["0.weight"][3:], torch.ones(3, 5))  # only the high client holds these
    torch.testing.assert_close(res["0.weight"][:3], (vw["0.weight"][:3] + 3) / 4)


def test_heterofl_refuses_a_model_without_an_mlp():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

    with pytest.raises(ValueError, match="tiers.heterofl_width: only for an MLP.*got Conv"):
        find_mlps(Conv())
    with pytest.raises(ValueError, match="only for an MLP"):
        find_mlps(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))  # exactness needs ReLU


def test_tercile_multipliers():
    times = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 8.0])  # speeds 1, 1, .5, .5, .25, .125
    low, mid, high = tercile_multipliers(times)
    assert high == 1.0 and mid == 0.5 and math.isclose(low, 0.1875)


BASE = {"task": {"name": "fashion-mnist", "num_clients": 30}, "rounds": 1, "cohort": 6}


@pytest.mark.parametrize(
    "tiers, extra, message",
    [
        ({"speed": {"lowest": 1, "mid": 1, "high": 1}}, {}, "tiers.speed: unknown tier 'lowest'"),
        ({"quantize_bits": {"fast": 4}}, {}, "tiers.quantize_bits: unknown tier 'fast'"),
        ({"speed": {"low": 0, "mid": 1, "high": 1}}, {}, "tiers.speed: low: must be > 0"),
        ({"bandwidth": {"low": 1, "mid": -2, "high": 1}}, {}, "tiers.bandwidth: mid: must be > 0"),
        ({"speed": {"low": 1, "high": 1}}, {}, "tiers.speed: give all of low, mid, high"),
        ({"alpha": 0}, {}, "tiers.alpha: must be > 0"),
        ({"alpha": -1}, {}, "tiers.alpha: must be > 0"),
        ({"prune_keep": {"low": 0}}, {}, "tiers.prune_keep: low: must be > 0"),
        ({"assignment": "clustered"}, {}, "tiers.assignment"),
        ({"exclude_low": True}, {"fleet": {"population": 100}}, "tiers.exclude_low: selection by tier"),
        ({"heterofl_width": {"low": 0.5}}, {"mode": "async"}, "tiers.heterofl_width: needs round aggregation"),
    ],
)
def test_bad_tier_config_is_refused_with_the_key(tiers, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate({**BASE, **extra, "tiers": tiers})


def test_good_tier_config_is_accepted():
    cfg = validate({**BASE, "tiers": {"assignment": "dirichlet", "exclude_low": True, "quantize_bits": {"low": 4}}})
    assert cfg.tiers.optimisations() == ["exclude_low", "quantize_bits"]
    assert cfg.tiers.speed == "benchmarkme" and cfg.tiers.alpha == 0.005


def test_items_labels_and_plays():
    from flotilla.core.dataset import FederatedDataset
    from flotilla.fairness.items import client_items

    y = torch.tensor([0, 0, 2, 1, 1, 1])
    fetch = lambda idx: (torch.zeros(len(idx), 2), y[idx])  # noqa: E731
    train = [torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5])]
    ds = FederatedDataset("toy", fetch, train, client_names=["Hamlet/HAMLET", "Hamlet/OPHELIA", "Macbeth/MACBETH"])
    assert client_items(ds, "labels") == [[0, 2], [1], [1]]
    assert client_items(ds, "plays") == [[0], [0], [1]]
    assert client_items(ds, "auto") == [[0], [0], [1]]  # Play/ROLE names: plays
    plain = FederatedDataset("toy", fetch, train)
    assert client_items(plain, "auto") == [[0, 2], [1], [1]]
    with pytest.raises(ValueError, match="tiers.items: plays needs client names"):
        client_items(plain, "plays")
    with pytest.raises(ValueError, match="tiers.items: clicks needs the movielens"):
        client_items(plain, "clicks")
