"""The async fleet on Ray (mode: async with runtime: {name: ray}; flotilla/sim/ray_fleet.py): the clock,
scheduler and buffer stay on the driver, trips are trained on the actors.  On a local Ray with 2 CPUs:
the same bits as in-process AsyncFleetSim (weights, staleness metrics, sim_time_s; driver and actors
train with one torch thread), a resume, an actor killed mid-step; and the refusals.
"""

import importlib.util
import sys

import pytest
import torch

from flotilla.config import ConfigError, validate
from flotilla.experiment.run import build
from flotilla.experiment.runtimes import runtime_for
from flotilla.sim.fleet import AsyncFleetSim
from flotilla.tasks import build_task

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'flotilla[ray]')")


def config(runtime=None, algorithm="fedbuff", **extra):
    raw = {
        "task": {"name": "fashion-mnist", "num_clients": 8, "examples_per_client": 20, "partition": "iid"},
        "rounds": 3,
        "mode": "async",
        "fleet": {"population": 50},
        "async": {"algorithm": algorithm, "concurrency": 6, "buffer_size": 3, "max_staleness": 3},
        "client": {"batch_size": 10},
        "server": {"optimizer": "fedadam", "lr": 0.01},
        **extra,
    }
    if algorithm == "fedasync":
        del raw["async"]["buffer_size"]
    if runtime is not None:
        raw["runtime"] = runtime
    return validate(raw)


def built(cfg):
    algorithm, _, _, _ = build(cfg, build_task(cfg.task, cfg.seed))
    return algorithm


def same(a, b):
    assert torch.equal(a.weights, b.weights)
    assert a.staleness_histogram() == b.staleness_histogram()
    assert a.sched.now == b.sched.now


