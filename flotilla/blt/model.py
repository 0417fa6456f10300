"""The BLT model and a plain byte transformer baseline, both next-byte language models.

Output layout.  ``model(x)`` with symbols x [B, T] returns logits [B, 260, T] (PyTorch's layout for
a sequence: classes in dim 1), so ``F.cross_entropy(model(x), y)`` with next symbols y [B, T]
trains every position; that is the loss ``flotilla join`` uses.  ``model(x[:, None])`` (x given as
[B, 1, T]) returns the same logits as rows [B*T, 260], one per byte: the layout Flotilla's
evaluation needs to count loss and accuracy per byte (test targets come flattened, [B*T]).

BLT (Pagnoni et al., 2024), per window:
1. patch starts from the bytes (entropy model + patcher, computed inside forward under no_grad);
2. local encoder: byte + hash n-gram embeddings, causal local self-attention layers;
3. pooling: one query per patch, initialised by max-pooling the patch's byte states then a linear
   map, cross-attends to the bytes of its own patch only;
4. global transformer: causal over patches;
5. local decoder: before each layer bytes cross-attend to global patch states, then causal
   self-attention; a linear head predicts the next byte.

Causality (the prediction at byte t, of byte t+1, sees only bytes <= t): a start at byte s is
decided from bytes < s (flotilla/blt/patcher.py), so byte t knows every boundary up to t+1.  Byte t
attends to the global state of patch j only if patch j is complete by t (its last byte <= t, which
is known once the start at that byte + 1 is known), plus a learned start state.  BLT itself lets
the bytes of patch j+1 see the state of patch j; here the last byte of patch j sees it too.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from flotilla.blt.bytes import VOCAB_SIZE
from flotilla.blt.hashing import HashEmbeddings
from flotilla.blt.layers import Block, CrossAttention, causal_mask
from flotilla.blt.patcher import entropy_starts, fixed_starts, patch_ids, space_starts


class ByteLM(nn.Module):
    """A next-byte model: subclasses give ``logits(x) -> [B, T, V]``; ``forward`` picks the layout."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] == 1:  # scoring layout: one row per byte
            return self.logits(x[:, 0]).reshape(-1, VOCAB_SIZE)
        if x.dim() != 2:
            raise ValueError(f"expected byte symbols [B, T] (or [B, 1, T] to score), got shape {tuple(x.shape)}")
        return self.logits(x).transpose(1, 2)


