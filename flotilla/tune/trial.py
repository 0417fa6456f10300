"""One trial: a Flotilla run (its own run directory) whose evaluations the tuner sees through the noise.

The run is ``flotilla.experiment.run.run_experiment`` with an ``observe`` hook: every evaluation
also scores each evaluation client's examples (one forward pass), makes the tuner's noisy error
(:mod:`flotilla.tune.noisy_eval`) beside the true error, reports it to Optuna at that round, and
stops the run when Optuna's pruner says so (Hyperband / BOHB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flotilla.config import validate
from flotilla.core.evaluate import client_correct, eval_clients
from flotilla.experiment.run import run_experiment
from flotilla.runner import DivergedError
from flotilla.tune.noisy_eval import NoiseConfig, NoisyEvaluation


@dataclass
class TrialResult:
    rounds: int  # budget spent: server rounds trained
    tuner_error: float  # the last noisy error the tuner saw (1.0 if training diverged)
    true_error: float  # 1 - accuracy on all evaluation clients at the same round
    wall_s: float
    pruned: bool
    diverged: bool
    run_dir: str


def observer(noise: NoiseConfig, seed: int, number: int, releases: int, cfg, report=None):
    """The ``observe`` hook of run_experiment: noisy evaluation, reporting and pruning.

    It replaces the run's evaluation (same clients, same pooled loss and accuracy) so that each
    evaluation is one forward pass; personalised evaluation (eval.personalize) is not kept.

    ``report(value, round) -> bool``: tell the tuner; True asks to stop (prune) the run."""
    state: dict[str, Any] = {"pruned": False}

    def observe(algorithm, task, evaluate_fn, stop):
        clients = eval_clients(task.dataset, cfg.eval.max_clients, cfg.seed)
        if not clients:
            raise ValueError(f"task {task.name}: no client has test data; a trial cannot be evaluated")
        noisy = NoisyEvaluation(noise, [task.dataset.num_test(c) for c in clients], seed, number, releases)

        def evaluate(weights):
            # one forward pass gives both the true metrics and the per-client errors the noise needs
            correct, loss = client_correct(
                algorithm.flat, weights, task.dataset, clients, cfg.eval.batch_size, task.loss_fn
            )
            n = sum(len(c) for c in correct)
            record = {"loss": loss / n, "accuracy": float(sum(int(c.sum()) for c in correct)) / n}
            record.update(noisy(correct, algorithm.round))
            if report is not None and algorithm.round < cfg.rounds:
                state["pruned"] = bool(report(record["tuner_error"], algorithm.round))
            return record

        def stop_rule(record):
            return state["pruned"] or (stop is not None and stop(record))

        return evaluate, stop_rule

    return observe, state


def run_trial(
    raw: dict[str, Any], run_dir: Path, noise: NoiseConfig, seed: int, number: int, releases: int, report=None
) -> TrialResult:
    """Train one configuration (a raw experiment config) in ``run_dir`` and score it."""
    raw = dict(raw, output={**raw.get("output", {}), "progress": False, "plot": False})
    cfg = validate(raw)
    observe, state = observer(noise, seed, number, releases, cfg, report)
    try:
        result = run_experiment(cfg, run_dir=run_dir, observe=observe)
    except DivergedError:
        from flotilla.runs.rundir import RunDir

        history = RunDir(run_dir).read_metrics()  # the rounds before the model became non-finite
        done = int(history[-1]["round"]) + 1 if history else 1
        wall = float(history[-1]["wall_time_s"]) if history else 0.0
        return TrialResult(done, 1.0, 1.0, wall, False, True, str(run_dir))  # diverged: the worst error
    last = [r for r in result.history if r.get("tuner_error") is not None]
    if not last:
        raise ValueError(f"trial {number}: the run evaluated nothing (eval.every larger than rounds?)")
    rec = last[-1]
    return TrialResult(
        rounds=int(result.history[-1]["round"]),
        tuner_error=float(rec["tuner_error"]),
        true_error=float(rec["true_error"]),
        wall_s=float(result.history[-1]["wall_time_s"]),
        pruned=bool(state["pruned"]),
        diverged=False,
        run_dir=str(run_dir),
    )
