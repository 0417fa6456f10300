"""Adding a task is adding one module to flotilla/tasks/: the package imports every module in it."""

import sys
import textwrap

import torch

import flotilla.tasks as tasks
from flotilla.tasks import registry

TOY = """
from typing import Literal

import torch
from torch.nn import functional as F

from flotilla.core.dataset import as_federated
from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register


class ToyTask(Section):
    name: Literal["toy"]
    clients: int = 3


def model(cfg):
    return torch.nn.Linear(2, 2)


def build(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    data = {f"u{i}": torch.utils.data.TensorDataset(torch.randn(8, 2, generator=g), torch.randint(0, 2, (8,), generator=g))
            for i in range(cfg.clients)}
    return Task("toy", as_federated(data), model(cfg), F.cross_entropy)


register(TaskType("toy", ToyTask, build, model))
"""


def test_a_task_module_dropped_into_the_package_is_registered(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    try:
        tasks.discover()
        assert "toy" in tasks.task_names()
        toy = tasks.build_task(registry._TASKS["toy"].schema(name="toy", clients=4), seed=0)
        assert toy.dataset.num_clients == 4 and isinstance(toy.model, torch.nn.Linear)
        assert isinstance(tasks.model_for_task({"name": "toy"}), torch.nn.Linear)  # what a device builds
    finally:
        registry._TASKS.pop("toy", None)
        sys.modules.pop("flotilla.tasks.toy", None)
    assert "toy" not in tasks.task_names()
