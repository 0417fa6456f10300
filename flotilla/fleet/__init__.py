"""A fleet of devices in simulated time: population, availability, durations, scheduling.

    from flotilla.fleet import make_fleet, AsyncScheduler, SyncScheduler

The algorithms that train on a fleet (FedBuff, FedAsync, synchronous FedAvg with
over-selection and deadlines) live in :mod:`flotilla.sim.fleet`.
"""

from flotilla.fleet.clock import AsyncScheduler, FleetStalled, RoundOutcome, SyncScheduler
from flotilla.fleet.distributions import make_distribution
from flotilla.fleet.fleet import Fleet, fleet_from_config, make_fleet

__all__ = [
    "AsyncScheduler",
    "Fleet",
    "FleetStalled",
    "RoundOutcome",
    "SyncScheduler",
    "fleet_from_config",
    "make_distribution",
    "make_fleet",
]
