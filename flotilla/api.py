"""The Python API: bring a ``torch.nn.Module``, federated data and a loss; train with one call.

    import flotilla
    result = flotilla.train(model, {"alice": ds_a, "bob": ds_b}, rounds=20, cohort=2)

The CLI (``flotilla run``) is a thin layer over :func:`train` and :func:`run_experiment`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.config import ConfigError, ExperimentConfig, validate
from flotilla.core.client import ClientSpec, LossFn
from flotilla.core.evaluate import evaluate
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.data.base import FederatedDataset, from_torch_datasets
from flotilla.runner import Runner
from flotilla.runs.rundir import RunDir
from flotilla.sim.sync import SyncFedAvg


@dataclass
class TrainResult:
    model: nn.Module                  # the user's module, holding the final global weights
    weights: torch.Tensor             # the final global weights as one flat vector
    history: list[dict[str, Any]]     # one metrics record per round
    run_dir: Path | None


def as_federated(data) -> FederatedDataset:
    """Accept a FederatedDataset, a ``{client: Dataset}`` mapping, or a ``(train, test)`` pair of them."""
    if isinstance(data, FederatedDataset):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, Mapping) for d in data):
        return from_torch_datasets(data[0], data[1])
    if isinstance(data, Mapping):
        return from_torch_datasets(data)
    raise TypeError(f"data: expected a FederatedDataset, a {{client: Dataset}} mapping or a (train, test) pair, got {type(data).__name__}")


def eval_clients(dataset: FederatedDataset, max_clients: int | None, seed: int) -> list[int]:
    """All clients with test data, or a fixed seeded subset of them."""
    have_test = [c for c in range(dataset.num_clients) if dataset.num_test(c) > 0]
    if max_clients is not None and max_clients < len(have_test):
        rng = np.random.default_rng([seed, 0xE7A1])
        have_test = sorted(rng.choice(have_test, size=max_clients, replace=False).tolist())
    return have_test


def train(
    model: nn.Module,
    data,
    loss_fn: LossFn = F.cross_entropy,
    *,
    rounds: int = 10,
    cohort: int = 10,
    client: ClientSpec | Mapping[str, Any] = ClientSpec(),
    server: ServerOptimizerSpec | Mapping[str, Any] = ServerOptimizerSpec(),
    weighting: str | None = None,
    seed: int = 0,
    eval_every: int = 1,
    eval_max_clients: int | None = None,
    eval_batch_size: int = 1024,
    run_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 1,
    progress: bool = False,
    tensorboard: bool = False,
    workers: int = 1,
    privacy: Any = None,
    secure_aggregation: Any = None,
) -> TrainResult:
    """Synchronous federated training of ``model`` (in place) on ``data``.

    ``client`` and ``server`` accept the spec dataclasses or plain dicts of their fields
    (``server={"name": "fedadam", "lr": 0.01}``).  With ``run_dir`` set, metrics, checkpoints,
    the final model and a plot are written there; ``resume=True`` continues from its checkpoint.
    ``workers=N`` trains each round's cohort in N processes (Linux; see flotilla.sim.parallel).
    ``weighting`` defaults to ``"examples"`` (``"uniform"`` under user-level DP).
    ``privacy`` (a :class:`flotilla.privacy.PrivacySpec` or the ``privacy:`` config section as a
    dict) adds sample-level DP-SGD and/or user-level DP-FedAvg; training then stops early when
    the privacy budget is spent (see docs/privacy.md).
    ``secure_aggregation`` (a :class:`flotilla.secure.wiring.SecureAggregationSpec` or the
    ``secure_aggregation:`` config section as a dict, ``{}`` for the defaults) runs every round
    through the secure-aggregation protocol, so the server sees only the sum of the cohort's
    updates; composes with ``privacy`` (see docs/security.md).
    """
    dataset = as_federated(data)
    client = client if isinstance(client, ClientSpec) else ClientSpec(**client)
    server = server if isinstance(server, ServerOptimizerSpec) else ServerOptimizerSpec(**server)
    dp = None
    if privacy is not None:
        from flotilla.privacy import PrivacyError, PrivacySpec, prepare_model
        dp = PrivacySpec.from_dict(privacy)
        if workers > 1:
            raise PrivacyError("workers: DP trains every client in one process; use workers=1")
        prepare_model(model, dp)  # e.g. nn.LSTM -> Opacus DPLSTM, before the model is bound to a flat vector
    if secure_aggregation is not None and workers > 1:
        raise ValueError("workers: secure aggregation runs the protocol over the whole cohort in one process; use workers=1")
    if weighting is None:
        weighting = "uniform" if dp is not None and dp.user_level is not None else "examples"
    if workers > 1:
        from flotilla.sim.parallel import ParallelFedAvg
        algorithm = ParallelFedAvg(model, dataset, loss_fn, cohort=cohort, client=client, server=server,
                                   weighting=weighting, seed=seed, workers=workers)
    else:
        algorithm = SyncFedAvg(model, dataset, loss_fn, cohort=cohort, client=client, server=server, weighting=weighting, seed=seed)
    if dp is not None:
        from flotilla.privacy import make_private
        algorithm = make_private(algorithm, dp, rounds=rounds, eval_every=eval_every)
        rounds = algorithm.rounds  # fewer if the privacy budget ends first
    if secure_aggregation is not None:  # after make_private: with user-level DP the noise moves into the protocol
        from flotilla.secure.wiring import make_secure
        make_secure(algorithm, secure_aggregation)
    clients = eval_clients(dataset, eval_max_clients, seed)
    evaluate_fn = (lambda w: evaluate(algorithm.flat, w, dataset, clients, loss_fn, eval_batch_size)) if clients else None
    return run_algorithm(algorithm, model, evaluate_fn, rounds=rounds, run_dir=run_dir, resume=resume,
                         eval_every=eval_every, checkpoint_every=checkpoint_every, progress=progress,
                         tensorboard=tensorboard, stop=algorithm.budget_spent if dp is not None else None)


def run_algorithm(algorithm, model: nn.Module, evaluate_fn, *, rounds: int, run_dir: str | Path | None, resume: bool,
                  **runner_options) -> TrainResult:
    """Drive a built algorithm with the Runner (fresh or resumed run directory) and load the final
    weights into ``model``.  Shared by :func:`train` and the fleet simulator's experiments."""
    rd = RunDir(run_dir) if run_dir is not None else None
    runner = Runner(algorithm, evaluate_fn, rounds=rounds, run_dir=rd, **runner_options)
    if resume:
        runner.resume()
    elif rd is not None:
        rd.path.mkdir(parents=True, exist_ok=True)
        if rd.metrics_file.exists():
            rd.metrics_file.unlink()
    try:
        history = runner.run()
    finally:
        if hasattr(algorithm, "close"):
            algorithm.close()
    algorithm.flat.load(algorithm.weights)
    return TrainResult(model, algorithm.weights.clone(), history, rd.path if rd else None)


