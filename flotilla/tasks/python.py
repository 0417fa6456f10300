"""Task ``python``: the user's own model and data, from a function named in the config.

    task:
      name: python
      factory: my_package.my_module:make_task     # imported from the working directory or sys.path
      options: {path: data/ratings.csv}           # keyword arguments for the function

``make_task(seed, **options)`` returns a :class:`~flotilla.tasks.registry.Task`, or a dict with
``model`` (an nn.Module), ``data`` (a FederatedDataset, a ``{client: Dataset}`` mapping, or a
``(train, test)`` pair of mappings) and optionally ``loss_fn`` (default cross-entropy).  The torch
seed is set to ``seed`` before the call, so the model's initialisation is reproducible.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.dataset import as_federated
from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register


class PythonTask(Section):
    """Your own task: a Python function returns the model, the federated data and the loss."""

    name: Literal["python"] = Field(description="which task (decides the other task.* keys)")
    factory: str | None = Field(
        None,
        description="'package.module:function' called as function(seed, **options); required in a config file (flotilla.train passes the model and data directly)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the factory")
    model: str | None = Field(
        None,
        description="'package.module:function' returning the model alone, called as function(**options) (devices in flotilla join use it, so they need no data of the server's; default: the factory's model)",
    )


def _factory(cfg: PythonTask, key: str = "factory"):
    spec = getattr(cfg, key)
    if not spec:
        raise ValueError("task.factory: give 'package.module:function' that returns the model and the data")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task.{key}: expected 'package.module:function', got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module next to the config, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"task.{key}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"task.{key}: {module_name!r} has no function {attr!r}")
    return fn


def _as_task(out, name: str) -> Task:
    if isinstance(out, Task):
        return out
    if not isinstance(out, Mapping) or not {"model", "data"} <= set(out):
        raise ValueError(
            f"task.factory: {name} must return a flotilla Task or a dict with 'model' and 'data' "
            f"(and optionally 'loss_fn'), got {type(out).__name__}"
        )
    unknown = set(out) - {"model", "data", "loss_fn"}
    if unknown:
        raise ValueError(
            f"task.factory: {name} returned unknown keys {sorted(unknown)} (expected model, data, loss_fn)"
        )
    if not isinstance(out["model"], torch.nn.Module):
        raise ValueError(f"task.factory: {name}'s 'model' must be a torch.nn.Module, got {type(out['model']).__name__}")
    return Task("python", as_federated(out["data"]), out["model"], out.get("loss_fn") or F.cross_entropy)


def build(cfg: PythonTask, seed: int) -> Task:
    fn = _factory(cfg)
    torch.manual_seed(seed)
    return _as_task(fn(seed=seed, **cfg.options), cfg.factory)


def model(cfg: PythonTask) -> torch.nn.Module:
    """The model alone (a device's view): ``task.model`` if given, else the factory's (which loads data too)."""
    if cfg.model is None:
        return build(cfg, 0).model
    out = _factory(cfg, "model")(**cfg.options)
    if not isinstance(out, torch.nn.Module):
        raise ValueError(f"task.model: {cfg.model} must return a torch.nn.Module, got {type(out).__name__}")
    return out


TASK = register(TaskType("python", PythonTask, build, model))
