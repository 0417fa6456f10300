"""The client-algorithm registry: what ``client.algorithm: {name: ...}`` may name.

Adding a client algorithm is one module (its config schema, its components, its refusals; see
flotilla/algorithms/fedprox.py) plus one line in ``ALGORITHMS`` below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from flotilla.algorithms import fedprox, scaffold
from flotilla.algorithms.base import ClientAlgorithm, Parts, Setting
from flotilla.core.protocols import Shape
from flotilla.core.schema import Section


class FedAvgConfig(Section):
    """FedAvg's client update: plain local SGD (the default when client.algorithm is not given)."""

    name: Literal["fedavg"]


FEDAVG = ClientAlgorithm("fedavg", FedAvgConfig, lambda cfg, shape: Parts())

ALGORITHMS: dict[str, ClientAlgorithm] = {
    a.name: a
    for a in (
        FEDAVG,
        fedprox.ALGORITHM,
        scaffold.ALGORITHM,
    )
}


def algorithm_names() -> list[str]:
    return list(ALGORITHMS)


def algorithm_config_union():
    """The ``client.algorithm`` config type: one schema per registered algorithm, told apart by ``name``."""
    return Annotated[Union[tuple(a.schema for a in ALGORITHMS.values())], Field(discriminator="name")]  # noqa: UP007


def _entry(cfg) -> ClientAlgorithm:
    name = cfg.get("name") if isinstance(cfg, dict) else getattr(cfg, "name", None)
    if name not in ALGORITHMS:
        raise ValueError(f"client.algorithm.name: unknown client algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name]


def as_config(cfg):
    """A ``client.algorithm`` section given as a plain dict -> its schema (validated)."""
    entry = _entry(cfg)
    return entry.schema.model_validate(cfg) if isinstance(cfg, dict) else cfg


def refusal(cfg, setting: Setting) -> str | None:
    """Why ``cfg`` cannot run in ``setting`` (one line naming the key), or None."""
    cfg = as_config(cfg)
    return _entry(cfg).refuse(cfg, setting)


def network_refusal(cfg) -> str | None:
    """Why ``flotilla serve`` cannot run ``cfg`` yet, or None."""
    if cfg is None:
        return None
    cfg = as_config(cfg)
    why = _entry(cfg).network
    return f"client.algorithm: {cfg.name} does not run over the network yet: {why}" if why else None


def algorithm_parts(cfg, shape: Shape, setting: Setting) -> Parts:
    """The parts of ``cfg``'s algorithm for a runtime of this shape; refuses what cannot work."""
    cfg = as_config(cfg)
    why = _entry(cfg).refuse(cfg, setting)
    if why:
        raise ValueError(why)
    if not shape.trains and cfg.name != "fedavg":
        raise ValueError(f"client.algorithm: {cfg.name} needs clients that train; {shape.name} runs a null client")
    parts = _entry(cfg).build(cfg, shape)
    parts.name = cfg.name
    return parts


def describe(cfg: Any) -> str:
    return "fedavg" if cfg is None else ", ".join(f"{k}={v}" for k, v in as_config(cfg).model_dump().items())
