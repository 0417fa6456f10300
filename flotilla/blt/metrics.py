"""Bits per byte, and FLOP counts of the byte models."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    """Summed cross-entropy (natural log) / ln 2 / number of bytes."""
    if num_bytes <= 0:
        raise ValueError(f"bits per byte needs at least one byte, got {num_bytes}")
    return total_nats / math.log(2) / num_bytes


def summed_nats(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-byte cross-entropy of logits [N, V] (or [B, V, T]) against targets [N] (or [B, T])."""
    return float(F.cross_entropy(logits.detach().float(), targets, reduction="sum"))


@torch.no_grad()
def score(model, dataset, clients, batch_size: int = 64) -> tuple[float, int]:
    """(summed nats, bytes) of ``model`` over the test windows of ``clients`` (a ByteWindows dataset)."""
    model.eval()
    nats, n = 0.0, 0
    for c in clients:
        for x, y in dataset.test_batches(c, batch_size):
            nats += summed_nats(model(x), y)
            n += y.numel()
    return nats, n


def train_flops(model, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) on batch (x, y), counted by PyTorch's
    FlopCounterMode (matrix products and attention, 2 FLOPs per multiply-add; the frozen entropy
    model's forward pass included, element-wise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=False)
    model.train(was)
    return int(counter.get_total_flops())


def transformer_flops_per_token(dim: int, layers: int, context: float) -> float:
    """Forward FLOPs per token of pre-norm blocks with a 4x MLP: 2 x 12 d^2 for the weights, plus
    2 x 2 x context x d for attention scores and the weighted sum."""
    return layers * (24 * dim * dim + 4 * context * dim)
