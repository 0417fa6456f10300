"""Tasks: one module per task (schema, data, model, loss), collected in :mod:`flotilla.tasks.registry`."""

from flotilla.tasks import fashion_mnist, python, shakespeare  # noqa: F401  (each registers itself)
from flotilla.tasks.registry import Task, TaskType, build_task, model_for_task, register, task_config_union, task_names

TaskConfig = task_config_union()

__all__ = [
    "Task",
    "TaskConfig",
    "TaskType",
    "build_task",
    "model_for_task",
    "register",
    "task_config_union",
    "task_names",
]
