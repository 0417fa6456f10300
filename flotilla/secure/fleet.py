"""Building the fleet simulator's FedBuff with its buffer inside the secure buffer, as
``flotilla run`` does for ``mode: async`` with a ``secure_aggregation:`` section (the run itself is
:func:`flotilla.sim.fleet.run_fleet_experiment`, which calls :func:`~flotilla.secure.wiring.make_secure`).
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
