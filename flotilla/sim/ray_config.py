"""Config section ``runtime:`` (pydantic; imported by :mod:`flotilla.config`): where a run's
synchronous rounds (and, on Ray, the async fleet's trips) are trained.

    runtime: {name: in-process}                   # the default: one process (flotilla.sim.sync)
    runtime: {name: processes}                    # worker processes on this machine; `workers: N` says how many
    runtime: {name: ray, actors: 4, address: auto}  # Ray actors on a Ray cluster (flotilla.sim.ray_runtime)

Import-light (no torch, no ray) so that validating a config stays instant and works where Ray is
not installed.  Leaving the section out keeps the old behaviour: ``workers: N > 1`` selects the
processes runtime.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from flotilla.core.schema import Section

RAY_EXTRA = "pip install 'flotilla[ray]'"
RAY_CLIENT_ALGORITHMS = ("fedavg", "fedprox")  # client updates an actor builds itself (sim/ray_runtime.py)
RAY_KEYS = ("address", "actors", "cpus_per_actor", "gpus_per_actor", "max_restarts", "on_client_error")


class RuntimeConfig(Section):
    """Where synchronous rounds are trained: in this process, in worker processes, or on Ray actors
    (which also train the async fleet's trips)."""

    name: Literal["in-process", "processes", "ray"] = Field(
        "in-process",
        description="in-process (default), processes (workers: N on this machine) or ray (actors on a "
        f"Ray cluster; needs {RAY_EXTRA}; see docs/ray.md)",
    )
    address: str | None = Field(
        None,
        description="ray: null = start a private local Ray; auto = join the cluster started on this machine with "
        "`ray start`; host:port = that cluster's head; ray://host:10001 = through Ray Client",
    )
    actors: int = Field(
        2,
        ge=1,
        description="ray: actors that train each round's cohort, or the async fleet's trips (each holds "
        "one model and its own copy of the task data)",
    )
    cpus_per_actor: float = Field(
        1.0, gt=0, description="ray: CPUs each actor reserves (also its torch threads, at least 1)"
    )
    gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="ray: GPUs each actor reserves, may be a fraction (0.25: four actors share a GPU); > 0 "
        "trains on the actor's GPU (device cuda on its node); the cluster must have them",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="ray: times a dead actor is restarted (its clients or trips are retried); beyond that the "
        "round or step fails",
    )
    on_client_error: Literal["stop", "skip"] = Field(
        "stop",
        description="ray: a client whose training raises stops the run (stop: the error names the client), "
        "or is left out of its round like a dropout (skip: failed_clients in the metrics)",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v):
        if v is None or v == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", v):
            return v
        raise ValueError("must be null (a private local Ray), 'auto', 'host:port' or 'ray://host:port'")


def check_runtime(cfg) -> None:
    """Cross-section checks of ``cfg.runtime`` (an ExperimentConfig); each error names its key."""
    rt = cfg.runtime
    if rt is None:
        return
    # Judged by value, not presence: a saved config.yaml lists every key with its default.
    given = [k for k in RAY_KEYS if getattr(rt, k) != RuntimeConfig.model_fields[k].default]
    if rt.name != "ray" and given:
        raise ValueError(f"runtime.{given[0]}: only used with runtime.name: ray (got runtime.name: {rt.name})")
    if rt.name == "in-process" and cfg.workers > 1:
        raise ValueError(
            f"runtime.name: in-process trains in one process, but workers: {cfg.workers}; use "
            f"runtime.name: processes, or workers: 1"
        )
    if rt.name == "in-process":
        return
    if rt.name == "ray" and getattr(cfg, "device", None) == "cuda" and not rt.gpus_per_actor:
        raise ValueError(
            "runtime.gpus_per_actor: device: cuda on runtime.name: ray trains on the actors' GPUs; set "
            "gpus_per_actor > 0 (e.g. 0.25), or device: cpu"
        )
    if rt.name == "ray" and cfg.mode == "async":
        _check_ray_async(cfg)
        return
    if cfg.mode == "async" or cfg.fleet is not None:
        raise ValueError(
            f"runtime.name: {rt.name} runs synchronous rounds"
            + (" and the async fleet (mode: async)" if rt.name == "ray" else " only")
            + "; the synchronous fleet simulator (fleet with mode: sync) runs in-process "
            "(remove runtime, or use runtime.name: in-process)"
        )
    if rt.name == "processes":
        if cfg.workers < 2:  # ParallelFedAvg with one worker is in-process, but refuses what in-process composes
            raise ValueError(
                "runtime.name: processes trains in `workers` processes; set workers: 2 or more "
                "(workers: 1 is runtime.name: in-process)"
            )
        return
    if cfg.workers > 1:
        raise ValueError(
            f"runtime.name: ray trains on runtime.actors Ray actors; workers: {cfg.workers} is for "
            f"runtime.name: processes (set workers: 1)"
        )
    # privacy, secure aggregation and FedProx compose (DP-SGD / FedProx on the actors, user-level clipping
    # and SecAgg masking there, the noise and the unmasking on the driver); SCAFFOLD keeps per-client state
    _check_client_algorithm(cfg)


def _check_ray_async(cfg) -> None:
    """The async fleet on Ray (flotilla.sim.ray_fleet): the actors train the trips (plain, DP-SGD, FedProx);
    the buffer (FedBuff, DP-FedBuff, the secure buffer) stays on the driver."""
    _check_client_algorithm(cfg)


def _check_client_algorithm(cfg) -> None:
    algo = cfg.client.algorithm
    if algo is not None and algo.name not in RAY_CLIENT_ALGORITHMS:
        raise ValueError(
            f"runtime: client.algorithm: {algo.name} is not supported on runtime.name: ray (the actors build the "
            f"client updates of {', '.join(RAY_CLIENT_ALGORITHMS)}; SCAFFOLD's per-client control variates live "
            f"in the driver's store and are not shipped with each client's call); use runtime.name: in-process"
        )
