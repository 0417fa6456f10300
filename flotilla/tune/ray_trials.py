"""Trials as Ray tasks (``flotilla tune SPACE --ray [--ray-address ADDR]``).

The driver (this process) runs the same loop as a worker process (:func:`flotilla.tune.study.work`):
under the study lock it asks Optuna for the next trial and samples its parameters with the seeded
sampler, keeps the trial's heartbeat, and hands the trial to a Ray task, up to ``--workers`` at once.
The task opens the same study (the SQLite file, by path), trains the run in its own run directory
``trials/trial-NNNN``, reports every evaluation to the study and asks the pruner itself (Hyperband
and BOHB prune inside the task), and tells Optuna the result.  A task whose worker died (or was
cancelled) leaves its trial failed without an error, so it is queued again like a killed process's.

Ray is started as the Ray runtime starts it (:func:`flotilla.sim.ray_start.init_ray`):
without an address a private local Ray sized for the trials, workers at niceness 0; otherwise
the cluster at the address.  The study folder must be at the same path on every node (shared
file system); see docs/tuning.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from flotilla.sim.ray_config import RAY_EXTRA, RuntimeConfig
from flotilla.sim.ray_start import check_reachable, init_ray


def check_address(address: str | None) -> None:
    """The address's form, as ``runtime.address`` takes it; one line naming ``--ray-address``."""
    from pydantic import ValidationError

    try:
        RuntimeConfig(name="ray", address=address)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"--ray-address: {address!r}: {msg}") from None


def start_ray(address: str | None, cpus: int):
    """``(ray, started)``: Ray initialised for the trials; ``started`` if this call started it.

    Not installed: one ImportError line; a malformed or dead address: one ValueError line."""
    check_address(address)
    try:
        import ray
    except ImportError:
        raise ImportError(f"flotilla tune --ray needs Ray, which is not installed here: {RAY_EXTRA}") from None
    if ray.is_initialized():  # e.g. a caller's Ray: use it, leave it running
        if address not in (None, "auto"):
            check_reachable(address, "--ray-address")
        return ray, False
    init_ray(ray, address, cpus, "--ray-address")  # the same private local Ray as the Ray runtime's
    return ray, True


def check_resources(space, gpus: float, ray=None) -> None:
    """A trial's CPUs (``threads``) and GPUs against the device and (with ``ray``) the cluster: a task
    that asks for more than the cluster has would wait for ever."""
    from flotilla.config import validate

    if not (gpus >= 0):
        raise ValueError(f"--ray-gpus-per-trial: must be >= 0, got {gpus}")
    if validate(space.tuning_base).device == "cuda" and not gpus:
        raise ValueError(
            "--ray-gpus-per-trial: the trials train on device: cuda, and a Ray task sees no GPU unless it reserves "
            "a share; give one (e.g. 0.5: two trials per GPU), or device: cpu"
        )
    if ray is None:
        return
    have = ray.cluster_resources()
    cpus = space.cfg.threads or 1
    if cpus > have.get("CPU", 0.0):
        raise ValueError(
            f"threads: a trial reserves {cpus} CPUs (the tuning file's threads), the Ray cluster has {have.get('CPU', 0.0):g}"
        )
    if gpus > have.get("GPU", 0.0):
        raise ValueError(
            f"--ray-gpus-per-trial: a trial reserves {gpus:g} GPUs, the Ray cluster has {have.get('GPU', 0.0):g}"
        )


def _trial_task(db: str, space, trial_id: int, folder: str, paths: list[str]) -> list[str]:
    """One trial, on a Ray worker: open the study, train, report, prune, tell.  Returns the echo lines."""
    for p in reversed(paths):  # the driver's import path: a task factory such as tests.x:task
        if p not in sys.path:
            sys.path.insert(0, p)
    from flotilla.tune.study import _optuna, _run_one, open_study

    optuna = _optuna()
    study = open_study(Path(db), space, create=False)
    trial = optuna.trial.Trial(study, trial_id)
    lines: list[str] = []
    _run_one(study, trial, space, Path(folder), lines.append)
    return lines


def work_on_ray(study, space, folder: Path, concurrency: int, ray, gpus: float = 0.0, echo=print) -> int:
    """Run trials as Ray tasks until the study has ``trials`` finished ones; returns how many ran here."""
    from flotilla.tune.study import DB, _next_trial, _optuna

    states = _optuna().trial.TrialState
    folder = folder.resolve()
    cpus = space.cfg.threads or 1
    # no retries: a retried task would re-run a trial that may have told the study already
    task = ray.remote(_trial_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    paths = [os.getcwd()] + [p for p in sys.path if p]
    flying: dict[Any, tuple[Any, Any]] = {}  # object ref -> (trial, heartbeat)
    ran = 0

    def settle(ref, died: BaseException | None = None, error: str | None = None) -> None:
        trial, beat = flying.pop(ref)
        beat.stop()
        if study._storage.get_trial(trial._trial_id).state != states.RUNNING:
            return  # the task told the study (complete, pruned, or failed with its error)
        if error is not None:  # raised before the trial ran (e.g. the study could not be opened there)
            study._storage.set_trial_user_attr(trial._trial_id, "error", error)
        # the task died (or was cancelled) before telling: failed, so queued again on the next ask
        study.tell(trial, state=states.FAIL, skip_if_finished=True)  # it may have told just now
        if died is not None:
            echo(f"trial {trial.number}: its Ray task died ({type(died).__name__}); queued again")

    try:
        while True:
            running = 0
            while len(flying) < concurrency:
                trial, beat, running = _next_trial(study, space, folder)
                if trial is None:
                    break
                ref = task.remote(str(folder / DB), space, trial._trial_id, str(folder), paths)
                flying[ref] = (trial, beat)
            if not flying:
                if running == 0:
                    return ran
                time.sleep(min(1.0, space.cfg.heartbeat_s))  # other processes' trials may finish or die
                continue
            done, _ = ray.wait(list(flying), num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    lines = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the trial raised: stop, like a worker process
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    what = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
                    settle(ref, error=what)
                    raise RuntimeError(f"a trial failed on Ray: {what}") from None
                except ray.exceptions.RayError as e:  # the worker died, the task was cancelled
                    settle(ref, died=e)
                    continue
                settle(ref)
                ran += 1
                for line in lines:
                    echo(line)
    finally:  # an error or Ctrl-C: stop the other tasks; their trials are failed and queued again on --resume
        for ref in list(flying):
            ray.cancel(ref, force=True)
            settle(ref)
