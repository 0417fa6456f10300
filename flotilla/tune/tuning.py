"""``flotilla tune``'s entry point: a study run by worker processes (flotilla.tune.study) or by Ray
tasks (flotilla.tune.ray_trials), then its table, plot and chosen config (flotilla.tune.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flotilla.config import ConfigError
from flotilla.tune.space import Space, load_space
from flotilla.tune.study import DB, _locked, _spawn, open_study, work


def tune(
    path: str | Path,
    *,
    resume: bool = False,
    workers: int = 1,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_gpus: float | None = None,
    echo=print,
) -> dict[str, Any]:
    """Run (or continue) the study a tuning file describes; write its table, plot and best config.

    ``ray``: the trials are Ray tasks, ``workers`` at once (flotilla.tune.ray_trials); a private local
    Ray unless ``ray_address`` names a cluster; each task reserves ``ray_gpus`` GPUs (default 0)."""
    from flotilla.tune.report import finish

    path = Path(path)
    space = load_space(path, overrides)
    if workers < 1:
        raise ConfigError(f"--workers: {workers} (need >= 1)")
    folder = Path(out or space.cfg.output or Path("tune") / path.stem)
    db = folder / DB
    if not resume and db.exists():
        raise FileExistsError(f"{db} already holds a study; continue it with --resume, or choose another --out")
    if resume and not db.exists():
        raise FileNotFoundError(f"nothing to resume: {db} does not exist")
    if ray or ray_address is not None or ray_gpus is not None:
        return _tune_on_ray(space, folder, resume, workers, ray_address, ray_gpus or 0.0, echo)
    folder.mkdir(parents=True, exist_ok=True)
    study = open_study(db, space, create=not resume)
    children = _spawn(path, folder, overrides or [], workers - 1) if workers > 1 else []
    try:
        work(study, space, folder, echo)
    finally:
        for child in children:
            child.wait()
    bad = [c.returncode for c in children if c.returncode]
    if bad:
        raise RuntimeError(f"{len(bad)} worker process(es) failed (exit {bad[0]}); continue with --resume")
    with _locked(folder):
        return finish(study, space, folder, echo)


def _tune_on_ray(space: Space, folder: Path, resume: bool, workers: int, address: str | None, gpus: float, echo):
    from flotilla.tune.ray_trials import check_resources, start_ray, work_on_ray
    from flotilla.tune.report import finish

    check_resources(space, gpus)
    if (folder / DB).exists():  # unreadable: one line before Ray starts
        open_study(folder / DB, space, create=False)
    ray, started = start_ray(address, workers * (space.cfg.threads or 1))  # checked before anything is written
    try:
        check_resources(space, gpus, ray)
        folder.mkdir(parents=True, exist_ok=True)
        study = open_study(folder / DB, space, create=not resume)
        work_on_ray(study, space, folder, workers, ray, gpus, echo)
    finally:
        if started:
            ray.shutdown()
    with _locked(folder):
        return finish(study, space, folder, echo)
