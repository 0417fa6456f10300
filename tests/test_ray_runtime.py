"""The Ray runtime (runtime: {name: ray}; flotilla/sim/ray_runtime.py): the config section, the refusals
(without Ray, with secure aggregation / client algorithms), and, on a local Ray with 2 CPUs, the
same result as in-process (plain, DP-SGD, user-level DP), an actor killed mid-round, a client whose
training raises.

Tolerance: with 2 actors the weighted sum is regrouped (two partial sums added on the driver), so
the final weights may differ from in-process by float rounding: |dw| <= 1e-6 after these 3 small
rounds (measured ~1.5e-8; training amplifies such differences over longer runs, see docs/ray.md).
They are bit-identical to worker processes (workers: 2), which split and sum the same way, and with
1 actor (one torch thread on both sides) bit-identical to in-process.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import flotilla
from flotilla.config import ConfigError, validate
from flotilla.experiment.compose import build_algorithm
from flotilla.experiment.run import build
from flotilla.experiment.runtimes import runtime_for
from flotilla.sim.ray_runtime import ClientTrainingError, RayFedAvg
from flotilla.sim.sync import sample_cohort
from flotilla.tasks import build_task

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'flotilla[ray]')")


def config(runtime=None, rounds=3, **extra):
    raw = {
        "task": {"name": "fashion-mnist", "num_clients": 8, "examples_per_client": 20, "partition": "iid"},
        "rounds": rounds,
        "cohort": 5,
        "client": {"batch_size": 10},
        "server": {"optimizer": "fedadam", "lr": 0.01},
        **extra,
    }
    if runtime is not None:
        raw["runtime"] = runtime
    return validate(raw)


def run_rounds(algorithm, rounds):
    return [algorithm.step() for _ in range(rounds)]


DP_SGD = {"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
# S among the first round's delta norms (~4.78 under DP-SGD noise): some are clipped; adaptive clipping moves S
USER_LEVEL = {
    "user_level": {
        "clip_norm": 4.785,
        "noise_multiplier": 1.0,
        "sampling": "poisson",
        "adaptive_clipping": {"count_noise_multiplier": 1.0},
    }
}


# -- config (no Ray needed) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"runtime": {"name": "ray"}, "workers": 2},
            "runtime.name: ray trains on runtime.actors Ray actors; workers: 2",
        ),
        ({"runtime": {"name": "in-process", "actors": 3}}, "runtime.actors: only used with runtime.name: ray"),
        ({"runtime": {"name": "processes", "address": "auto"}}, "runtime.address: only used with runtime.name: ray"),
        ({"runtime": {"name": "in-process", "on_client_error": "skip"}}, "runtime.on_client_error: only used with"),
        (
            {"runtime": {"name": "ray", "on_client_error": "ignore"}},
            "runtime.on_client_error: Input should be 'stop' or",
        ),
        ({"runtime": {"name": "in-process"}, "workers": 2}, "runtime.name: in-process trains in one process"),
        ({"runtime": {"name": "processes"}}, "runtime.name: processes trains in `workers` processes; set workers: 2"),
        ({"runtime": {"name": "ray", "gpus_per_actor": -1}}, "runtime.gpus_per_actor: Input should be greater than"),
        (
            {"runtime": {"name": "ray"}, "device": "cuda"},
            "runtime.gpus_per_actor: device: cuda on runtime.name: ray trains on the actors' GPUs; set gpus_per_actor > 0",
        ),
        ({"runtime": {"name": "ray", "address": "not an address"}}, "runtime.address: must be null"),
        ({"runtime": {"name": "ray", "actors": 0}}, "runtime.actors: Input should be greater than or equal to 1"),
        ({"runtime": {"name": "ray", "cpus_per_actor": 0}}, "runtime.cpus_per_actor: Input should be greater than 0"),
        ({"runtime": {"name": "ray", "nodes": 2}}, "runtime.nodes: unknown key"),
        ({"runtime": {"name": "spark"}}, "runtime.name: Input should be 'in-process', 'processes' or 'ray'"),
        (
            {"runtime": {"name": "ray"}, "fleet": {"population": 50}},
            "runtime.name: ray runs synchronous rounds and the async fleet (mode: async); the synchronous fleet",
        ),
        (
            {"runtime": {"name": "ray"}, "client": {"algorithm": {"name": "scaffold"}}},
            "runtime: client.algorithm: scaffold is not supported on runtime.name: ray (the actors build the client "
            "updates of fedavg, fedprox; SCAFFOLD's per-client control variates",
        ),
    ],
)
def test_runtime_section_is_validated(extra, message):
    with pytest.raises(ConfigError) as e:
        config(**extra)
    assert message in str(e.value), str(e.value)


def test_runtime_selection():
    assert runtime_for(config()).name == "in-process"
    assert runtime_for(config(workers=2)).name == "processes"  # workers: N works as before
    assert runtime_for(config({"name": "processes"}, workers=2)).name == "processes"
    assert runtime_for(config({"name": "in-process"})).name == "in-process"
    cfg = config({"name": "ray", "actors": 3, "address": "auto", "cpus_per_actor": 0.5})
    assert runtime_for(cfg).name == "ray"
    assert (cfg.runtime.actors, cfg.runtime.address, cfg.runtime.cpus_per_actor) == (3, "auto", 0.5)
    # the saved config.yaml lists every key with its default and validates back to the same experiment
    assert validate(config({"name": "in-process"}).model_dump(mode="json")).runtime.name == "in-process"
    assert validate(cfg.model_dump(mode="json")).runtime == cfg.runtime


def test_without_ray_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = config({"name": "ray"})
    task = build_task(cfg.task, cfg.seed)
    with pytest.raises(ImportError) as e:
        runtime_for(cfg).algorithm(cfg, task)
    assert str(e.value) == ("runtime: {name: ray} needs Ray, which is not installed here: pip install 'flotilla[ray]'")
    with pytest.raises(ImportError, match=r"flotilla\[ray\]"):  # the class itself refuses the same way
        RayFedAvg(task.model, task.dataset, task.loss_fn, cohort=2)


def test_without_ray_flotilla_run_prints_one_line(monkeypatch, tmp_path, capsys):
    import yaml

    from flotilla.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    raw = config({"name": "ray"}).model_dump(mode="json")
    raw["output"].update(dir=str(tmp_path), progress=False)
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "ray.yaml")]) == 2
    assert capsys.readouterr().err == (
        "flotilla: error: runtime: {name: ray} needs Ray, which is not installed here: pip install 'flotilla[ray]'\n"
    )


def test_privacy_secure_aggregation_fedprox_and_gpus_are_accepted_by_the_config():
    cfg = config({"name": "ray"}, weighting="uniform", privacy={**DP_SGD, **USER_LEVEL})
    assert cfg.privacy is not None and runtime_for(cfg).name == "ray"
    cfg = config(
        {"name": "ray", "gpus_per_actor": 0.25},
        secure_aggregation={"degree": "auto"},
        client={"batch_size": 10, "algorithm": {"name": "fedprox", "mu": 0.1}},
    )
    assert cfg.runtime.gpus_per_actor == 0.25 and runtime_for(cfg).name == "ray"


@needs_ray
def test_scaffold_and_unknown_components_are_refused_not_skipped():
    """Built without the config's checks (as a library user could): the components they give are
    built on the driver and refused there, naming what would not run on the actors."""
    from flotilla.core.client import LocalTrainer
    from flotilla.core.protocols import Components

    cfg = config({"name": "ray"})
    task = build_task(cfg.task, cfg.seed)
    kwargs = dict(model=task.model, dataset=task.dataset, loss_fn=task.loss_fn, cohort=5, actors=2)
    with pytest.raises(ValueError) as e:
        build_algorithm(RayFedAvg, kwargs, rounds=2, client_algorithm={"name": "scaffold"})
    assert str(e.value).startswith("runtime: ray: the client update ScaffoldTrainer cannot run on Ray actors: ")
    assert "use runtime: {name: in-process}" in str(e.value)

    class Mine(LocalTrainer):  # a subclass may train differently: not what the actors would build
        pass

    with pytest.raises(ValueError, match="the client update Mine cannot run on Ray actors"):
        RayFedAvg(**kwargs, components=Components(client_update=Mine))
    with pytest.raises(ValueError, match="the aggregator WeightedMean cannot run on Ray actors"):
        from flotilla.core.aggregate import WeightedMean

        RayFedAvg(**kwargs, components=Components(aggregator=WeightedMean))
    with pytest.raises(ValueError, match="a buffer component"):
        RayFedAvg(**kwargs, components=Components(buffer=lambda buffer, version_fn: buffer))
    sampled = RayFedAvg(**kwargs, components=Components(sampler=sample_cohort))  # a sampler runs on the driver
    assert sampled.sample_cohort is sample_cohort
    prox, _ = build_algorithm(RayFedAvg, kwargs, rounds=2, client_algorithm={"name": "fedprox", "mu": 0.1})
    assert prox._update == ("fedprox", 0.1)  # what each actor builds


@needs_ray
def test_address_auto_without_a_cluster_is_one_line(monkeypatch):
    import ray

    if ray.is_initialized() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running here, so address: auto would find it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    algorithm = RayFedAvg(task.model, task.dataset, task.loss_fn, cohort=5, address="auto")
    with pytest.raises(ValueError, match=r"^runtime.address: no Ray cluster at 'auto' \(Could not find any running"):
        algorithm.step()
    assert not ray.is_initialized()


@needs_ray
class FakeRay:
    """ray.init failing ``fails`` times with ``error``, then starting."""

    def __init__(self, fails: int, error: str):
        self.fails, self.error, self.calls = fails, error, []

    def init(self, **options):
        self.calls.append(("init", options))
        if self.fails:
            self.fails -= 1
            raise Exception(self.error)  # noqa: TRY002 - Ray raises a bare Exception

    def shutdown(self):
        self.calls.append(("shutdown", {}))


def test_a_local_ray_whose_raylet_never_registers_is_started_once_more():
    from flotilla.sim.ray_start import start_local

    timeout = "The current node timed out during startup. This could happen because ..."
    ray = FakeRay(1, timeout)
    start_local(ray, num_cpus=2)
    assert [c[0] for c in ray.calls] == ["init", "shutdown", "init"]
    assert ray.calls[-1][1] == {"address": "local", "num_cpus": 2}
    with pytest.raises(Exception, match="timed out during startup"):  # twice: it gives up
        start_local(FakeRay(2, timeout), num_cpus=2)
    other = FakeRay(1, "some other failure")
    with pytest.raises(Exception, match="some other failure"):  # anything else: at once
        start_local(other, num_cpus=2)
    assert [c[0] for c in other.calls] == ["init"]


def test_a_dead_address_is_one_line_within_seconds():
    import time

    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    algorithm = RayFedAvg(task.model, task.dataset, task.loss_fn, cohort=5, address="127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^runtime.address: no Ray cluster at '127.0.0.1:1' \(Connection refused\)"):
        algorithm.step()  # Ray's own connect waited for minutes here
    assert time.monotonic() - start < 30
    assert not ray.is_initialized()


# -- on a local Ray ---------------------------------------------------------------------------


@needs_ray
def test_same_result_as_in_process_and_a_killed_actor_changes_nothing(local_ray):
    ray = local_ray
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    reference, _, _, _ = build(cfg, task)
    ref_records = run_rounds(reference, 3)
    pcfg = config(workers=2)  # worker processes split and sum exactly as 2 actors do
    processes, _, _, _ = build(pcfg, build_task(pcfg.task, pcfg.seed))
    try:
        run_rounds(processes, 3)
    finally:
        processes.close()

    rcfg = config({"name": "ray", "actors": 2})
    rtask = build_task(rcfg.task, rcfg.seed)
    algorithm, _, _, _ = build(rcfg, rtask)
    assert isinstance(algorithm, RayFedAvg) and algorithm._task_config is not None  # actors build the data
    try:
        records = run_rounds(algorithm, 2)
        for mine, ref in zip(records, ref_records):
            assert mine["examples_seen"] == ref["examples_seen"] and mine["clients"] == ref["clients"]
            assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        # Round 3 twice from the same state: once with actor 0 killed mid-round, once without.
        before = algorithm.state_dict()
        pid = ray.get(algorithm._handles[0].info.remote())["pid"]
        submit = algorithm._submit

        def submit_then_kill(rank, weights_ref, share):
            ref = submit(rank, weights_ref, share)
            if rank == 0:
                ray.kill(algorithm._handles[0], no_restart=False)  # Ray restarts it (max_restarts)
            return ref

        algorithm._submit = submit_then_kill
        faulty = algorithm.step()
        algorithm._submit = submit
        assert ray.get(algorithm._handles[0].info.remote())["pid"] != pid  # a new process
        w_faulty = algorithm.weights.clone()
        algorithm.load_state_dict(before)
        clean = algorithm.step()
        assert torch.equal(w_faulty, algorithm.weights)  # the fault-free result, bit for bit
        assert faulty == clean
        assert torch.equal(algorithm.weights, processes.weights)  # same split, same sums: same bits
        assert (algorithm.weights - reference.weights).abs().max().item() <= 1e-6
        assert clean["train_loss"] == pytest.approx(ref_records[2]["train_loss"], rel=1e-5)
    finally:
        algorithm.close()
    assert algorithm._handles == [] and ray.is_initialized()  # close() leaves a Ray it did not start


@needs_ray
def test_one_actor_is_bit_identical_and_a_failing_client_is_named(local_ray, capsys):
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    # the client that first trains in round 2 (not in round 1's cohort)
    bad = next(c for c in sample_cohort(cfg.seed, 1, 8, 5).tolist() if c not in sample_cohort(cfg.seed, 0, 8, 5))

    def make_dataset(base, bad):  # defined in a function: Ray pickles it by value, no import needed there
        class Failing(type(base)):
            def train_batches(self, client, *args, **kwargs):
                if client == bad:
                    raise RuntimeError("disk on fire")
                return super().train_batches(client, *args, **kwargs)

        failing = Failing.__new__(Failing)
        failing.__dict__.update(base.__dict__)
        return failing

    reference, _, _, _ = build(cfg, build_task(cfg.task, cfg.seed))  # its own model: trained in place
    reference.step()
    # flotilla.train(model, data, runtime=...): the task goes to the actor once, through the object store
    fresh = build_task(cfg.task, cfg.seed)
    result = flotilla.train(
        fresh.model,
        fresh.dataset,
        rounds=1,
        cohort=5,
        client={"batch_size": 10},
        server={"optimizer": "fedadam", "lr": 0.01},
        runtime={"name": "ray", "actors": 1},
    )
    assert torch.equal(result.weights, reference.weights)
    algorithm = RayFedAvg(
        task.model,
        make_dataset(task.dataset, bad),
        task.loss_fn,
        cohort=5,
        actors=1,
        client=reference.trainer.spec,
        server=reference.server_opt.spec,
        seed=cfg.seed,
    )
    try:
        algorithm.step()
        assert torch.equal(algorithm.weights, reference.weights)  # 1 actor keeps SyncFedAvg's order
        before = algorithm.weights.clone()
        with pytest.raises(ClientTrainingError) as e:
            algorithm.step()
        assert str(e.value) == f"client {bad} failed in round 2: RuntimeError: disk on fire"
        assert e.value.client == bad and "disk on fire" in e.value.detail
        assert algorithm.round == 1 and torch.equal(algorithm.weights, before)  # the round is abandoned
        algorithm.on_client_error = "skip"  # runtime.on_client_error: skip
        record = algorithm.step()
        assert algorithm.round == 2 and record["failed_clients"] == 1 and record["examples_seen"] == 4 * 20
        assert f"client {bad} failed in round 2, left out: RuntimeError: disk on fire" in capsys.readouterr().err
        assert not torch.equal(algorithm.weights, before)  # the other four clients made the step
    finally:
        algorithm.close()


@needs_ray
def test_actors_that_cannot_build_the_task_are_named(local_ray):
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    common = dict(cohort=5, actors=1, max_restarts=0)
    missing = cfg.task.model_copy(update={"root": "/nonexistent/fashion-mnist"})  # data not on that node
    algorithm = RayFedAvg(task.model, task.dataset, task.loss_fn, task_config=missing, **common)
    with pytest.raises(RuntimeError, match=r"^runtime: ray: an actor could not build the task: .*nonexistent"):
        algorithm.step()
    assert algorithm.round == 0 and algorithm._handles == []
    other = cfg.task.model_copy(update={"num_clients": 9})  # builds, but not the driver's task
    algorithm = RayFedAvg(task.model, task.dataset, task.loss_fn, task_config=other, **common)
    with pytest.raises(ValueError, match="actor 0 built a task with .* and 9 clients, the driver has .* and 8"):
        algorithm.step()
    assert algorithm._handles == []
    too_many = RayFedAvg(task.model, task.dataset, task.loss_fn, cohort=5, actors=3)  # the local Ray has 2 CPUs
    with pytest.raises(ValueError, match=r"^runtime.actors: 3 actors x 1 CPUs .* need 3 CPUs, the Ray cluster has 2;"):
        too_many.step()


@needs_ray
def test_dp_sgd_on_one_actor_is_bit_identical_to_in_process(local_ray):
    """Sample-level DP-SGD: the actor builds its own DPLocalTrainer from the driver's spec; same seed,
    same noise, same weights bit for bit, and the same per-client epsilons in the metrics."""
    cfg = config(rounds=2, privacy=DP_SGD)
    reference, _, _, _ = build(cfg, build_task(cfg.task, cfg.seed))
    rcfg = config({"name": "ray", "actors": 1}, rounds=2, privacy=DP_SGD)
    algorithm, _, _, _ = build(rcfg, build_task(rcfg.task, rcfg.seed))
    assert isinstance(algorithm.inner, RayFedAvg)
    try:
        ref_records, records = run_rounds(reference, 2), run_rounds(algorithm, 2)
        assert torch.equal(algorithm.weights, reference.weights)
        assert records == ref_records  # train loss, sample_epsilon_max / _mean, ...
        assert records[0]["sample_epsilon_max"] > 0
    finally:
        algorithm.close()
        reference.close()
    # flotilla.train(model, data): the model goes to the actor as an object, a copy from before the
    # driver's DP-SGD trainer hooked Opacus into it
    fresh = build_task(cfg.task, cfg.seed)
    result = flotilla.train(
        fresh.model,
        fresh.dataset,
        rounds=2,
        cohort=5,
        client={"batch_size": 10},
        server={"optimizer": "fedadam", "lr": 0.01},
        privacy=DP_SGD,
        runtime={"name": "ray", "actors": 1},
    )
    assert torch.equal(result.weights, reference.weights)


@needs_ray
def test_user_level_dp_on_two_actors_equals_in_process(local_ray):
    """User-level DP-FedAvg (Poisson cohorts, adaptive clipping) with DP-SGD: each actor clips its
    clients' deltas to the driver's S and sums them, the driver adds the noise and divides by m.

    Tolerance: 2 actors regroup the sum of clipped deltas (two partial sums), so the weights may
    differ from in-process by float rounding: |dw| <= 1e-6 after 3 rounds (measured ~1e-8).  The noise, the clip norm
    (adaptive: from the integer unclipped count), the epsilons and the cohorts are identical."""
    privacy = {**DP_SGD, **USER_LEVEL}
    cfg = config(weighting="uniform", privacy=privacy)
    reference, _, _, _ = build(cfg, build_task(cfg.task, cfg.seed))
    rcfg = config({"name": "ray", "actors": 2}, weighting="uniform", privacy=privacy)
    algorithm, _, _, _ = build(rcfg, build_task(rcfg.task, rcfg.seed))
    try:
        ref_records, records = run_rounds(reference, 3), run_rounds(algorithm, 3)
        assert (algorithm.weights - reference.weights).abs().max().item() <= 1e-6
        for mine, ref in zip(records, ref_records):
            assert mine.pop("train_loss") == pytest.approx(ref.pop("train_loss"), rel=1e-5)
            assert mine == ref  # epsilon, delta, clip_norm, dp_updates, clients, sample epsilons, ...
        assert records[-1]["epsilon"] > 0 and records[0]["clip_norm"] != records[-1]["clip_norm"]
        assert 0 < records[0]["clipped_fraction"] < 1
    finally:
        algorithm.close()
        reference.close()


DRIVER_ONLY_MODULE = """
import torch


class DriverOnlyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)
"""


@needs_ray
def test_a_task_given_as_objects_whose_code_is_only_on_the_drivers_path_trains_on_the_actors(local_ray, tmp_path):
    """The actors unpickle the user's model after putting the driver's sys.path on theirs (a module
    found by the driver through sys.path only failed with ModuleNotFoundError on the actor)."""
    from torch.utils.data import TensorDataset

    (tmp_path / "driver_only_mod.py").write_text(DRIVER_ONLY_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import driver_only_mod

        g = torch.Generator().manual_seed(0)
        data = {
            f"u{i}": TensorDataset(torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g))
            for i in range(6)
        }
        kw = dict(rounds=2, cohort=3, client={"steps": 2, "batch_size": 4}, threads=1)
        torch.manual_seed(0)
        ray_run = flotilla.train(driver_only_mod.DriverOnlyNet(), data, runtime={"name": "ray", "actors": 1}, **kw)
        torch.manual_seed(0)
        local = flotilla.train(driver_only_mod.DriverOnlyNet(), data, **kw)
        assert torch.equal(ray_run.weights, local.weights)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("driver_only_mod", None)
