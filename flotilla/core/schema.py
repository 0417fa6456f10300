"""The base of every config section (pydantic): unknown keys are refused.

Every section schema (experiment, task, fleet, network, privacy, ...) derives from ``Section``,
so a rule that must hold for every key of every config lives here, once:

- unknown keys are refused;
- every float is finite and fits a float32 (the models train in float32: ``lr: 1e39`` is
  finite in Python but ``inf`` in the model);
- integers fit an int64 (a seed of 10**23 overflowed in torch.manual_seed);
- integers must be integers and switches must be booleans: pydantic's lax mode would read
  ``rounds: true`` as 1 and ``rounds: "3"`` as 3.  Floats still accept strings, because YAML
  reads ``1e-3`` (no dot) as a string.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

FLOAT32_MAX = 3.4028234663852886e38
INT64_LIMIT = 2**63  # seeds go to torch.manual_seed and numpy; counts to int64 arrays


def _kinds(annotation: Any) -> set[type]:
    """The scalar types (bool, int, float, str) an annotation accepts, through Optional/Union/Literal."""
    if annotation in (bool, int, float, str):
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return set()


def _refusal(kinds: set[type], v: Any) -> str | None:
    """Why ``v`` may not be given for a key of these scalar kinds (None: let pydantic decide)."""
    number = kinds & {int, float}
    if isinstance(v, bool):
        return "must be a number, not true/false" if bool not in kinds and number else None
    if isinstance(v, int):
        if bool in kinds and not number:
            return "must be true or false"
        if int in kinds and not -INT64_LIMIT <= v < INT64_LIMIT:
            return "must fit a 64-bit integer (below 2**63 in magnitude)"
        return None
    if isinstance(v, str) and str not in kinds:
        if bool in kinds and not number:
            return "must be true or false"
        if int in kinds and float not in kinds:
            return "must be a valid integer, not a string"
        if float not in kinds:
            return None
        try:  # YAML reads 1e-3 (no dot) as a string; pydantic parses it; bound it here
            v = float(v)
        except ValueError:
            return None  # pydantic says "not a valid number"
    if isinstance(v, float):
        if int in kinds and float not in kinds:
            return "must be a valid integer (a whole number without a decimal point)"
        if float in kinds and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            return f"must be finite (at most {FLOAT32_MAX:.3g} in magnitude, a float32)"
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_silent_conversion(cls, data: Any) -> Any:
        # A model validator, not a field validator: pydantic refuses field validators on the
        # discriminator key (task.name).  Errors are raised at the key's own location.
        if not isinstance(data, dict):
            return data
        errors = []
        for name, field in cls.model_fields.items():
            for key in {name, field.alias or name}:
                if key in data and (why := _refusal(_kinds(field.annotation), data[key])):
                    errors.append(
                        {"type": PydanticCustomError("strict_scalar", why), "loc": (key,), "input": data[key]}
                    )
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data
