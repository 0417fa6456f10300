"""What a client algorithm is to the rest of Flotilla: a config schema, a refusal check and a
builder of the components it contributes.  Nothing here knows the runtimes' classes: an
algorithm reads the :class:`~flotilla.core.protocols.Shape` the runtime declares and answers
with :class:`~flotilla.core.protocols.Components` (as privacy and secure aggregation do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flotilla.core.protocols import Components, Shape


@dataclass(frozen=True)
class Setting:
    """What a client algorithm is composed with: read from the config (before any work) or from the
    built algorithm's Shape and the privacy / secure aggregation sections (when it is built)."""

    aggregation: str = "round"  # Shape.aggregation: round, buffer or per_update
    composable: bool = True  # False: workers > 1 (ParallelFedAvg trains in its own processes)
    why_not_composable: str = ""
    sample_level_dp: bool = False  # DP-SGD replaces the client update
    user_level_dp: bool = False  # DP-FedAvg / DP-FedBuff clip and noise the aggregate
    secure_aggregation: bool = False  # the server sees only sums

    @classmethod
    def of(cls, shape: Shape, privacy: dict | None = None, secure_aggregation: Any = None) -> Setting:
        def given(key):  # a privacy dict (the config section) or a PrivacySpec
            return (privacy.get(key) if isinstance(privacy, dict) else getattr(privacy, key, None)) is not None

        return cls(
            shape.aggregation,
            shape.composable,
            shape.why_not_composable,
            given("sample_level"),
            given("user_level"),
            secure_aggregation is not None,
        )


class Parts:
    """What a built client algorithm contributes: factories the runtime's algorithm calls, and a
    wrapper around the built algorithm (for state it must checkpoint).  The default adds nothing."""

    name = "fedavg"
    components = Components()

    def wrap(self, algorithm):
        return algorithm


@dataclass(frozen=True)
class ClientAlgorithm:
    """One registry entry (flotilla/algorithms/registry.py)."""

    name: str
    schema: type  # pydantic Section with ``name: Literal[name]``
    build: Callable[[Any, Shape], Parts]  # (config section, shape) -> parts; after refuse() said None
    refuse: Callable[[Any, Setting], str | None] = lambda spec, setting: None  # one line naming the key, or None
    network: str = ""  # why flotilla serve cannot run it yet ("" = it can)


def not_composable(name: str, setting: Setting, uses: str) -> str | None:
    """The refusal shared by every algorithm that brings a component: worker processes never call it."""
    if not setting.composable:
        return (
            f"client.algorithm: {name} {uses}, but {setting.why_not_composable or 'this runtime trains elsewhere'}; "
            f"use a runtime that trains in this process (workers: 1)"
        )
    return None
