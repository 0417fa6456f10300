"""``flotilla run`` for ``mode: async`` with a ``secure_aggregation:`` section: the fleet simulator's
FedBuff with its buffer inside the secure buffer (see :mod:`flotilla.secure.fedbuff`).

This mirrors :func:`flotilla.sim.fleet.run_fleet_experiment` with one step added: after the
algorithm is built (and made private, if the config asks), :func:`~flotilla.secure.wiring.make_secure`
swaps the secure buffer in.
"""
from __future__ import annotations


def build_secure_fleet_algorithm(cfg, task):
    """(algorithm, rounds) for ``cfg``: the fleet algorithm, DP if configured, then the secure buffer."""
    from flotilla.secure.wiring import make_secure
    from flotilla.sim.fleet import build_fleet_algorithm

    if getattr(cfg, "privacy", None) is not None:
        from flotilla.privacy import with_privacy
        algorithm, rounds = with_privacy(cfg, task, lambda: build_fleet_algorithm(cfg, task))
    else:
        algorithm, rounds = build_fleet_algorithm(cfg, task), cfg.rounds
    make_secure(algorithm, cfg.secure_aggregation.model_dump())
    return algorithm, rounds


def run_secure_fleet_experiment(cfg, task, path, resume: bool):
    """Like :func:`flotilla.sim.fleet.run_fleet_experiment`, with secure aggregation."""
    from flotilla.api import TrainResult, eval_clients
    from flotilla.core.evaluate import evaluate
    from flotilla.runner import Runner
    from flotilla.runs.rundir import RunDir

    algorithm, rounds = build_secure_fleet_algorithm(cfg, task)
    clients = eval_clients(task.dataset, cfg.eval.max_clients, cfg.seed)
    evaluate_fn = (lambda w: evaluate(algorithm.flat, w, task.dataset, clients, task.loss_fn, cfg.eval.batch_size)) if clients else None
    rd = RunDir(path)
    max_t = cfg.fleet.max_sim_time_s if cfg.fleet is not None else None
    stop = (lambda rec: rec.get("sim_time_s", 0.0) >= max_t) if max_t is not None else None
    runner = Runner(algorithm, evaluate_fn, rounds=rounds, eval_every=cfg.eval.every, run_dir=rd,
                    checkpoint_every=cfg.output.checkpoint_every, progress=cfg.output.progress,
                    tensorboard=cfg.output.tensorboard, stop=stop)
    if resume:
        runner.resume()
    else:
        rd.path.mkdir(parents=True, exist_ok=True)
        if rd.metrics_file.exists():
            rd.metrics_file.unlink()
    history = runner.run()
    algorithm.flat.load(algorithm.weights)
    return TrainResult(task.model, algorithm.weights.clone(), history, rd.path)
