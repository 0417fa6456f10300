"""Task ``shakespeare-bytes``: next-byte prediction on raw UTF-8 Shakespeare, one client per role;
models ``blt`` (Byte Latent Transformer with entropy patching) and ``byte-transformer``.

Examples are fixed windows of ``seq_len + 1`` bytes taken every ``seq_len`` bytes (every byte is a
target once); ``x`` [B, T] symbols, ``y`` [B, T] the next symbols, loss ``F.cross_entropy`` over
every position (the model returns [B, 260, T]).  Test batches come as ``x`` [B, 1, T] and ``y``
[B*T] so that Flotilla's evaluation counts loss and accuracy per byte (flotilla/blt/model.py):
``loss`` is nats per byte, bits per byte = loss / ln 2.

Roles: the proxy plays (flotilla/blt/data.py) are never clients (the entropy model learns from
them); of the other roles with at least ``min_bytes``, every ``heldout_every``-th (play order) is
held out of the population too, for the held-out-role evaluation (:func:`heldout_roles`).  The
patcher and the frozen entropy model run inside the model's forward, so a device (`flotilla join`)
patches its own bytes; it needs the entropy checkpoint in its cache (trained there on first use).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from flotilla.core.dataset import FederatedDataset
from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register


class EntropyModelConfig(Section):
    dim: int = Field(64, ge=8, description="entropy model width")
    layers: int = Field(2, ge=1, description="entropy model layers")
    window: int = Field(64, ge=1, description="entropy model local attention window (bytes)")
    steps: int = Field(1000, ge=1, description="central training steps on the proxy plays (batch 16 x 128 bytes)")


class BLTConfig(Section):
    name: Literal["blt"] = Field(description="Byte Latent Transformer")
    patching: Literal["entropy", "space", "fixed"] = Field("entropy", description="how patch boundaries are found")
    mode: Literal["global", "monotonic", "combined"] = Field(
        "global", description="entropy rule: H > t, H - H_prev > t, or both (combined: difference threshold 0)"
    )
    threshold: float | None = Field(
        None, description="entropy threshold; unset: calibrated by bisection to target_patch_size on proxy text"
    )
    target_patch_size: float = Field(4.0, ge=1, description="mean bytes per patch the threshold is calibrated to")
    patch_size: int = Field(4, ge=1, description="bytes per patch (patching: fixed)")
    max_patch: int | None = Field(None, ge=1, description="split patches longer than this")
    local_dim: int = Field(64, ge=8, description="local encoder/decoder width")
    global_dim: int = Field(128, ge=8, description="latent (global) transformer width")
    heads: int = Field(4, ge=1, description="attention heads")
    encoder_layers: int = Field(1, ge=1, description="local encoder layers")
    global_layers: int = Field(2, ge=1, description="latent transformer layers")
    decoder_layers: int = Field(1, ge=1, description="local decoder layers")
    window: int = Field(64, ge=1, description="local attention window of the byte layers")
    hash_ns: list[int] = Field([3, 4, 5, 6, 7, 8], description="n-gram sizes of the hash embeddings ([] for none)")
    hash_table: int = Field(2048, ge=1, description="rows of each hash embedding table")
    entropy: EntropyModelConfig = EntropyModelConfig()


class ByteTransformerConfig(Section):
    name: Literal["byte-transformer"] = Field(description="plain causal byte transformer")
    dim: int = Field(64, ge=8, description="width")
    layers: int = Field(2, ge=1, description="layers")
    heads: int = Field(4, ge=1, description="attention heads")
    window: int | None = Field(None, ge=1, description="local attention window (unset: full causal)")


class ShakespeareBytesTask(Section):
    """Next-byte prediction on raw UTF-8 Shakespeare, one client per (play, role); BLT or byte transformer."""

    name: Literal["shakespeare-bytes"] = Field(description="which task (decides the other task.* keys)")
    seq_len: int = Field(128, ge=2, description="bytes per window")
    min_bytes: int = Field(1000, ge=0, description="roles with fewer bytes are dropped")
    test_fraction: float = Field(
        0.2, ge=0.01, le=0.99, description="last fraction of each role's characters held out (whole percent)"
    )
    heldout_every: int = Field(10, ge=2, description="every N-th eligible role is held out of the population")
    max_clients: int | None = Field(None, ge=1, description="keep a seeded random subset of N training roles")
    max_train_windows_per_client: int | None = Field(None, ge=1, description="subsample each role's train windows")
    model: Annotated[BLTConfig | ByteTransformerConfig, Field(discriminator="name")] = BLTConfig(name="blt")

    @field_validator("test_fraction")
    @classmethod
    def _whole_percent(cls, v: float) -> float:
        # the split is stored per whole percent of each role's characters (flotilla/blt/data.py)
        if abs(v * 100 - round(v * 100)) > 1e-9:
            raise ValueError("must be a whole percentage (0.01, 0.02, ..., 0.99)")
        return v


class ByteWindows(FederatedDataset):
    """Indices are window starts into the byte stream; train (x [B,T], y [B,T]), test (x [B,1,T], y [B*T])."""

    def __init__(self, stream: np.ndarray, seq_len: int, train, test, names):
        from flotilla.blt.bytes import OFFSET

        self._sym = torch.from_numpy(stream.astype(np.int64) + OFFSET)
        self._window = torch.arange(seq_len + 1)
        self.seq_len = seq_len
        super().__init__(f"shakespeare-bytes-seq{seq_len}", self._fetch, train, test, names, self._fetch_test)

    def _fetch(self, starts: torch.Tensor):
        w = self._sym[starts[:, None] + self._window]
        return w[:, :-1], w[:, 1:]

    def _fetch_test(self, starts: torch.Tensor):
        x, y = self._fetch(starts)
        return x[:, None], y.reshape(-1)

    def num_bytes(self, clients, test: bool = True) -> int:
        idx = self.test_indices if test else self.train_indices
        return sum(len(idx[c]) for c in clients) * self.seq_len


def _eligible(cfg: ShakespeareBytesTask, text) -> tuple[list[int], list[int]]:
    """(training roles, held-out roles) among the federated roles with enough text."""
    roles = []
    for r in text.federated_roles():
        n = int(text.offsets[r + 1] - text.offsets[r])
        split = text.byte_split(r, cfg.test_fraction)
        if n >= cfg.min_bytes and split > cfg.seq_len and n - split > cfg.seq_len:
            roles.append(r)
    held = roles[cfg.heldout_every - 1 :: cfg.heldout_every]
    return [r for r in roles if r not in set(held)], held


def _dataset(cfg: ShakespeareBytesTask, text, roles: list[int], seed: int, with_train: bool = True) -> ByteWindows:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for r in roles:
        start, end = int(text.offsets[r]), int(text.offsets[r + 1])
        split = start + text.byte_split(r, cfg.test_fraction)
        windows = np.arange(start, split - cfg.seq_len, cfg.seq_len, dtype=np.int64) if with_train else np.zeros(0)
        cap = cfg.max_train_windows_per_client
        if cap is not None and len(windows) > cap:
            windows = np.sort(rng.choice(windows, cap, replace=False))
        train.append(torch.from_numpy(windows.astype(np.int64)))
        test.append(torch.arange(split, end - cfg.seq_len, cfg.seq_len, dtype=torch.long))
    return ByteWindows(text.stream, cfg.seq_len, train, test, [text.names[r] for r in roles])


def build_data(cfg: ShakespeareBytesTask, seed: int) -> ByteWindows:
    from flotilla.blt.data import load_role_bytes

    text = load_role_bytes()
    roles, _ = _eligible(cfg, text)
    if not roles:
        raise ValueError(f"task.min_bytes: no role has {cfg.min_bytes} bytes and room for a {cfg.seq_len}-byte window")
    if cfg.max_clients is not None and cfg.max_clients < len(roles):
        roles = sorted(np.random.default_rng(seed).choice(roles, cfg.max_clients, replace=False).tolist())
    return _dataset(cfg, text, roles, seed)


def heldout_roles(cfg: ShakespeareBytesTask) -> ByteWindows:
    """The held-out roles' test text as a dataset (no train windows): never seen in training."""
    from flotilla.blt.data import load_role_bytes

    text = load_role_bytes()
    _, held = _eligible(cfg, text)
    return _dataset(cfg, text, held, 0, with_train=False)


