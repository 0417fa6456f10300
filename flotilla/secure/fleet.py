"""Building the fleet simulator's FedBuff with its buffer inside the secure buffer, as
``flotilla run`` does for ``mode: async`` with a ``secure_aggregation:`` section.
"""
from __future__ import annotations


def build_secure_fleet_algorithm(cfg, task):
    """(algorithm, rounds) for ``cfg``: the fleet algorithm, DP if configured, then the secure buffer."""
    from flotilla.sim.fleet import build_configured_fleet_algorithm

    if getattr(cfg, "secure_aggregation", None) is None:
        raise ValueError("secure_aggregation: this config has no secure_aggregation section")
    return build_configured_fleet_algorithm(cfg, task)
