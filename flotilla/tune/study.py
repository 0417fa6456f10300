"""``flotilla tune``: an Optuna study over Flotilla runs, stored in SQLite next to the trial runs.

Folder layout (``output:``, default ``tune/<file name>``)::

    study.db            the Optuna study (RDB storage): resumable, shared by worker processes
    study.lock          held while a worker picks its next trial (so the count is exact)
    trials/trial-0003/  one Flotilla run directory per trial
    target/             proxy tuning: the chosen config trained once on the target task
    trials.csv, trials.md, best_so_far.png, best.yaml   written when the study is done

Workers: every process runs the same loop (``--workers N`` starts N - 1 more, or run the command
again with ``--resume``).  Under the lock a worker counts finished + running trials and asks
Optuna for the next one; it records a heartbeat while it trains.  A trial whose process died (no
heartbeat for 3 x ``heartbeat_s``) or was interrupted is failed and its configuration queued
again, so a resumed study finishes the same number of trials without running any twice.  The
sampler is seeded per trial number, so a resumed study draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flotilla.tune.space import Space
from flotilla.tune.trial import run_trial

DB = "study.db"
STUDY = "flotilla"
SQLITE_MAGIC = b"SQLite format 3\x00"


class StudyError(ValueError):
    """The study database cannot be used; one line naming the file."""


def _optuna():
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats are used with ask/tell here on purpose (our own loop and heartbeat thread)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def make_sampler(method: str, seed: int, startup: int):
    optuna = _optuna()
    if method in ("random", "hyperband"):
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def make_pruner(space: Space):
    optuna = _optuna()
    if space.cfg.method in ("hyperband", "bohb"):
        hb = space.cfg.hyperband
        return optuna.pruners.HyperbandPruner(
            min_resource=hb.min_rounds, max_resource=space.rounds, reduction_factor=hb.eta
        )
    return optuna.pruners.NopPruner()


def open_study(db: Path, space: Space, create: bool):
    """The study in ``db`` (created with ``create``); an unreadable file is one StudyError line."""
    optuna = _optuna()
    if db.exists() and db.stat().st_size > 0:
        with open(db, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                raise StudyError(f"{db}: not a readable study database (not an SQLite file)")
    hb = space.cfg.heartbeat_s
    fingerprint = json.dumps({"method": space.cfg.method, "space": space.cfg.space}, sort_keys=True)
    try:
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db}",
            heartbeat_interval=max(1, round(hb)),
            grace_period=max(3, round(3 * hb)),
            engine_kwargs={"connect_args": {"timeout": 60}},
        )
        if create:
            study = optuna.create_study(study_name=STUDY, storage=storage, direction="minimize", load_if_exists=True)
            study.set_user_attr("space", fingerprint)
        else:
            study = optuna.load_study(study_name=STUDY, storage=storage)
    except StudyError:
        raise
    except Exception as e:  # sqlalchemy / optuna errors on a damaged or foreign database
        raise StudyError(
            f"{db}: not a readable study database ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if study.user_attrs.get("space") not in (None, fingerprint):
        raise StudyError(f"{db}: this study was made with another method or search space; use another output folder")
    study.pruner = make_pruner(space)
    return study


@contextlib.contextmanager
def _locked(folder: Path):
    with open(folder / "study.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _requeue_dead(study) -> None:
    """Fail trials whose process died; queue again each failed trial that did not raise an error."""
    optuna = _optuna()
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


class _Heartbeat:
    """Records a running trial's heartbeat in the storage until stopped."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.interval = self.storage.get_heartbeat_interval() or 10
        self.done = threading.Event()
        self.storage.record_heartbeat(self.trial_id)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.done.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def stop(self):
        self.done.set()
        self.thread.join()


def _suggest(trial, space: Space) -> dict[str, Any]:
    params = {}
    for key, (kind, args) in space.dims.items():
        if kind == "choice":
            params[key] = trial.suggest_categorical(key, args)
        elif kind == "int":
            params[key] = trial.suggest_int(key, *args)
        else:
            params[key] = trial.suggest_float(key, *args, log=kind == "log_uniform")
    return params


def releases(space: Space) -> int:
    """N of the DP Laplace scale: given, or every evaluation of every trial."""
    n = space.cfg.noise.releases
    if n is not None:
        return n
    every = int(space.tuning_base.get("eval", {}).get("every", 1))
    return space.cfg.trials * max(1, -(-space.rounds // every))


def _next_trial(study, space: Space, folder: Path):
    """``(trial, heartbeat, running)``: the next trial, its parameters sampled, its heartbeat started;
    ``(None, None, running)`` when finished + running trials make the study's count."""
    states = _optuna().trial.TrialState
    cfg = space.cfg
    with _locked(folder):
        _requeue_dead(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in (states.COMPLETE, states.PRUNED) for t in trials)
        running = sum(t.state == states.RUNNING for t in trials)
        if finished + running >= cfg.trials:
            return None, None, running
        # seeded by the count of sampled (not re-queued) trials: a resumed study draws as an
        # uninterrupted one would, whatever was queued again in between
        drawn = sum("retry_of" not in t.user_attrs for t in trials)
        study.sampler = make_sampler(cfg.method, cfg.seed * 100_003 + drawn, cfg.startup_trials)
        trial = study.ask()
        beat = _Heartbeat(study, trial)
        _suggest(trial, space)  # sampled here, with this seeded sampler (a Ray task reads them back)
        return trial, beat, running


def work(study, space: Space, folder: Path, echo=print) -> int:
    """Run trials until the study has ``trials`` finished ones; returns how many this process ran."""
    ran = 0
    while True:
        trial, beat, running = _next_trial(study, space, folder)
        if trial is None:
            if running == 0:
                return ran
            time.sleep(min(1.0, space.cfg.heartbeat_s))  # others' trials may finish or die
            continue
        try:
            _run_one(study, trial, space, folder, echo)
            ran += 1
        finally:
            beat.stop()


def _run_one(study, trial, space: Space, folder: Path, echo) -> None:
    optuna = _optuna()
    params = _suggest(trial, space)
    run_dir = folder / "trials" / f"trial-{trial.number:04d}"

    def report(value: float, round_: int) -> bool:
        trial.report(value, step=round_)
        return trial.should_prune()

    try:
        r = run_trial(
            space.config(params), run_dir, space.cfg.noise, space.cfg.seed, trial.number, releases(space), report
        )
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # queued again on --resume
        raise
    except BaseException as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    for key, value in vars(r).items():
        trial.set_user_attr(key, value)
    if r.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, r.tuner_error)
    what = "pruned" if r.pruned else "diverged" if r.diverged else "done"
    echo(
        f"trial {trial.number}: {what} after {r.rounds} rounds, tuner error {r.tuner_error:.4f}, "
        f"true error {r.true_error:.4f}, {r.wall_s:.1f} s"
    )


def _spawn(path: Path, folder: Path, overrides: list[str], n: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "flotilla.cli", "tune", str(path), "--resume", "--out", str(folder)]
    for item in overrides:
        cmd += ["--set", item]
    return [subprocess.Popen(cmd) for _ in range(n)]
