"""READ (Wang, Nguyen et al. 2023): a recurrent side network beside a frozen backbone.

Forward hooks cache every block's output.  The backbone runs under ``torch.no_grad`` and the
cached outputs are detached, so autograd records nothing inside it: no backbone activation is
kept for backward and no gradient reaches a backbone weight.  A GRU then runs with the L layers
as its time axis, independently for every token position (the ``[B, T]`` positions are the GRU's
batch); its inputs are RMS-normalised with a learned per-channel gain (the "scaled" of the
paper), its initial state is zero.  Its outputs are **averaged over the L steps**, projected back
to the model width by a linear map initialised to zero, and added to the last block's output
before the backbone's final norm and head.  With the projection at zero the model's logits are
exactly the backbone's.

Gradients flow from the loss through the frozen head into the side network only.
"""

from __future__ import annotations

import torch
from torch import nn

from flotilla.adapters.backbone import CharTransformer


class ReadSideNetwork(nn.Module):
    """GRU over layers, per token: ``[N, L, d] -> [N, d]`` (the correction added to the last layer)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(width)  # learned gain = the input scale
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.norm(layers))  # zero initial state (h0 omitted)
        return self.proj(out.mean(dim=1))


class ReadModel(nn.Module):
    """A frozen :class:`CharTransformer` plus a trainable READ side network."""

    def __init__(self, backbone: CharTransformer, hidden: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.side = ReadSideNetwork(backbone.spec.width, hidden)
        self._cache: list[torch.Tensor] = []
        for block in backbone.blocks:
            block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._cache.append(output.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._cache.clear()
        with torch.no_grad():
            last = self.backbone.features(x)
        layers, self._cache = torch.stack(self._cache, dim=2), []  # [B, T, L, d]; drop the list's references
        b, t, n_layers, d = layers.shape
        side = self.side(layers.view(b * t, n_layers, d)).view(b, t, d)
        out = self.backbone.logits(last + side)
        return out.reshape(-1, out.shape[-1])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout/statistics changes even while the side net trains
        return self