class ByteTransformer(ByteLM):
    """Byte embedding (+ optional hash n-grams), causal (optionally local) self-attention, linear head."""

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        window: int | None = None,
        hash_ns: tuple[int, ...] = (),
        hash_table: int = 2048,
    ):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.hash = HashEmbeddings(dim, hash_ns, hash_table) if hash_ns else None
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB_SIZE)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.hash is not None:
            h = h + self.hash(x)
        mask = causal_mask(x.shape[1], self.window, x.device)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))

    @torch.no_grad()
    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T]: natural-log entropy of the predicted next-byte distribution at each position."""
        logp = torch.log_softmax(self.logits(x).float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)


Patching = Literal["entropy", "space", "fixed"]


class BLT(ByteLM):
    """Byte Latent Transformer; ``entropy_model`` is frozen (not trained, not federated)."""

    def __init__(
        self,
        entropy_model: ByteTransformer | None = None,
        patching: Patching = "entropy",
        threshold: float = 1.5,
        mode: str = "global",
        threshold_add: float | None = None,
        patch_size: int = 4,
        max_patch: int | None = None,
        local_dim: int = 64,
        global_dim: int = 128,
        heads: int = 4,
        encoder_layers: int = 1,
        global_layers: int = 2,
        decoder_layers: int = 1,
        window: int | None = 64,
        hash_ns: tuple[int, ...] = (3, 4, 5, 6, 7, 8),
        hash_table: int = 2048,
    ):
        super().__init__()
        if patching == "entropy" and entropy_model is None:
            raise ValueError("entropy patching needs an entropy model")
        self.patching, self.threshold, self.mode = patching, threshold, mode
        self.threshold_add, self.patch_size, self.max_patch, self.window = threshold_add, patch_size, max_patch, window
        self.entropy_model = entropy_model
        if entropy_model is not None:
            entropy_model.requires_grad_(False)  # frozen: outside Flotilla's flat weight vector
            entropy_model.eval()
        self.embed = nn.Embedding(VOCAB_SIZE, local_dim)
        self.hash = HashEmbeddings(local_dim, hash_ns, hash_table) if hash_ns else None
        self.encoder = nn.ModuleList(Block(local_dim, heads) for _ in range(encoder_layers))
        self.pool_init = nn.Linear(local_dim, global_dim)
        self.pool = CrossAttention(global_dim, heads, kv_dim=local_dim)
        self.global_blocks = nn.ModuleList(Block(global_dim, heads) for _ in range(global_layers))
        self.start_state = nn.Parameter(torch.zeros(1, 1, global_dim))
        self.cross = nn.ModuleList(CrossAttention(local_dim, heads, kv_dim=global_dim) for _ in range(decoder_layers))
        self.decoder = nn.ModuleList(Block(local_dim, heads) for _ in range(decoder_layers))
        self.norm = nn.RMSNorm(local_dim)
        self.head = nn.Linear(local_dim, VOCAB_SIZE)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.entropy_model is not None:
            self.entropy_model.eval()  # never in training mode
        return self

    @torch.no_grad()
    def starts(self, x: torch.Tensor) -> torch.Tensor:
        """Patch start mask [B, T+1] of symbols x [B, T] (see flotilla/blt/patcher.py)."""
        if self.patching == "space":
            return space_starts(x, self.max_patch)
        if self.patching == "fixed":
            return fixed_starts(x.shape[0], x.shape[1], self.patch_size, x.device)
        return entropy_starts(
            self.entropy_model.entropy(x), self.threshold, self.mode, self.threshold_add, self.max_patch
        )

    def logits(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        b, t = x.shape
        starts = self.starts(x) if starts is None else starts
        pid = patch_ids(starts)  # [B, T]
        k = int(pid.max()) + 1  # patches in the longest row; shorter rows are padded
        byte_mask = causal_mask(t, self.window, x.device)

        h = self.embed(x)
        if self.hash is not None:
            h = h + self.hash(x)
        for block in self.encoder:
            h = block(h, byte_mask)

        # Pooling: query j = linear(max over patch j's byte states), attending to patch j's bytes only.
        idx = pid[:, :, None].expand(-1, -1, h.shape[-1])
        pooled = torch.full((b, k, h.shape[-1]), float("-inf"), device=x.device, dtype=h.dtype)
        pooled = pooled.scatter_reduce(1, idx, h, reduce="amax", include_self=True)
        slots = torch.arange(k, device=x.device)
        real = slots[None, :] <= pid[:, -1:]  # [B, K]: padded slots of shorter rows are False
        pooled = torch.where(real[..., None], pooled, 0.0)
        own = pid[:, None, :] == slots[None, :, None]  # [B, K, T]
        own = own | ~real[..., None]  # padded slots attend anywhere (their output is never used)
        p = self.pool(self.pool_init(pooled), h, own)

        patch_mask = causal_mask(k, None, x.device)
        for block in self.global_blocks:
            p = block(p, patch_mask)

        # Patch j is complete at byte t when its last byte <= t and the next start is known:
        # the next start is at most t+1, i.e. the last byte is < T or the window's column T says so.
        last = torch.zeros(b, k, dtype=torch.long, device=x.device)
        last = last.scatter_reduce(1, pid, torch.arange(t, device=x.device).expand(b, -1), reduce="amax")
        closed = real & ((slots[None, :] < pid[:, -1:]) | starts[:, -1:])
        done_at = torch.where(closed, last, t)  # t: never seen inside the window
        sees = done_at[:, None, :] <= torch.arange(t, device=x.device)[None, :, None]  # [B, T, K]
        sees = torch.cat([torch.ones(b, t, 1, dtype=torch.bool, device=x.device), sees], dim=2)
        states = torch.cat([self.start_state.expand(b, -1, -1), p], dim=1)

        for cross, block in zip(self.cross, self.decoder):
            h = cross(h, states, sees)
            h = block(h, byte_mask)
        return self.head(self.norm(h))
