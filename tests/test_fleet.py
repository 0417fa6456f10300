"""The simulated fleet: hashing, distributions, availability, schedulers, the fleet algorithms."""

import math
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.aggregate import WeightedMean
from flotilla.core.client import ClientSpec
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.fleet import AsyncScheduler, FleetStalled, SyncScheduler, make_distribution, make_fleet
from flotilla.fleet.availability import Availability
from flotilla.fleet.durations import work_examples
from flotilla.fleet.population import hash_array, mix64, stream_key, uniform_array, uniform_scalar
from flotilla.runs.rundir import RunDir
from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim
from tests.helpers import synthetic_dataset

SIZES = np.full(10, 20)


def fleet(**kw):
    args = dict(
        population=10_000,
        seed=1,
        train_sizes=SIZES,
        model_bytes=4000,
        speed={"dist": "lognormal", "median": 20, "sigma": 1.0},
    )
    args.update(kw)
    return make_fleet(**args)


# --- hashing and distributions ------------------------------------------------------------
def test_vector_and_scalar_hash_agree_and_uniforms_are_open_unit():
    key = stream_key(5, 2)
    x = np.array([0, 1, 2**40, 2**63 + 7], dtype=np.uint64)
    assert [int(h) for h in hash_array(key, x)] == [mix64(key ^ int(v)) for v in x]
    u = uniform_array(key, np.arange(100_000, dtype=np.uint64))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert uniform_scalar(key, 3) == uniform_array(key, np.array([3], dtype=np.uint64))[0]


def test_distributions_have_the_documented_means_and_supports():
    rng = np.random.default_rng(0)
    u1, u2 = rng.random(400_000), rng.random(400_000)
    cases = [
        ({"dist": "constant", "value": 3}, 3.0),
        ({"dist": "uniform", "low": 1, "high": 5}, 3.0),
        ({"dist": "exponential", "mean": 2, "min": 1}, 3.0),
        ({"dist": "half-normal", "sd": 2, "min": 0.5}, 0.5 + 2 * math.sqrt(2 / math.pi)),
        ({"dist": "lognormal", "median": 2, "sigma": 0.5}, 2 * math.exp(0.125)),
    ]
    for spec, mean in cases:
        d = make_distribution(spec)
        x = d.from_uniform(u1, u2)
        assert x.mean() == pytest.approx(mean, rel=0.01), spec
        assert d.mean() == pytest.approx(mean)
        assert x.min() >= d.lower_bound()
    assert np.median(
        make_distribution({"dist": "lognormal", "median": 2, "sigma": 1}).from_uniform(u1, u2)
    ) == pytest.approx(2, rel=0.02)


def test_empirical_distribution_from_file(tmp_path):
    f = tmp_path / "durations.txt"
    f.write_text("# seconds\n1.0, 2.0\n4.0\n")
    d = make_distribution({"dist": "empirical", "file": str(f)})
    x = d.from_uniform(np.linspace(0.001, 0.999, 3000), None)
    assert set(np.unique(x)) == {1.0, 2.0, 4.0}
    assert x.mean() == pytest.approx(7 / 3, rel=0.01)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n-2\n")
    with pytest.raises(ValueError, match="negative"):
        make_distribution({"dist": "empirical", "file": str(bad)}, where="fleet.speed")


def test_distribution_errors_name_the_key():
    for spec, msg in [
        ({"dist": "lognormal", "median": 1}, "fleet.speed: lognormal needs sigma"),
        ({"dist": "uniform", "low": -1, "high": 1}, "fleet.speed.low: must be >= 0"),
        ({"dist": "constant", "value": 0}, "fleet.speed: a rate must be > 0"),
        ({"dist": "gamma"}, "fleet.speed.dist: unknown"),
    ]:
        with pytest.raises(ValueError, match=msg):
            make_distribution(spec, "fleet.speed", positive=True)


# --- population, durations, availability ---------------------------------------------------
def test_population_traits_are_pure_functions_of_seed_and_device():
    f = fleet(population=10**8)
    d = np.array([0, 5, 99_999_999, 123_456_789 % 10**8])
    assert np.array_equal(f.population.speed(d), f.population.speed(d[::-1])[::-1])
    assert not np.array_equal(f.population.speed(d), fleet(population=10**8, seed=2).population.speed(d))
    c = f.population.candidates(np.arange(200_000, dtype=np.uint64))
    assert c.min() >= 0 and c.max() < 10**8 and len(np.unique(c)) > 199_000
    # A batch of trips is the same whichever batch it is computed in.
    a, b = f.trips(0, 100), f.trips(40, 60)
    assert np.array_equal(a.duration[40:], b.duration) and np.array_equal(a.device[40:], b.device)


