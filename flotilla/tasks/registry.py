"""Built-in tasks: a task is a federated dataset + a model + a loss (metrics: loss, accuracy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from flotilla.config import FashionMNISTTask, ShakespeareTask
from flotilla.core.client import LossFn
from flotilla.data.base import FederatedDataset
from flotilla.tasks.models import CharLSTM, SmallCNN


@dataclass
class Task:
    name: str
    dataset: FederatedDataset
    model: nn.Module
    loss_fn: LossFn


def build_task(cfg: FashionMNISTTask | ShakespeareTask, seed: int) -> Task:
    """Load the data and build a freshly initialised model (seeded, so runs are reproducible)."""
    if isinstance(cfg, FashionMNISTTask):
        from flotilla.data.fashion_mnist import fashion_mnist_federated
        data = fashion_mnist_federated(
            partition=cfg.partition, num_clients=cfg.num_clients, alpha=cfg.alpha, sigma=cfg.sigma,
            seed=seed, examples_per_client=cfg.examples_per_client,
        )
        torch.manual_seed(seed)
        return Task(cfg.name, data, SmallCNN(), F.cross_entropy)
    if isinstance(cfg, ShakespeareTask):
        from flotilla.data.shakespeare import VOCAB_SIZE, shakespeare_federated
        data = shakespeare_federated(
            seq_len=cfg.seq_len, test_fraction=cfg.test_fraction, min_chars=cfg.min_chars,
            max_clients=cfg.max_clients, max_train_samples_per_client=cfg.max_train_samples_per_client, seed=seed,
        )
        torch.manual_seed(seed)
        m = cfg.model
        return Task(cfg.name, data, CharLSTM(VOCAB_SIZE, m.embed_dim, m.hidden, m.layers), F.cross_entropy)
    raise ValueError(f"task.name: unknown task {cfg!r}")
