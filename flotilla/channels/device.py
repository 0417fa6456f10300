"""What a device does with a channel chain: decode the download, then clip (user-level DP), add its
error-feedback residual and compress its update.  The simulator (flotilla.channels.sim) and the
network SDK (flotilla.network.client) both call :meth:`DeviceChannels.upload`, so a delta becomes
the same bytes on both.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flotilla.channels.codec import Codec
from flotilla.channels.config import ChannelsConfig
from flotilla.channels.rows import RowsCodec


def channel_seed(seed: int) -> int:
    """The compression randomness (stochastic rounding, random masks) of one update, from its training
    seed: replayable in the simulator, and the same bytes on a device given the same assignment."""
    return int(np.random.SeedSequence([int(seed), 0xC4A7]).generate_state(1, np.uint64)[0] >> 1)


class DeviceChannels:
    """The upload and download codecs of one model, and the device-side steps around them.

    With ``tables`` (embedding tables, flotilla.algorithms.rowwise.Table) uploads are row-sparse
    (flotilla.channels.rows): the touched rows and the dense rest, through the upload chain."""

    def __init__(self, cfg: ChannelsConfig, shapes: list[tuple[int, ...]], clip_norm: float | None = None, tables=None):
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"channels: clip norm must be a positive finite number, got {clip_norm}")
        self.cfg = cfg
        self.up = Codec(cfg.steps("upload"), shapes)
        self.down = Codec(cfg.steps("download"), shapes)
        self.rows = RowsCodec(cfg.steps("upload"), shapes, tables) if tables else None
        self.error_feedback = cfg.error_feedback
        self.clip_norm = clip_norm

    @property
    def upload_bytes(self) -> int:
        return self.up.message_bytes

    @property
    def download_bytes(self) -> int:
        return self.down.message_bytes

    def upload(
        self, delta: Tensor, seed: int, residual: Tensor | None, rows: dict[str, Tensor] | None = None
    ) -> tuple[bytes, Tensor, Tensor | None]:
        """``(payload, what the server reconstructs, the new residual or None)``; ``rows`` (table name ->
        the device's touched row ids) for row-sparse uploads.

        With user-level DP the update is clipped to the clip norm *before* compression (the server's
        DP aggregator clips what it receives again, so the sensitivity bound and the accountant are
        unchanged whatever the channel does to the norm).  With error feedback the residual is added
        after clipping and the new residual is ``(clipped update + residual) - sent``."""
        x = delta.detach().to(torch.float32)
        if self.clip_norm is not None:
            norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
            if norm > self.clip_norm:
                x = x * (self.clip_norm / norm)
        if self.error_feedback and residual is not None:
            x = x + residual
        g = torch.Generator().manual_seed(channel_seed(seed)) if self.up.stochastic else None
        if self.rows is not None:
            if rows is None:
                raise ValueError("channels: a row-sparse upload needs the rows the device's data touches")
            data, sent = self.rows.encode(x, rows, g)
        else:
            data, sent = self.up.encode(x, g)
        return data, sent, (x - sent) if self.error_feedback else None


class ResidualStore:
    """Error-feedback residuals, one flat vector per client that has used error feedback.

    On a real device the residual lives in the SDK's memory (one vector); the simulator plays every
    device, so its memory grows by ``4 x numel`` bytes with each distinct client that has uploaded.
    """

    def __init__(self):
        self.residuals: dict[int, Tensor] = {}

    def get(self, client: int) -> Tensor | None:
        return self.residuals.get(client)

    def put(self, client: int, residual: Tensor) -> None:
        self.residuals[client] = residual

    def __len__(self) -> int:
        return len(self.residuals)
