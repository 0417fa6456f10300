"""HeteroFL-style narrower models on slow tiers, for the MLP part of a model (Diao et al., ICLR 2021).

A tier with width ``p < 1`` trains and uploads only the first ``ceil(p x m)`` units of every hidden
layer (``m`` units) of the model's MLP: the rows of that layer's weight and bias and the matching
columns of the next layer's weight.  Everything outside the MLP (embeddings, ...) is held in full.
The server averages each parameter over the clients that hold it (:class:`HeteroFLMean`).

Implementation: the client trains the full-size model started from the global weights with the
dropped units' incoming weights, biases and outgoing weights set to 0.  With ReLU activations a
dropped unit then outputs ``relu(0) = 0`` and every weight touching it gets a zero gradient, so the
dropped part stays exactly 0 and the kept part trains exactly as the narrow network would (the
test checks this against a really narrower model).  That equivalence needs ReLU, so only MLPs made
of ``Linear`` and ``ReLU`` (and a leading ``Flatten``) are accepted: ``model`` itself an
``nn.Sequential``, or direct ``nn.Sequential`` children of it (a DLRM's bottom / top MLPs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from flotilla.core.aggregate import WeightedMean
from flotilla.fairness.tiers import TIERS

_REFUSE = (
    "tiers.heterofl_width: only for an MLP: the model must be an nn.Sequential of Linear and ReLU layers "
    "(a Flatten first is fine), or have such nn.Sequential children (e.g. a DLRM's MLPs); got {}"
)


def _is_mlp(seq: nn.Module) -> bool:
    if not isinstance(seq, nn.Sequential):
        return False
    layers = list(seq)
    if layers and isinstance(layers[0], nn.Flatten):
        layers = layers[1:]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return len(linears) >= 2 and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in layers)


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """(name prefix, Sequential) of the MLPs HeteroFL may narrow; refuses any other model."""
    if _is_mlp(model):
        return [("", model)]
    found = [(f"{name}.", child) for name, child in model.named_children() if _is_mlp(child)]
    if not found:
        raise ValueError(_REFUSE.format(type(model).__name__))
    return found


def width_mask(model: nn.Module, width: float) -> torch.Tensor:
    """1 where a client of this width holds a parameter, 0 where it does not: a flat float vector in
    the order of :class:`~flotilla.core.flat.FlatModel` (the model's trainable parameters)."""
    if not 0 < width <= 1:
        raise ValueError(f"tiers.heterofl_width: must be in (0, 1], got {width}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mask = torch.ones(sum(p.numel() for _, p in params))
    views, offset = {}, 0
    for n, p in params:
        views[n] = mask[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    for prefix, seq in find_mlps(model):
        names = [f"{prefix}{i}" for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
        for this, nxt in zip(names, names[1:]):  # every Linear but the last feeds a hidden layer
            w = views[f"{this}.weight"]
            keep = max(1, math.ceil(width * w.shape[0] - 1e-9))
            w[keep:] = 0
            if f"{this}.bias" in views:
                views[f"{this}.bias"][keep:] = 0
            views[f"{nxt}.weight"][:, keep:] = 0
    return mask


def tier_masks(model: nn.Module, widths: dict | None) -> list[torch.Tensor | None]:
    """One mask per tier (None: the tier holds the whole model)."""
    widths = widths or {}
    return [width_mask(model, widths[n]) if widths.get(n, 1.0) < 1 else None for n in TIERS]


class HeteroFLUpdate:
    """Client update: a narrowed tier trains from the masked global weights; its delta is 0 outside its slice."""

    def __init__(self, inner, tier: np.ndarray, masks: list[torch.Tensor | None]):
        self.inner = inner
        self.tier = np.asarray(tier, dtype=np.int64)
        self.masks = masks
        self._start = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, dataset, client: int, weights: torch.Tensor, seed: int, out: torch.Tensor):
        mask = self.masks[int(self.tier[client])]
        if mask is None:
            return self.inner.train(dataset, client, weights, seed, out)
        if self._start is None:
            self._start = torch.empty_like(weights)
        torch.mul(weights, mask, out=self._start)
        result = self.inner.train(dataset, client, self._start, seed, out)
        out.mul_(mask)  # exactly 0 already with ReLU; kept so a non-held coordinate can never leak
        return result


class HeteroFLMean(WeightedMean):
    """Each coordinate averaged over the clients that hold it: sum_i w_i d_i / sum_i w_i m_i."""

    def __init__(self, numel: int, tier: np.ndarray, masks: list[torch.Tensor | None]):
        super().__init__(numel)
        self.tier = np.asarray(tier, dtype=np.int64)
        self.masks = masks
        self.holders = torch.zeros(numel)

    def reset(self) -> None:
        super().reset()
        self.holders.zero_()

    def add(self, delta: torch.Tensor, weight: float = 1.0, client=None) -> None:
        super().add(delta, weight, client)
        mask = self.masks[int(self.tier[client])] if client is not None else None
        if mask is None:
            self.holders.add_(weight)
        else:
            self.holders.add_(mask, alpha=weight)

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no updates to aggregate")
        held = self.holders > 0
        self._out.zero_()
        self._out[held] = self.sum[held] / self.holders[held]
        return self._out