def test_duration_model_formula():
    f = fleet(
        speed=10.0, bandwidth_down_mbps=8.0, bandwidth_up_mbps=4.0, latency_s=0.5, model_bytes=1_000_000, epochs=2
    )
    t = f.trips(0, 5)
    # 2 epochs x 20 examples / 10 ex/s = 4 s; 8e6 bits / 8e6 = 1 s down; 8e6 / 4e6 = 2 s up; + 0.5
    assert np.allclose(t.duration, 7.5)
    pe = fleet(per_example_s={"mean": 0.1, "sd": 0.0}, bandwidth_down_mbps=1e9, bandwidth_up_mbps=1e9)
    assert np.allclose(pe.trips(0, 5).duration, 20 * 0.1, rtol=1e-6)
    assert work_examples(np.array([25, 5, 0]), steps=4, batch_size=10).tolist() == [25 + 10, 20, 0]


def test_diurnal_curve_gives_the_eligible_fraction_by_hour():
    curve = [0.0] * 6 + [0.2] * 6 + [0.8] * 12
    f = fleet(population=10**7, diurnal=curve)
    devices = f.population.candidates(np.arange(50_000, dtype=np.uint64))
    for hour in (2, 8, 15, 15 + 24):
        frac = f.availability.eligible(devices, hour * 3600.0 + 10).mean()
        assert frac == pytest.approx(curve[hour % 24], abs=0.01)
    spread = fleet(population=10**7, diurnal=curve, timezone_spread_h=23)
    assert spread.availability.fraction(2 * 3600.0) == pytest.approx(np.mean(curve))
    with pytest.raises(ValueError, match="never admits"):
        Availability(f.population, [0.0] * 24)


