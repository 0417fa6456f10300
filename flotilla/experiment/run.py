"""Run an experiment: the task, the runtime's algorithm with privacy and secure aggregation composed
in, evaluation, and the Runner over a run directory.  ``flotilla run`` and ``flotilla.train`` both
end here, so a config file and the equivalent Python call build the same experiment."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flotilla.config import ConfigError, ExperimentConfig, validate
from flotilla.core.evaluate import eval_clients, evaluate
from flotilla.experiment.compose import build_algorithm
from flotilla.experiment.init import apply_init
from flotilla.experiment.runtimes import runtime_for
from flotilla.experiment.specs import client_spec
from flotilla.fairness.parts import tier_components, with_tier_metrics
from flotilla.runner import Runner
from flotilla.runs.rundir import RunDir


@dataclass
class TrainResult:
    model: nn.Module  # the user's module, holding the final global weights
    weights: torch.Tensor  # the final global weights as one flat vector
    history: list[dict[str, Any]]  # one metrics record per round
    run_dir: Path | None


def _run_name(cfg: ExperimentConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.task.name}-{cfg.server.optimizer}-{stamp}"


def check_fits(cfg: ExperimentConfig, task) -> None:
    """What the config alone cannot check: the cohort against the task's population, the privacy plan."""
    if cfg.mode == "sync" and cfg.cohort > task.dataset.num_clients:
        raise ConfigError(
            f"invalid config:\n  cohort: {cfg.cohort} is larger than the population "
            f"({task.dataset.num_clients} clients in {cfg.task.name})"
        )
    if cfg.privacy is not None and cfg.privacy.user_level is not None:
        from flotilla.privacy import PrivacySpec, plan_user_level

        # delta vs population, target epsilon vs rounds, budget: refused before the run directory is written
        plan_user_level(
            PrivacySpec.from_dict(cfg.privacy.model_dump()).user_level,
            population=task.dataset.num_clients,
            expected_cohort=float(cfg.cohort if cfg.mode == "sync" else cfg.async_.buffer_size),
            rounds=cfg.rounds,
            accountant=cfg.privacy.accountant,
        )


def build(cfg: ExperimentConfig, task):
    """``(algorithm, rounds, evaluate_fn, stop)`` for ``cfg`` on ``task``."""
    algorithm_class, kwargs = runtime_for(cfg).algorithm(cfg, task)
    algorithm, rounds = build_algorithm(
        algorithm_class,
        kwargs,
        rounds=cfg.rounds,
        eval_every=cfg.eval.every,
        privacy=cfg.privacy.model_dump() if cfg.privacy is not None else None,
        secure_aggregation=cfg.secure_aggregation.model_dump() if cfg.secure_aggregation is not None else None,
        client_algorithm=cfg.client.algorithm,
        tiers=tier_components(cfg, task),
        channels=cfg.channels,
        embedding_rows=cfg.server.embedding_rows,
    )
    clients = eval_clients(task.dataset, cfg.eval.max_clients, cfg.seed)
    evaluate_fn = None
    if clients:
        personal = None
        if cfg.eval.personalize is not None:  # FedAvg + local fine-tuning: personal_* metrics
            from flotilla.algorithms.finetune import PersonalizedEvaluation, finetune_spec

            personal = PersonalizedEvaluation(
                algorithm.flat,
                task.dataset,
                clients,
                task.loss_fn,
                finetune_spec(cfg.eval.personalize, client_spec(cfg)),
                seed=cfg.seed,
                batch_size=cfg.eval.batch_size,
            )

        own = getattr(task, "evaluate", None)  # the task's own metrics (movielens: loss, AUC, AP)
        if own is not None and personal is not None:
            raise ConfigError(
                f"invalid config:\n  eval.personalize: reports accuracy; task {task.name} has its own metrics"
            )

        def evaluate_fn(w):
            if own is not None:
                algorithm.flat.load(w)
                return own(algorithm.flat.model, task.dataset, clients, cfg.eval.batch_size)
            record = evaluate(algorithm.flat, w, task.dataset, clients, task.loss_fn, cfg.eval.batch_size)
            return record if personal is None else {**record, **personal(w)}

    evaluate_fn = with_tier_metrics(evaluate_fn, cfg, task, algorithm, clients)  # tier_<t>_<metric>
    stops = []
    if cfg.privacy is not None:
        stops.append(algorithm.budget_spent)
    max_t = cfg.fleet.max_sim_time_s if cfg.fleet is not None else None
    if max_t is not None:
        stops.append(lambda rec: rec.get("sim_time_s", 0.0) >= max_t)
    stop = (lambda rec: any(s(rec) for s in stops)) if stops else None
    return algorithm, rounds, evaluate_fn, stop


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    task=None,
    write_run_dir: bool = True,
    observe=None,
) -> TrainResult:
    """Build the task named in ``cfg`` (or use the given ``task``) and train it, writing a run directory.

    ``observe(algorithm, task, evaluate_fn, stop) -> (evaluate_fn, stop)`` may wrap the evaluation
    and the stop rule (flotilla.tune: the noisy evaluation its tuner sees, pruning)."""
    from flotilla.tasks import build_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if task is None:
        task = build_task(cfg.task, cfg.seed)
    check_fits(cfg, task)
    apply_init(cfg, task.model)  # init: {checkpoint}: before any runtime copies the model
    path = None
    if write_run_dir:
        path = Path(run_dir) if run_dir is not None else Path(cfg.output.dir) / (cfg.output.name or _run_name(cfg))
        rd = RunDir(path)
        if not resume:
            if rd.has_state():
                raise FileExistsError(f"{path} already holds a run; use --resume {path} or another output.name")
            rd.write_config(cfg.model_dump(mode="json"))
    algorithm, rounds, evaluate_fn, stop = build(cfg, task)
    if observe is not None:
        evaluate_fn, stop = observe(algorithm, task, evaluate_fn, stop)
    return run_algorithm(
        algorithm,
        task.model,
        evaluate_fn,
        rounds=rounds,
        run_dir=path,
        resume=resume,
        eval_every=cfg.eval.every,
        checkpoint_every=cfg.output.checkpoint_every,
        progress=cfg.output.progress,
        tensorboard=cfg.output.tensorboard,
        plot=cfg.output.plot,
        stop=stop,
    )


def resume_experiment(run_dir: str | Path) -> TrainResult:
    cfg = validate(RunDir(run_dir).read_config())
    return run_experiment(cfg, run_dir=run_dir, resume=True)


def run_algorithm(
    algorithm, model: nn.Module, evaluate_fn, *, rounds: int, run_dir: str | Path | None, resume: bool, **runner_options
) -> TrainResult:
    """Drive a built algorithm with the Runner (fresh or resumed run directory) and load the final
    weights into ``model``."""
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
        algorithm.close()  # worker processes, Opacus hooks
    algorithm.flat.load(algorithm.weights)
    return TrainResult(model, algorithm.weights.clone(), history, rd.path if rd else None)