# --- config-driven experiments (what `flotilla run` calls) -----------------------------------
def _run_name(cfg: ExperimentConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.task.name}-{cfg.server.optimizer}-{stamp}"


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Build the task named in ``cfg`` and train it, writing a run directory."""
    from flotilla.tasks.registry import build_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg.task, cfg.seed)
    if cfg.cohort > task.dataset.num_clients:
        raise ConfigError(f"invalid config:\n  cohort: {cfg.cohort} is larger than the population ({task.dataset.num_clients} clients in {cfg.task.name})")
    path = Path(run_dir) if run_dir is not None else Path(cfg.output.dir) / (cfg.output.name or _run_name(cfg))
    rd = RunDir(path)
    if cfg.privacy is not None and cfg.privacy.user_level is not None:
        from flotilla.privacy import PrivacySpec, plan_user_level
        # delta vs population, target epsilon vs rounds, budget: refused before the run directory is written
        plan_user_level(PrivacySpec.from_dict(cfg.privacy.model_dump()).user_level, population=task.dataset.num_clients,
                        expected_cohort=float(cfg.cohort if cfg.mode == "sync" else cfg.async_.buffer_size),
                        rounds=cfg.rounds, accountant=cfg.privacy.accountant)
    if not resume:
        if rd.has_state():
            raise FileExistsError(f"{path} already holds a run; use --resume {path} or another output.name")
        rd.write_config(cfg.model_dump(mode="json"))
    if cfg.mode == "async" or cfg.fleet is not None:  # simulated fleet: FedBuff/FedAsync or sync with stragglers
        from flotilla.sim.fleet import run_fleet_experiment
        return run_fleet_experiment(cfg, task, path, resume)
    c, s = cfg.client, cfg.server
    return train(
        task.model, task.dataset, task.loss_fn, rounds=cfg.rounds, cohort=cfg.cohort,
        client=ClientSpec(c.epochs, c.steps, c.batch_size, c.lr, c.momentum, c.weight_decay),
        server=ServerOptimizerSpec(s.optimizer, s.lr, s.momentum, s.beta1, s.beta2, s.tau),
        weighting=cfg.weighting, seed=cfg.seed, eval_every=cfg.eval.every, eval_max_clients=cfg.eval.max_clients,
        eval_batch_size=cfg.eval.batch_size, run_dir=path, resume=resume, checkpoint_every=cfg.output.checkpoint_every,
        progress=cfg.output.progress, tensorboard=cfg.output.tensorboard, workers=cfg.workers,
        privacy=cfg.privacy.model_dump() if cfg.privacy is not None else None,
        secure_aggregation=cfg.secure_aggregation.model_dump() if cfg.secure_aggregation is not None else None,
    )


def resume_experiment(run_dir: str | Path) -> TrainResult:
    cfg = validate(RunDir(run_dir).read_config())
    return run_experiment(cfg, run_dir=run_dir, resume=True)