def test_async_scheduler_never_starts_trips_in_closed_hours():
    curve = [0.0] * 12 + [0.5] * 12
    s = AsyncScheduler(fleet(population=100_000, diurnal=curve, speed=0.01), 50, trace=True)  # ~2000 s trips
    s.fill()
    for _ in range(3000):
        s.pop()
        s.fill()
    starts = [t for t, kind, *_ in s.trace if kind == "start"]
    assert starts and all(int(t // 3600) % 24 >= 12 for t in starts)
    assert max(starts) > 24 * 3600  # it waited through a closed night and resumed


# --- schedulers ------------------------------------------------------------------------------
def test_async_keeps_concurrency_in_flight_and_same_seed_same_trace():
    def trace(seed):
        s = AsyncScheduler(fleet(seed=seed, dropout=0.1), 30, trace=True)
        s.fill()
        for _ in range(2000):
            s.pop()
            assert len(s.busy) == 29
            s.fill()
            assert len(s.busy) == 30
        return s.trace

    a, b = trace(4), trace(4)
    assert a == b
    assert a != trace(5)
    kinds = {k for _, k, *_ in a}
    assert kinds == {"start", "done", "drop"}


def small_async_sim(data, **kw):
    """FedBuff (K = 4) on a 500-device fleet with dropouts, training a 5-3 linear model."""
    torch.manual_seed(0)
    f = make_fleet(
        population=500,
        seed=9,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        dropout=0.1,
        speed={"dist": "lognormal", "median": 10, "sigma": 1.0},
    )
    return AsyncFleetSim(
        nn.Linear(5, 3),
        data,
        F.cross_entropy,
        fleet=f,
        buffer_size=4,
        client=ClientSpec(steps=2, batch_size=8, lr=0.1),
        **kw,
    )


def _strip(record):
    """A step's metrics without the host-timing-dependent ones."""
    return {k: v for k, v in record.items() if k != "concurrency"}


def assert_resume_is_bit_identical(build, steps, tmp_path):
    """``steps`` server steps in one go vs half, a checkpoint through a run directory, and the rest
    in a fresh algorithm: same weights, same metrics.  Returns the uninterrupted run's metrics."""
    whole = build()
    hist = [whole.step() for _ in range(steps)]
    part = build()
    for _ in range(steps // 2):
        part.step()
    rd = RunDir(tmp_path)
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.save_state(part.state_dict(), {"round": part.round})
    resumed = build()
    resumed.load_state_dict(rd.load_state())
    rest = [resumed.step() for _ in range(steps - steps // 2)]
    assert torch.equal(whole.weights, resumed.weights)
    assert [_strip(r) for r in hist[steps // 2 :]] == [_strip(r) for r in rest]
    return hist


def test_poisson_arrivals_start_trips_at_the_rate_up_to_the_cap():
    rate = 2.0  # arrivals per simulated second
    s = AsyncScheduler(fleet(seed=3), 10_000, arrival_rate=rate, trace=True)  # the cap never binds
    s.fill()
    while s.now < 2000.0:
        s.pop()
        s.fill()
    n, t = s.poisson.count, s.now
    assert s.poisson.missed == 0 and s.trips_started == n
    assert abs(n - rate * t) < 5 * math.sqrt(rate * t)  # Poisson count: mean and sd sqrt(rate t)
    starts = [e[0] for e in s.trace if e[1] == "start"]
    gaps = np.diff(starts)
    assert abs(gaps.mean() - 1 / rate) < 5 * (1 / rate) / math.sqrt(len(gaps))
    assert abs(np.median(gaps) - math.log(2) / rate) < 0.1 / rate  # exponential gaps, not a fixed period
    # a cap of 3 in flight: arrivals that find 3 trips running are lost, never more than 3 at once
    capped = AsyncScheduler(fleet(seed=3), 3, arrival_rate=rate, trace=True)
    capped.fill()
    for _ in range(3000):
        capped.pop()
        assert len(capped.busy) <= 3
        capped.fill()
    assert capped.poisson.missed > 0 and capped.trips_started == capped.poisson.count - capped.poisson.missed
    # same seed, same trace; arrivals never start a trip in closed hours
    night = [0.0] * 6 + [1.0] * 18

    def run(seed):
        a = AsyncScheduler(fleet(seed=seed, diurnal=night), 50, arrival_rate=0.05, trace=True)
        a.fill()
        while a.now < 3 * 86400:
            a.pop()
            a.fill()
        return a

    a, b = run(7), run(7)
    assert a.trace == b.trace and a.trace != run(8).trace
    assert all((t % 86400) >= 6 * 3600 for t, k, *_ in a.trace if k == "start")
    assert a.poisson.missed > 0  # the night's arrivals find nobody


def test_poisson_arrivals_resume_bit_identically(tmp_path):
    data = synthetic_dataset(num_clients=10, per_client=20)

    def build():
        return small_async_sim(data, concurrency=8, arrival_rate=0.5)

    hist = assert_resume_is_bit_identical(build, 8, tmp_path)
    assert hist[-1]["arrivals"] > hist[0]["arrivals"] and "arrivals_missed" in hist[-1]


def test_sync_round_discards_exactly_the_late_results():
    f = fleet(dropout=0.2, speed={"dist": "lognormal", "median": 5, "sigma": 1.5})
    s = SyncScheduler(f, trace=True)
    for _ in range(5):
        t0 = s.now
        k0 = s.next_candidate
        out = s.round(select=13, cohort=10, deadline_s=8.0)
        # Recompute the round by hand from the candidate stream (always-eligible fleet of 10,000:
        # every candidate is taken unless its device is still busy from an earlier round).
        ids = [tid for tid, kind, *_ in [(e[2], e[1]) for e in s.trace if e[0] == t0 and e[1] == "start"]]
        batch = f.trips(k0, s.next_candidate - k0)
        chosen = {k0 + i: i for i in range(len(batch.device))}
        trips = [(tid, batch.duration[chosen[tid]], batch.drop_at[chosen[tid]]) for tid in ids[-13:]]
        finishes = sorted((d, tid) for tid, d, drop in trips if not np.isfinite(drop))
        close = min(finishes[9][0] if len(finishes) >= 10 else max(min(d, dr) for _, d, dr in trips), 8.0)
        expected_ok = [tid for d, tid in finishes if d <= close][:10]
        assert [tid for tid, _, _ in out.accepted] == expected_ok
        assert sorted(out.late) == sorted(tid for d, tid in finishes if tid not in expected_ok)
        assert sorted(out.dropped) == sorted(tid for tid, d, drop in trips if np.isfinite(drop))
        assert out.t_close - t0 == pytest.approx(close)
        assert len(out.accepted) + len(out.late) + len(out.dropped) == 13


def test_sync_fleet_aggregates_only_arrivals_before_the_close():
    data = synthetic_dataset(num_clients=10, per_client=20)
    f = make_fleet(
        population=5000,
        seed=2,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        speed={"dist": "lognormal", "median": 5, "sigma": 1.5},
        dropout=0.2,
    )

    class Spy(WeightedMean):
        def add(self, delta, weight=1.0, client=None):
            self.seen.append(client)
            super().add(delta, weight, client)

    spy = Spy(18)
    spy.seen = []
    alg = SyncFleetSim(
        nn.Linear(5, 3),
        data,
        F.cross_entropy,
        fleet=f,
        cohort=6,
        over_selection=1.5,
        deadline_s=6.0,
        aggregator=spy,
        client=ClientSpec(steps=2, batch_size=8),
        seed=0,
    )
    late = wasted = 0
    for _ in range(6):
        spy.seen.clear()
        m = alg.step()
        out = alg.last_round
        assert spy.seen == [c for _, _, c in out.accepted]
        assert m["updates"] == len(out.accepted) <= 6
        late += len(out.late)
        wasted += len(out.late) + len(out.dropped)
    assert m["late_discarded"] == late > 0 and m["wasted_trips"] == wasted
    assert m["trips"] == 6 * 9


def test_dropouts_never_reach_the_aggregator():
    data = synthetic_dataset(num_clients=10, per_client=20)
    f = make_fleet(
        population=1000,
        seed=5,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        dropout=0.4,
        speed={"dist": "exponential", "mean": 10},
    )
    alg = AsyncFleetSim(
        nn.Linear(5, 3),
        data,
        F.cross_entropy,
        fleet=f,
        concurrency=8,
        buffer_size=3,
        client=ClientSpec(steps=1, batch_size=8),
        trace=True,
    )
    trained = []
    real_train = alg._train
    alg._train = lambda tid, client, start: (trained.append(tid), real_train(tid, client, start))[1]
    for _ in range(20):
        m = alg.step()
    dropped = {tid for _, kind, tid, *_ in alg.sched.trace if kind == "drop"}
    done = [tid for _, kind, tid, *_ in alg.sched.trace if kind == "done"]
    assert len(dropped) == m["dropouts"] > 10
    assert trained == done  # every completed trip, in arrival order, and nothing else
    assert not dropped & set(trained)
    assert m["updates"] == 3 and m["uploads"] == len(done) == 60


def test_async_same_seed_same_run_and_resume_is_bit_identical(tmp_path):
    data = synthetic_dataset(num_clients=10, per_client=20)

    def build():
        return small_async_sim(data, concurrency=12, server=ServerOptimizerSpec("fedavgm", lr=0.7), max_staleness=6)

    hist = assert_resume_is_bit_identical(build, 10, tmp_path)
    again = build()
    assert [_strip(again.step()) for _ in range(10)] == [_strip(r) for r in hist]


def test_max_staleness_bounds_the_versions_held_in_memory():
    data = synthetic_dataset(num_clients=10, per_client=20)
    f = make_fleet(
        population=10_000,
        seed=1,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        speed={"dist": "lognormal", "median": 10, "sigma": 2.0},
    )
    alg = AsyncFleetSim(
        nn.Linear(5, 3),
        data,
        F.cross_entropy,
        fleet=f,
        concurrency=30,
        buffer_size=2,
        client=ClientSpec(steps=1, batch_size=4),
        max_staleness=3,
    )
    for _ in range(30):
        m = alg.step()
        assert m["versions_in_memory"] <= 3 + 1  # snapshots of v-3..v-1 + the live weights
        assert m["staleness_max"] <= 3
    assert m["stale_discarded"] > 0 and alg.peak_snapshots <= 4


def test_memory_does_not_grow_with_population():
    data = synthetic_dataset(num_clients=10, per_client=20)

    def peak(n):
        f = make_fleet(
            population=n,
            seed=0,
            train_sizes=data.train_sizes.numpy(),
            model_bytes=4 * 10**6,
            speed={"dist": "lognormal", "median": 10, "sigma": 1.0},
            dropout=0.05,
        )
        tracemalloc.start()
        alg = AsyncFleetSim(
            nn.Linear(5, 3), data, F.cross_entropy, fleet=f, concurrency=200, buffer_size=10, null_client=True
        )
        for _ in range(1000):
            alg.step()
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, huge = peak(10**3), peak(10**8)
    assert huge < 1.2 * small + 200_000, (small, huge)
    assert huge < 5_000_000


def test_a_fleet_where_no_client_can_finish_ends_with_a_clear_message():
    data = synthetic_dataset(num_clients=10, per_client=20)
    f = make_fleet(
        population=1000,
        seed=0,
        train_sizes=data.train_sizes.numpy(),
        model_bytes=72,
        speed=1.0,
        session_s={"dist": "uniform", "low": 1, "high": 10},
    )  # trips take 20 s, sessions <= 10 s
    alg = AsyncFleetSim(nn.Linear(5, 3), data, F.cross_entropy, fleet=f, concurrency=10, null_client=True)
    with pytest.raises(FleetStalled, match="session_s"):
        alg.step()
    sync = SyncFleetSim(
        nn.Linear(5, 3), data, F.cross_entropy, fleet=fleet(speed=1.0), cohort=3, deadline_s=5.0, null_client=True
    )
    with pytest.raises(FleetStalled, match="deadline_s"):
        for _ in range(200):
            sync.step()


def test_concurrency_above_population_is_refused():
    with pytest.raises(ValueError, match="async.concurrency"):
        AsyncScheduler(fleet(population=10), 11)