def entropy_spec(cfg: EntropyModelConfig):
    from flotilla.blt.entropy import EntropySpec

    return EntropySpec(dim=cfg.dim, layers=cfg.layers, window=cfg.window, steps=cfg.steps, batch_size=16)


def make_model(cfg: ShakespeareBytesTask, entropy=None):
    """The model of ``cfg``; BLT with entropy patching loads the cached entropy model (or ``entropy``:
    ``(model, calibration entropies)``) and calibrates the threshold if none is given."""
    from flotilla.blt.model import BLT, ByteTransformer
    from flotilla.blt.patcher import calibrate_threshold

    m = cfg.model
    if m.name == "byte-transformer":
        return ByteTransformer(m.dim, m.layers, m.heads, window=m.window)
    ent, threshold = None, m.threshold
    if m.patching == "entropy":
        if entropy is None:
            from flotilla.blt.entropy import load_entropy_model

            entropy = load_entropy_model(entropy_spec(m.entropy))
        ent, calibration = entropy
        if threshold is None:
            threshold = calibrate_threshold(calibration, m.target_patch_size, m.mode, m.max_patch)
    return BLT(
        ent,
        patching=m.patching,
        threshold=threshold if threshold is not None else 0.0,
        mode=m.mode,
        threshold_add=0.0 if m.mode == "combined" else None,
        patch_size=m.patch_size,
        max_patch=m.max_patch,
        local_dim=m.local_dim,
        global_dim=m.global_dim,
        heads=m.heads,
        encoder_layers=m.encoder_layers,
        global_layers=m.global_layers,
        decoder_layers=m.decoder_layers,
        window=m.window,
        hash_ns=tuple(m.hash_ns),
        hash_table=m.hash_table,
    )


def model(cfg: ShakespeareBytesTask):
    return make_model(cfg)


def build(cfg: ShakespeareBytesTask, seed: int) -> Task:
    data = build_data(cfg, seed)
    entropy = None
    if cfg.model.name == "blt" and cfg.model.patching == "entropy":
        from flotilla.blt.entropy import load_entropy_model

        entropy = load_entropy_model(entropy_spec(cfg.model.entropy))  # may train it (seeds its own RNG)
    torch.manual_seed(seed)
    return Task(cfg.name, data, make_model(cfg, entropy), F.cross_entropy)


TASK = register(TaskType("shakespeare-bytes", ShakespeareBytesTask, build, model))
