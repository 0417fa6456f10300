"""The runtimes a config can run on, in one registry: which algorithm class a config selects and
the constructor arguments it gets.  The network runtime (``flotilla serve``) is built by
:mod:`flotilla.experiment.serve`; it is not driven round by round from here.

Adding a runtime: write its algorithm (an object the Runner drives; see flotilla.core.protocols),
then one ``Runtime`` entry below that says when a config selects it and how to build it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flotilla.experiment.specs import client_spec, server_spec, staleness_spec


@dataclass(frozen=True)
class Runtime:
    name: str
    selects: Callable[[Any], bool]  # cfg -> does this runtime run it?
    algorithm: Callable[[Any, Any], tuple[type, dict]]  # (cfg, task) -> (class, constructor kwargs)


def _common(cfg, task) -> dict:
    return dict(
        model=task.model,
        dataset=task.dataset,
        loss_fn=task.loss_fn,
        client=client_spec(cfg),
        server=server_spec(cfg),
        weighting=cfg.weighting,
        seed=cfg.seed,
    )


def _in_process(cfg, task):
    from flotilla.sim.sync import SyncFedAvg

    return SyncFedAvg, dict(_common(cfg, task), cohort=cfg.cohort, device=cfg.device, vectorize=cfg.client.vectorize)


def _processes(cfg, task):
    from flotilla.sim.parallel import ParallelFedAvg

    return ParallelFedAvg, dict(_common(cfg, task), cohort=cfg.cohort, workers=cfg.workers, device=cfg.device)


def _runtime(cfg) -> str | None:
    return cfg.runtime.name if cfg.runtime is not None else None


def _ray_keys(cfg, task) -> dict:
    from flotilla.sim.ray_runtime import import_ray

    import_ray()  # without Ray: one line naming the extra, before anything is built
    rt = cfg.runtime
    # Actors build the task from its config with the task registry; a task handed over as objects
    # (flotilla.train(model, data), task: {name: python} without a factory) goes to them once instead.
    from_config = task.name == cfg.task.name and not (cfg.task.name == "python" and not cfg.task.factory)
    return dict(
        actors=rt.actors,
        address=rt.address,
        cpus_per_actor=rt.cpus_per_actor,
        gpus_per_actor=rt.gpus_per_actor,
        max_restarts=rt.max_restarts,
        on_client_error=rt.on_client_error,
        task_config=cfg.task if from_config else None,
    )


def _ray(cfg, task):
    from flotilla.sim.ray_runtime import RayFedAvg

    return RayFedAvg, dict(_common(cfg, task), cohort=cfg.cohort, **_ray_keys(cfg, task))


def _ray_fleet(cfg, task):
    """The async fleet with its trips trained on Ray actors (the clock and the buffer stay here)."""
    keys = _ray_keys(cfg, task)
    from flotilla.sim.ray_fleet import RayAsyncFleet

    _, kwargs = _fleet(cfg, task)
    return RayAsyncFleet, dict(kwargs, **keys)


def _message_bytes(cfg, task) -> tuple[int, int] | None:
    """(download, upload) bytes of one message with ``channels`` (None: fp32): the fleet's transfers."""
    if getattr(cfg, "channels", None) is None:
        return None
    from flotilla.channels.sim import message_bytes

    return message_bytes(cfg.channels, [tuple(p.shape) for p in task.model.parameters() if p.requires_grad])


def _fleet(cfg, task):
    from flotilla.fleet.config import FleetConfig
    from flotilla.fleet.fleet import fleet_from_config
    from flotilla.sim.fleet import AsyncFleetSim, SyncFleetSim

    fcfg = cfg.fleet if cfg.fleet is not None else FleetConfig()
    numel = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    from flotilla.fairness.parts import fleet_tiers

    tiers = fleet_tiers(cfg, task)  # device tiers scale speeds and bandwidths (tiers: section)
    fleet = fleet_from_config(
        fcfg,
        cfg.seed,
        task.dataset.train_sizes.numpy(),
        numel * 4,
        cfg.client,
        message_bytes=_message_bytes(cfg, task),
        tiers=tiers,
    )
    common = dict(_common(cfg, task), fleet=fleet)
    if _runtime(cfg) != "ray":  # on Ray the actors hold the GPUs (gpus_per_actor); the driver trains nothing
        common["device"] = cfg.device
    if cfg.mode == "async":
        a = cfg.async_
        return AsyncFleetSim, dict(
            common,
            concurrency=a.concurrency,
            algorithm=a.algorithm,
            buffer_size=a.buffer_size,
            staleness=staleness_spec(cfg),
            normalize=a.normalize,
            max_staleness=a.max_staleness,
            mixing=a.mixing,
            arrival_rate=a.arrival_rate,
        )
    return SyncFleetSim, dict(common, cohort=cfg.cohort, over_selection=fcfg.over_selection, deadline_s=fcfg.deadline_s)


RUNTIMES = (
    Runtime("ray-fleet", lambda cfg: cfg.mode == "async" and _runtime(cfg) == "ray", _ray_fleet),
    Runtime("fleet", lambda cfg: cfg.mode == "async" or cfg.fleet is not None, _fleet),
    Runtime("ray", lambda cfg: _runtime(cfg) == "ray", _ray),
    Runtime("processes", lambda cfg: cfg.workers > 1 or _runtime(cfg) == "processes", _processes),
    Runtime("in-process", lambda cfg: True, _in_process),
)


def runtime_for(cfg) -> Runtime:
    return next(r for r in RUNTIMES if r.selects(cfg))
