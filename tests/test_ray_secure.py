"""Secure aggregation and FedProx on the Ray runtime (flotilla/sim/ray_secure.py, sim/ray_runtime.py):
the driver keeps the protocol's state, each actor masks its own clients' inputs and sums them mod
2^bits, the driver unmasks.  Ring sums are exact, so the final weights equal in-process bit for bit
with any number of actors (driver and actors train with one torch thread: the deltas themselves are
then the same bits).  Also the GPU refusal on a cluster without GPUs."""

import importlib.util

import pytest
import torch

from flotilla.config import validate
from flotilla.experiment.run import build
from flotilla.secure.aggregator import DropoutSim
from flotilla.sim.ray_runtime import RayFedAvg
from flotilla.tasks import build_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")

TIMING = ("secagg_client_s", "secagg_server_s")  # protocol compute: host time, not part of the result


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (cpus_per_actor: 1)
    yield
    torch.set_num_threads(threads)


def config(runtime=None, **extra):
    raw = {
        "task": {"name": "fashion-mnist", "num_clients": 8, "examples_per_client": 20, "partition": "iid"},
        "rounds": 3,
        "cohort": 5,
        "client": {"batch_size": 10},
        "server": {"optimizer": "fedadam", "lr": 0.01},
        **extra,
    }
    if runtime is not None:
        raw["runtime"] = runtime
    return validate(raw)


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def same_as_in_process(rounds: int, actors: list[int], edit=None, **extra):
    """Run in-process and on Ray with each actor count; ``edit(algorithm, round)`` may change both before a
    round.  Returns the in-process records after asserting the Ray runs equal them (weights and records)."""
    cfg = config(**extra)
    reference, _, _, _ = build(cfg, build_task(cfg.task, cfg.seed))
    ref_records = []
    for r in range(rounds):
        if edit:
            edit(reference, r)
        ref_records.append(reference.step())
    for n in actors:
        rcfg = config({"name": "ray", "actors": n}, **extra)
        algorithm, _, _, _ = build(rcfg, build_task(rcfg.task, rcfg.seed))
        try:
            records = []
            for r in range(rounds):
                if edit:
                    edit(algorithm, r)
                records.append(algorithm.step())
            assert torch.equal(algorithm.weights, reference.weights), f"{n} actor(s)"
            assert without_timing(records) == without_timing(ref_records), f"{n} actor(s)"
        finally:
            algorithm.close()
    return ref_records


def test_secagg_with_dropouts_and_an_abort_is_bit_identical_on_one_actor(local_ray, one_thread):
    """SecAgg (complete graph) with simulated dropouts before sending (masks recovered from the
    survivors' shares) and after sending (included, no help unmasking); round 3 aborts in key setup
    (3 of 5 drop before advertising: fewer than the threshold), so no server step there."""

    def edit(algorithm, r):
        if r == 2:
            algorithm.aggregator.dropout = DropoutSim(advertise=0.6)

    records = same_as_in_process(
        3, [1], edit, secure_aggregation={"degree": "full", "dropout": {"mask": 0.2, "unmask": 0.2}}
    )
    assert records[0]["secagg_updates"] == 4 and records[0]["secagg_dropped"] == 2
    assert records[2]["aborted"] and "only 2 clients advertised keys" in records[2]["abort_reason"]


def test_dp_secagg_plus_and_fedprox_on_two_actors_are_bit_identical(local_ray, one_thread):
    """Two actors regroup nothing here: the ring sum is exact, so the bits are in-process's.
    User-level DP inside SecAgg+ (degree 2: sparse masking graph; clients clip to S on the actors,
    the noise is added to the unmasked sum on the driver), and FedProx's client update built by the
    actors, with a client dropping before it sends its input."""
    privacy = {"user_level": {"clip_norm": 0.2, "noise_multiplier": 1.0}}
    records = same_as_in_process(
        2,
        [2],
        weighting="uniform",
        privacy=privacy,
        secure_aggregation={"degree": 2, "dropout": {"mask": 0.2}},
        client={"batch_size": 10, "algorithm": {"name": "fedprox", "mu": 0.5}},
    )
    assert records[0]["secagg_dropped"] == 1 and records[0]["secagg_l2_clipped"] == records[0]["secagg_updates"] == 4
    assert records[-1]["epsilon"] > 0


def test_gpus_per_actor_without_gpus_in_the_cluster_is_one_line(local_ray):
    cfg = config()
    task = build_task(cfg.task, cfg.seed)
    algorithm = RayFedAvg(task.model, task.dataset, task.loss_fn, cohort=5, actors=2, gpus_per_actor=0.25)
    with pytest.raises(ValueError) as e:
        algorithm.step()
    assert str(e.value) == (
        "runtime.gpus_per_actor: 2 actors x 0.25 GPUs need 0.5 GPUs, the Ray cluster has 0 (no node has a GPU); "
        "use gpus_per_actor: 0"
    )
    assert algorithm._handles == [] and algorithm.round == 0 and local_ray.is_initialized()
