"""The entropy model: a small causal byte transformer with a local attention window, trained
centrally on the proxy plays, whose next-byte entropies decide where patches start.

It is trained once and cached (``FLOTILLA_CACHE``/blt/entropy-<digest>.pt, named by its settings):
the task loads it, or trains it on first use with a progress line (one to two minutes on an idle core at
the defaults); ``python benchmarks/blt.py entropy`` trains it explicitly.  The checkpoint also
holds entropies of held-out proxy windows, so a threshold calibrated to a target mean patch size
is the same number on the server and on every device (no text needed on a device that has the
checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from flotilla.blt.bytes import OFFSET
from flotilla.blt.model import ByteTransformer
from flotilla.data.cache import cache_dir

_VERSION = "1"


@dataclass(frozen=True)
class EntropySpec:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    window: int = 64
    seq_len: int = 128
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def model(self) -> ByteTransformer:
        return ByteTransformer(self.dim, self.layers, self.heads, window=self.window)

    def digest(self) -> str:
        return hashlib.sha1(json.dumps({**asdict(self), "v": _VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def windows(stream: np.ndarray, seq_len: int, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) symbol windows [n, seq_len] from raw bytes at ``starts``; y is x shifted by one."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    sym = torch.from_numpy(stream[idx].astype(np.int64) + OFFSET)
    return sym[:, :-1], sym[:, 1:]


class Adam:
    """Adam with decoupled weight decay, in a few lines: ``torch.optim`` imports torch._dynamo,
    which costs seconds to import on a busy machine (more than a small training run)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay, self.t = lr, betas, eps, weight_decay, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.mul_(1 - lr * self.weight_decay)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))


def train_entropy_model(
    stream: np.ndarray, spec: EntropySpec = EntropySpec(), log=None
) -> tuple[ByteTransformer, list[float]]:
    """Train on random windows of the byte ``stream`` (AdamW, cosine decay); returns (model, losses)."""
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    model = spec.model()
    opt = Adam(model.parameters(), lr=spec.lr, weight_decay=0.01)
    losses, t0 = [], time.perf_counter()
    for step in range(spec.steps):
        x, y = windows(stream, spec.seq_len, rng.integers(0, len(stream) - spec.seq_len - 1, spec.batch_size))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(spec.lr * 0.5 * (1 + math.cos(math.pi * step / spec.steps)))  # cosine decay
        losses.append(loss.item())
        if log is not None and (step + 1) % max(spec.steps // 10, 1) == 0:
            log(
                f"entropy model: step {step + 1}/{spec.steps} loss {np.mean(losses[-20:]):.3f} nats/byte "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    return model, losses


def checkpoint_path(spec: EntropySpec) -> Path:
    return cache_dir() / "blt" / f"entropy-{spec.digest()}.pt"


def save_checkpoint(path: Path, spec: EntropySpec, model: ByteTransformer, calibration: torch.Tensor) -> None:
    """Atomic write: the model's weights, its spec and the calibration entropies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"spec": asdict(spec), "state": model.state_dict(), "calibration": calibration}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared by the machine's users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_entropy_model(spec: EntropySpec = EntropySpec(), train_if_missing: bool = True):
    """``(model, calibration entropies [n, seq_len])`` from the cache, training it first if missing."""
    path = checkpoint_path(spec)
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no entropy model at {path}: run `python benchmarks/blt.py entropy`")
        train_and_save(spec)
    blob = torch.load(path, weights_only=True)
    model = spec.model()
    model.load_state_dict(blob["state"])
    model.eval()
    return model, blob["calibration"]


def train_and_save(spec: EntropySpec = EntropySpec(), plays_dir=None) -> Path:
    """Train on the proxy plays (flotilla/blt/data.py), keep 64 held-out proxy windows' entropies."""
    from flotilla.blt.data import load_role_bytes

    text = load_role_bytes(plays_dir)
    proxy = np.concatenate([np.frombuffer(text.role(r), dtype=np.uint8) for r in text.proxy_roles()])
    cut = int(len(proxy) * 0.9)  # the last 10% of the proxy text is held out for calibration
    path = checkpoint_path(spec)
    print(f"training the BLT entropy model on {cut:,} proxy bytes -> {path}", file=sys.stderr, flush=True)
    model, _ = train_entropy_model(proxy[:cut], spec, log=lambda s: print(s, file=sys.stderr, flush=True))
    held = proxy[cut:]
    starts = np.arange(0, len(held) - spec.seq_len - 1, spec.seq_len)[:64]
    x, _ = windows(held, spec.seq_len, starts)
    save_checkpoint(path, spec, model, model.entropy(x))
    return path
