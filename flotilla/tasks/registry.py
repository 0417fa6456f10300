"""The task registry: a task is a config schema (its ``task:`` section), a builder of the federated
dataset + model + loss, and a builder of the model alone (what a device needs).

Everything that knows tasks reads this registry: the config's ``task:`` union and ``--help``
(flotilla.config), the experiment layer (data + model), and the network client SDK (model only).
Adding a task is one module in this package that calls :func:`register` (see
flotilla/tasks/fashion_mnist.py); flotilla/tasks/__init__.py imports every module here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from flotilla.core.client import LossFn
from flotilla.core.dataset import FederatedDataset


@dataclass
class Task:
    name: str
    dataset: FederatedDataset
    model: nn.Module
    loss_fn: LossFn
    # The task's own test metrics instead of loss/accuracy (movielens: loss, AUC, AP):
    # (model, dataset, clients, batch_size) -> a metrics record; None: flotilla.core.evaluate's.
    evaluate: Callable[[nn.Module, FederatedDataset, Any, int], dict[str, Any]] | None = None


@dataclass(frozen=True)
class TaskType:
    name: str
    schema: type  # pydantic Section with ``name: Literal[name]``
    build: Callable[[Any, int], Task]  # (task config, seed) -> Task (data + seeded model + loss)
    model: Callable[[Any], nn.Module]  # task config -> a fresh model (devices: no data needed)


_TASKS: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
    if task_type.name in _TASKS and _TASKS[task_type.name] != task_type:
        raise ValueError(f"task {task_type.name!r} is registered twice")
    _TASKS[task_type.name] = task_type
    return task_type


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_config_union():
    """The ``task:`` config type: one schema per registered task, told apart by ``name``."""
    schemas = tuple(t.schema for t in _TASKS.values())
    # Union[...] over a runtime tuple: the X | Y spelling cannot take one
    return Annotated[Union[schemas], Field(discriminator="name")] if len(schemas) > 1 else schemas[0]  # noqa: UP007


def build_task(cfg, seed: int) -> Task:
    """Load the data and build a freshly initialised model (seeded, so runs are reproducible)."""
    try:
        task_type = _TASKS[cfg.name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {cfg.name!r} (known: {', '.join(task_names())})") from None
    return task_type.build(cfg, seed)


def model_for_task(task: dict[str, Any]) -> nn.Module:
    """The model of a task config given as a plain dict (what the server sends a device at check-in)."""
    name = task.get("name")
    if name not in _TASKS:
        raise ValueError(
            f"the server's task {name!r} has no model here (known tasks: {', '.join(task_names())}); "
            f"use the Python SDK (flotilla.client.Device) with your own model"
        )
    try:
        cfg = TypeAdapter(_TASKS[name].schema).validate_python(task)
    except ValidationError as e:
        raise ValueError(f"the server's task config for {name!r} is not valid here: {e.errors()[0]['msg']}") from None
    return _TASKS[name].model(cfg)
