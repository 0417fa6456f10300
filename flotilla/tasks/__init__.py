"""Tasks: one module per task (schema, data, model, loss), collected in :mod:`flotilla.tasks.registry`.

Every module of this package registers its task when imported, and every module here is imported:
adding a task is adding its module (the heavy data imports stay inside its build function).
"""

import importlib
import pkgutil

from flotilla.tasks.registry import Task, TaskType, build_task, model_for_task, register, task_config_union, task_names

_NOT_TASKS = {"registry", "models"}


def discover() -> None:
    """Import every task module of this package (each registers itself)."""
    for name in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS):
        importlib.import_module(f"{__name__}.{name}")


discover()

TaskConfig = task_config_union()

__all__ = [
    "Task",
    "TaskConfig",
    "TaskType",
    "build_task",
    "discover",
    "model_for_task",
    "register",
    "task_config_union",
    "task_names",
]
