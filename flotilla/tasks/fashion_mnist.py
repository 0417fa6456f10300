"""Task ``fashion-mnist``: Debian's Fashion-MNIST partitioned over synthetic clients; SmallCNN."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.schema import Section
from flotilla.tasks.models import SmallCNN
from flotilla.tasks.registry import Task, TaskType, register


class FashionMNISTTask(Section):
    """Fashion-MNIST (Debian dataset-fashion-mnist), partitioned over synthetic clients."""

    name: Literal["fashion-mnist"] = Field(description="which task (decides the other task.* keys)")
    root: str | None = Field(
        None,
        description="folder holding the four Fashion-MNIST IDX .gz files (default: $FLOTILLA_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)",
    )
    partition: Literal["iid", "dirichlet", "quantity"] = Field(
        "dirichlet", description="how the 60k training images are split over clients"
    )
    num_clients: int = Field(100, ge=1, le=60000, description="number of clients")
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration (partition=dirichlet); smaller = more label skew"
    )
    sigma: float = Field(1.0, gt=0, description="log-normal sigma of client sizes (partition=quantity)")
    examples_per_client: int | None = Field(
        None, ge=1, description="if set, every client gets exactly this many images (pfl-style users x images)"
    )


def build(cfg: FashionMNISTTask, seed: int) -> Task:
    from flotilla.data.fashion_mnist import fashion_mnist_federated

    data = fashion_mnist_federated(
        partition=cfg.partition,
        num_clients=cfg.num_clients,
        alpha=cfg.alpha,
        sigma=cfg.sigma,
        seed=seed,
        examples_per_client=cfg.examples_per_client,
        root=cfg.root,
    )
    torch.manual_seed(seed)
    return Task(cfg.name, data, SmallCNN(), F.cross_entropy)


TASK = register(TaskType("fashion-mnist", FashionMNISTTask, build, lambda cfg: SmallCNN()))
