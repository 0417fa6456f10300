"""One model, one flat vector.

Every trainable parameter of the model becomes a view into a single contiguous float32
tensor.  Loading the global weights into the model is then one ``copy_``, and a client's
delta is one subtraction into a preallocated buffer: no per-client model copies, no
state-dict round trips.  Everything above this module (aggregation, server optimizers,
privacy, secure aggregation, the network) only ever sees flat vectors.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatModel:
    """Binds ``model``'s parameters to one flat tensor (``self.flat``) in place."""

    def __init__(self, model: nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if dtypes != {torch.float32}:
            raise TypeError(f"all trainable parameters must be float32, got {sorted(map(str, dtypes))}")
        self.model = model
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.flat = torch.empty(self.numel, dtype=torch.float32)
        self.grad = torch.zeros(self.numel, dtype=torch.float32)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [tuple(p.shape) for p in params]
        offset = 0
        for p in params:
            n = p.numel()
            self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset : offset + n].view_as(p)
            # Gradients live in one flat buffer too, so clipping/noise can act on one vector.
            p.grad = self.grad[offset : offset + n].view_as(p)
            offset += n
        # nn.LSTM keeps its own list of weight tensors; rebuild it over the new storage.
        for m in model.modules():
            if isinstance(m, nn.RNNBase):
                m._init_flat_weights()

    def load(self, weights: torch.Tensor) -> None:
        """Set the model's weights to ``weights`` (a flat vector), in place."""
        self.flat.copy_(weights)

    def delta_into(self, start: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = current weights - start``: the client's update, sign convention of Flotilla."""
        return torch.sub(self.flat, start, out=out)

    def named_views(self) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor view, for checkpoints that keep the model's own names."""
        return {n: p.data for n, p in zip(self.names, self.params)}

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into named tensors shaped like the model's parameters."""
        out, offset = {}, 0
        for name, shape, p in zip(self.names, self.shapes, self.params):
            n = p.numel()
            out[name] = vector[offset : offset + n].view(shape)
            offset += n
        return out
