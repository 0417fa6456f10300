"""Peak training memory of one step, counted on the CPU (no accelerator allocator needed).

Method: during the forward pass a ``torch.autograd.graph.saved_tensors_hooks`` pair sees every
tensor autograd keeps for the backward pass; we sum the bytes of their distinct storages
(a view of a storage counts once), leaving out parameters' own storages, which are counted as
weights.  At the end of the forward pass all these tensors are alive together and the gradient
buffers exist, so the peak of a training step is at least

    weights (all parameters, frozen included) + gradients (trainable only)
    + optimizer state (trainable only) + activations saved for backward.

It leaves out transient tensors of one operation (freed before the next) and the allocator's
slack, the same for every method, so differences between methods are what it measures best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepMemory:
    weights: int
    gradients: int
    activations: int
    trainable: int  # parameters

    def total(self, optimizer_state_per_param: int = 0) -> int:
        """Bytes at the peak; ``optimizer_state_per_param`` bytes per trainable parameter
        (0 for plain SGD, 4 with momentum, 8 for Adam's two moments)."""
        return self.weights + self.gradients + self.activations + optimizer_state_per_param * self.trainable


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def step_memory(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> StepMemory:
    """Run one forward + backward of ``model`` on ``(x, y)`` and count its memory (see module doc)."""
    params = list(model.parameters())
    param_storages = {_storage(p)[0] for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr, nbytes = _storage(t)
        if ptr not in param_storages and nbytes:
            saved[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    trainable = [p for p in params if p.requires_grad]
    return StepMemory(
        weights=sum(p.numel() * p.element_size() for p in params),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        activations=sum(saved.values()),
        trainable=sum(p.numel() for p in trainable),
    )