# DP-FedBuff's noise inside the secure buffer, with DP-SGD on the clients (the actors)
PRIVATE_SECURE = {
    "privacy": {
        "user_level": {"clip_norm": 0.5, "noise_multiplier": 0.8},
        "sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    },
    "secure_aggregation": {},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (cpus_per_actor: 1): training is then the same bits
    yield
    torch.set_num_threads(threads)


# -- config (no Ray needed) -----------------------------------------------------------------
def test_selection_and_refusals():
    assert runtime_for(config({"name": "ray"})).name == "ray-fleet"
    assert runtime_for(config()).name == "fleet"
    # privacy, the secure buffer and FedProx compose (test below); SCAFFOLD's per-client state does not
    for extra in (PRIVATE_SECURE, {"client": {"batch_size": 10, "algorithm": {"name": "fedprox", "mu": 0.1}}}):
        assert runtime_for(config({"name": "ray"}, **extra)).name == "ray-fleet"
    refusals = [
        ({"client": {"batch_size": 10, "algorithm": {"name": "scaffold"}}}, "runtime: client.algorithm: scaffold is"),
        ({"workers": 2}, "workers: the fleet simulator trains one client at a time"),
    ]
    for extra, message in refusals:
        with pytest.raises(ConfigError) as e:
            config({"name": "ray"}, **extra)
        assert message in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="synchronous fleet simulator .fleet with mode: sync. runs in-process"):
        raw = config({"name": "ray"}).model_dump(mode="json", by_alias=True)
        validate({k: v for k, v in raw.items() if k != "async"} | {"mode": "sync", "cohort": 5})


def test_without_ray_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = config({"name": "ray"})
    with pytest.raises(ImportError) as e:
        runtime_for(cfg).algorithm(cfg, build_task(cfg.task, cfg.seed))
    assert str(e.value) == "runtime: {name: ray} needs Ray, which is not installed here: pip install 'flotilla[ray]'"


# -- on a local Ray ---------------------------------------------------------------------------
@needs_ray
def test_fedbuff_on_ray_equals_in_process_resumes_and_survives_a_killed_actor(local_ray, one_thread):
    from flotilla.sim.ray_fleet import RayAsyncFleet

    ray = local_ray
    reference = built(config())
    ref_records = [reference.step() for _ in range(4)]
    algorithm = built(config({"name": "ray", "actors": 2}))
    assert isinstance(algorithm, RayAsyncFleet) and isinstance(algorithm, AsyncFleetSim)
    try:
        records = [algorithm.step()]
        assert algorithm._ahead  # some of step 2's trips are already on the actors
        records.append(algorithm.step())
        assert records == ref_records[:2]  # staleness, sim_time_s, trips, train_loss: all the same
        assert algorithm.trips_sent_ahead >= 2 * 3 and algorithm.trips_trained_late == 0
        # Step 3 twice from the same state: once with actor 0 killed mid-step, once without.
        before = algorithm.state_dict()
        pid = ray.get(algorithm._handles[0].info.remote())["pid"]
        send, killed = algorithm._send, []

        def send_then_kill(tid, client, weights_ref):
            ref = send(tid, client, weights_ref)
            if not killed:
                ray.kill(algorithm._handles[0], no_restart=False)  # Ray restarts it; its calls are retried
                killed.append(tid)
            return ref

        algorithm._send = send_then_kill
        faulty = algorithm.step()
        algorithm._send = send
        assert killed and ray.get(algorithm._handles[0].info.remote())["pid"] != pid
        w_faulty = algorithm.weights.clone()
        algorithm.load_state_dict(before)
        clean = algorithm.step()
        assert faulty == clean == ref_records[2] and torch.equal(w_faulty, algorithm.weights)
        # resume: a new algorithm (new actors) from step 3's checkpoint goes on with the same bits
        state = algorithm.state_dict()
    finally:
        algorithm.close()
    resumed = built(config({"name": "ray", "actors": 2}))
    try:
        resumed.load_state_dict(state)
        # one reply outstanding at a time (the window): the other trips wait on the driver, same result
        resumed.window, send, outstanding = 1, resumed._send, []
        resumed._send = lambda *trip: outstanding.append(len(resumed._ahead)) or send(*trip)
        assert resumed.step() == ref_records[3]
        assert len(outstanding) >= 3 and max(outstanding) <= 1 and resumed.trips_trained_late == 0
        same(resumed, reference)
    finally:
        resumed.close()


@needs_ray
def test_fedasync_with_arrivals_on_ray_equals_in_process_even_unpredicted(local_ray, one_thread):
    arrivals = {"algorithm": "fedasync", "concurrency": 6, "arrival_rate": 2.0, "max_staleness": 3}
    reference = built(config(**{"async": arrivals}))
    ref_records = [reference.step() for _ in range(4)]
    algorithm = built(config({"name": "ray", "actors": 2}, **{"async": arrivals}))
    try:
        assert [algorithm.step() for _ in range(3)] == ref_records[:3]
        assert algorithm.trips_trained_late == 0 and algorithm._ahead  # later trips already sent
        algorithm.close()  # their replies go with the actors; the next step starts new ones
        # a look-ahead that predicts nothing only costs time: each trip is trained when the loop reaches it
        algorithm._predict = lambda: []
        assert algorithm.step() == ref_records[3]
        assert algorithm.trips_trained_late >= 1
        same(algorithm, reference)
    finally:
        algorithm.close()


@needs_ray
def test_a_failing_client_is_named_or_skipped_and_components_are_refused(local_ray, capsys):
    from flotilla.core.client import LocalTrainer
    from flotilla.core.protocols import Components
    from flotilla.sim.ray_fleet import RayAsyncFleet
    from flotilla.sim.ray_runtime import ClientTrainingError

    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    _, kwargs = runtime_for(cfg).algorithm(cfg, task)  # AsyncFleetSim's arguments

    with pytest.raises(ValueError, match="runtime: ray: the client update Mine cannot run on Ray actors"):

        class Mine(LocalTrainer):  # a subclass may train differently: not what the actors build
            pass

        RayAsyncFleet(**kwargs, components=Components(client_update=Mine))

    def make_dataset(base, bad):  # defined in a function: Ray pickles it by value
        class Failing(type(base)):
            def train_batches(self, client, *args, **kwargs):
                if client == bad:
                    raise RuntimeError("disk on fire")
                return super().train_batches(client, *args, **kwargs)

        failing = Failing.__new__(Failing)
        failing.__dict__.update(base.__dict__)
        return failing

    bad = None
    for on_error in ("stop", "skip"):
        # the task as objects (flotilla.train(model, data)): into the object store once
        algorithm = RayAsyncFleet(**dict(kwargs, actors=1, on_client_error=on_error))
        bad = algorithm._predict()[0][1] if bad is None else bad  # the client of the first trip trained
        algorithm.dataset = make_dataset(task.dataset, bad)
        try:
            if on_error == "stop":
                with pytest.raises(ClientTrainingError, match=f"client {bad} failed in round 1: RuntimeError: disk"):
                    algorithm.step()
            else:
                record = algorithm.step()
                assert record["wasted_trips"] >= 1 and record["updates"] == 3
                assert f"client {bad} failed on trip" in capsys.readouterr().err
        finally:
            algorithm.close()


@needs_ray
def test_dp_fedbuff_in_the_secure_buffer_with_dp_sgd_on_two_actors_equals_in_process(local_ray, one_thread):
    """The actors train each trip with DP-SGD (their own DPLocalTrainer; each trip's epsilon comes back to
    the driver's trainer); each delta goes, in event order, into the driver's secure buffer, which clips
    it to S, applies the staleness weight and adds DP-FedBuff's noise inside: same bits and metrics."""
    reference = built(config(**PRIVATE_SECURE))
    ref_records = [reference.step() for _ in range(2)]
    algorithm = built(config({"name": "ray", "actors": 2}, **PRIVATE_SECURE))
    try:
        assert [algorithm.step() for _ in range(2)] == ref_records
        assert torch.equal(algorithm.weights, reference.weights)
        assert ref_records[-1]["epsilon"] > 0 and ref_records[-1]["sample_epsilon_max"] > 0
    finally:
        algorithm.close()
        reference.close()
