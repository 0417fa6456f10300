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
    """Binds ``model``'s parameters to one flat tensor (``self.flat``) in place.

    With ``device`` the model (parameters and buffers) is moved there first and the flat weight
    and gradient vectors live there: training and evaluation run on that device, while the
    vectors handed in and out (``load``, ``delta_into``) may stay on the CPU.
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if any(t.device != self.device for t in (*model.parameters(), *model.buffers())):
            model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        dtypes = {p.dtype for p in params}
        if dtypes != {torch.float32}:
            raise TypeError(f"all trainable parameters must be float32, got {sorted(map(str, dtypes))}")
        self.model = model
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.flat = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
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
                if self.device.type == "cuda":
                    # cuDNN's flatten_parameters would move the weights into a buffer of its own
                    # (out of self.flat); without it cuDNN reads them where they are.
                    m.flatten_parameters = _no_flatten
                m._init_flat_weights()

    def load(self, weights: torch.Tensor) -> None:
        """Set the model's weights to ``weights`` (a flat vector, on any device), in place."""
        self.flat.copy_(weights)

    def delta_into(self, start: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = current weights - start``: the client's update, sign convention of Flotilla."""
        if out.device == self.flat.device and start.device == self.flat.device:
            return torch.sub(self.flat, start, out=out)
        # Trained on an accelerator, aggregated elsewhere: one copy back, then the same subtraction.
        out.copy_(self.flat)
        return out.sub_(start.to(out.device))

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


def _no_flatten() -> None:
    """Stands in for ``nn.RNNBase.flatten_parameters`` on a GPU (a module-level function: picklable)."""
