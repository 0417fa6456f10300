"""The Python API: bring a ``torch.nn.Module``, federated data and a loss; train with one call.

    import flotilla
    result = flotilla.train(model, {"alice": ds_a, "bob": ds_b}, rounds=20, cohort=2)

Every keyword is a key of the YAML config, under the same name and with the same validation
(``server={"optimizer": "fedadam", "lr": 0.01}``, ``mode="async"``, ``fleet={...}``,
``privacy={...}``); ``flotilla run CONFIG`` and the equivalent call build the same experiment
(flotilla.experiment.run).  The model and data take the place of the config's ``task:`` section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn import functional as F

from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientSpec, LossFn
from flotilla.core.dataset import as_federated
from flotilla.core.evaluate import eval_clients
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.experiment.run import TrainResult, resume_experiment, run_algorithm, run_experiment
from flotilla.runs.rundir import RunDir
from flotilla.tasks import Task

_SPEC_KEYS = {"server": {"name": "optimizer"}}  # a spec dataclass field -> its YAML key


def _section(value, key: str):
    """A config section given as a dict (YAML names) or as the core's spec dataclass."""
    if value is None or isinstance(value, Mapping):
        return value
    if dataclasses.is_dataclass(value):
        renames = _SPEC_KEYS.get(key, {})
        return {renames.get(k, k): v for k, v in dataclasses.asdict(value).items() if v is not None}
    raise ConfigError(f"invalid arguments:\n  {key}: expected a dict of its config keys, got {type(value).__name__}")


def train(
    model: nn.Module,
    data,
    loss_fn: LossFn = F.cross_entropy,
    *,
    rounds: int = 10,
    run_dir: str | Path | None = None,
    resume: bool = False,
    **config: Any,
) -> TrainResult:
    """Federated training of ``model`` (in place) on ``data``; returns the final model and the history.

    ``data``: a FederatedDataset, a ``{client: Dataset}`` mapping or a ``(train, test)`` pair.
    ``config``: any top-level key of the YAML config (see ``flotilla run --help``), e.g.
    ``cohort=10, client={"lr": 0.05}, server={"optimizer": "fedadam", "lr": 0.01}, mode="async",
    fleet={...}, privacy={...}, secure_aggregation={...}, workers=2, eval={"every": 5}``;
    ``async_`` (or ``**{"async": {...}}``) for the async section.  Validated as the config is:
    an unknown key or an impossible value raises ConfigError naming it.
    With ``run_dir`` set, metrics, checkpoints, the final model and a plot are written there (an
    existing run is refused unless ``resume=True``, which continues it).
    """
    raw: dict[str, Any] = {
        "task": {"name": "python"},
        "rounds": rounds,
        "output": {"progress": False, **(_section(config.pop("output", None), "output") or {})},
    }
    if "async_" in config:
        config["async"] = config.pop("async_")
    for key, value in config.items():
        raw[key] = _section(value, key) if key in ("client", "server") else value
    cfg = validate(raw)
    dataset = as_federated(data)
    if run_dir is not None and not resume and RunDir(run_dir).has_state():
        raise FileExistsError(f"{run_dir} already holds a run; pass resume=True to continue it, or another run_dir")
    task = Task("python", dataset, model, loss_fn)
    return run_experiment(cfg, run_dir=run_dir, resume=resume, task=task, write_run_dir=run_dir is not None)


__all__ = [
    "ClientSpec",
    "ServerOptimizerSpec",
    "TrainResult",
    "eval_clients",
    "resume_experiment",
    "run_algorithm",
    "run_experiment",
    "train",
]
