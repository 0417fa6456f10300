"""The base of every config section (pydantic): unknown keys are refused.

Every section schema (experiment, task, fleet, network, privacy, ...) derives from ``Section``,
so a rule that must hold for every key of every config lives here, once.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
