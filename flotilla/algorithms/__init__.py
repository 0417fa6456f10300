"""Client algorithms (FedProx, SCAFFOLD) and personalised evaluation, composed into any runtime's
algorithm through its components (see flotilla.core.protocols); the registry is
flotilla/algorithms/registry.py."""

from flotilla.algorithms.base import ClientAlgorithm, Parts, Setting
from flotilla.algorithms.registry import (
    ALGORITHMS,
    algorithm_config_union,
    algorithm_names,
    algorithm_parts,
    network_refusal,
    refusal,
)

__all__ = [
    "ALGORITHMS",
    "ClientAlgorithm",
    "Parts",
    "Setting",
    "algorithm_config_union",
    "algorithm_names",
    "algorithm_parts",
    "network_refusal",
    "refusal",
]
