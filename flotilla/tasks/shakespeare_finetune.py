"""Task ``shakespeare-finetune``: fine-tune a pre-trained, frozen character transformer, federated.

Clients are the (play, role) pairs of every play *except* the proxy plays that pre-trained the
backbone (``flotilla.adapters.backbone.PROXY_PLAYS``).  ``method`` picks what trains (READ, LoRA,
bottleneck adapters, BitFit, head only, or everything); only those parameters are trainable, so
only they are in the flat vector that travels each round.  Every position of a window is a
next-character target: a batch is ``x [B, T]`` and ``y [B * T]`` and the model returns
``[B * T, vocab]``, so the core's loss, accuracy and evaluation count characters.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.dataset import FederatedDataset
from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register


class BackboneConfig(Section):
    width: int = Field(128, ge=8, description="transformer width")
    layers: int = Field(4, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (must divide width)")
    steps: int = Field(
        1500, ge=1, description="central pre-training steps on the proxy plays (cached after the first run)"
    )
    lr: float = Field(3e-3, gt=0, description="pre-training peak learning rate (AdamW)")


class ShakespeareFinetuneTask(Section):
    """Next-character LM fine-tuning of a frozen pre-trained backbone, one client per role."""

    name: Literal["shakespeare-finetune"] = Field(description="which task (decides the other task.* keys)")
    method: Literal["read", "lora", "adapter", "bitfit", "head", "full"] = Field(
        "read", description="what trains: read (recurrent side network), lora, adapter, bitfit, head or full"
    )
    read_hidden: int = Field(64, ge=1, description="READ: GRU hidden size")
    lora_rank: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(8, ge=1, description="LoRA alpha (scale = alpha / rank)")
    adapter_dim: int = Field(32, ge=1, description="bottleneck adapter width")
    seq_len: int = Field(64, ge=1, le=128, description="characters per window (every position is a target)")
    min_chars: int = Field(500, ge=0, description="roles with fewer characters are dropped")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="last fraction of each role's text held out")
    max_clients: int | None = Field(None, ge=1, description="keep a seeded random subset of N roles")
    max_train_samples_per_client: int | None = Field(None, ge=1, description="subsample each role's train windows")
    backbone: BackboneConfig = BackboneConfig()


class LMWindows(FederatedDataset):
    """Windows of ``seq_len + 1`` codes at given starts: inputs and the next code at every position."""

    def __init__(self, stream: np.ndarray, seq_len: int, train, test, names):
        self._stream = torch.from_numpy(stream)
        self._window = torch.arange(seq_len + 1)
        self.seq_len = seq_len
        super().__init__(f"shakespeare-lm{seq_len}", self._fetch, train, test, names)

    def _fetch(self, starts: torch.Tensor):
        codes = self._stream[starts[:, None] + self._window].long()
        return codes[:, :-1], codes[:, 1:].reshape(-1)


def backbone_spec(cfg: ShakespeareFinetuneTask):
    from flotilla.adapters.backbone import BackboneSpec

    b = cfg.backbone
    return BackboneSpec(width=b.width, layers=b.layers, heads=b.heads, steps=b.steps, lr=b.lr)


def model(cfg: ShakespeareFinetuneTask, seed: int | None = None):
    """The backbone (cached, or pre-trained now) with ``cfg.method`` applied; new modules seeded by ``seed``."""
    from flotilla.adapters.backbone import pretrain_backbone
    from flotilla.adapters.methods import apply_method

    backbone = pretrain_backbone(backbone_spec(cfg))
    if seed is not None:  # after pre-training, so the first run and a cached one build the same model
        torch.manual_seed(seed)
    return apply_method(
        backbone,
        cfg.method,
        read_hidden=cfg.read_hidden,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        adapter_dim=cfg.adapter_dim,
    )


def federated_data(cfg: ShakespeareFinetuneTask, seed: int) -> LMWindows:
    """The federated population: roles of the non-proxy plays; test windows do not overlap."""
    from flotilla.adapters.backbone import PROXY_PLAYS
    from flotilla.data.shakespeare import shakespeare_federated

    chars = shakespeare_federated(
        seq_len=cfg.seq_len,
        test_fraction=cfg.test_fraction,
        min_chars=cfg.min_chars,
        max_train_samples_per_client=cfg.max_train_samples_per_client,
        seed=seed,
    )
    keep = [c for c, name in enumerate(chars.client_names) if name.rsplit("/", 1)[0] not in PROXY_PLAYS]
    if cfg.max_clients is not None and cfg.max_clients < len(keep):
        keep = sorted(np.random.default_rng([seed, 0xF17E]).choice(keep, cfg.max_clients, replace=False).tolist())
    return LMWindows(
        chars.text.stream,
        cfg.seq_len,
        [chars.train_indices[c] for c in keep],
        [chars.test_indices[c][:: cfg.seq_len] for c in keep],  # each test character scored once
        [chars.client_names[c] for c in keep],
    )


def build(cfg: ShakespeareFinetuneTask, seed: int) -> Task:
    return Task(cfg.name, federated_data(cfg, seed), model(cfg, seed), F.cross_entropy)


TASK = register(TaskType("shakespeare-finetune", ShakespeareFinetuneTask, build, model))
