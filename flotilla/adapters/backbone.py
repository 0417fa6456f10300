"""The frozen backbone: a small causal character transformer, pre-trained centrally on proxy plays.

Proxy text: every role of the plays in ``PROXY_PLAYS`` (six plays, one to two of each kind, about
670 k characters).  These plays are held out of the federated population of the fine-tuning task,
so the backbone never sees a federated client's text.  ``pretrain_backbone`` trains the model on
random windows of the proxy text (windows may run across a role boundary: it is pre-training text,
not a client) and caches the weights under the data cache (``$FLOTILLA_CACHE``, never committed),
keyed by every setting that changes them: the first call trains (minutes), later calls load.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Fixed, documented split: these plays train the backbone and are never federated clients.
PROXY_PLAYS = ("Hamlet", "Macbeth", "The Tempest", "Twelfth Night", "Henry V", "Julius Caesar")
_VERSION = "1"


@dataclass(frozen=True)
class BackboneSpec:
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128  # learned positions: the longest input the model takes
    steps: int = 1500  # pre-training steps (AdamW, cosine decay)
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0


class Block(nn.Module):
    """Pre-norm transformer block; ``adapter`` (a bottleneck, or None) runs after the MLP's residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.adapter: nn.Module | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.out(F.gelu(self.fc(self.norm2(h))))
        if self.adapter is not None:
            h = h + self.adapter(h)
        return h


class CharTransformer(nn.Module):
    """Causal LM over character codes: ``features`` (embeddings + blocks) then ``logits`` (norm + head)."""

    def __init__(self, vocab_size: int, spec: BackboneSpec = BackboneSpec()):
        super().__init__()
        if spec.width % spec.heads:
            raise ValueError(f"width {spec.width} is not a multiple of heads {spec.heads}")
        self.spec = spec
        self.embed = nn.Embedding(vocab_size, spec.width)
        self.pos = nn.Embedding(spec.context, spec.width)
        self.blocks = nn.ModuleList(Block(spec.width, spec.heads) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, vocab_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.spec.context:
            raise ValueError(f"input of {x.shape[1]} characters is longer than the context {self.spec.context}")
        h = self.embed(x) + self.pos.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-character logits at every position, ``[B * T, vocab]`` (targets come flattened too)."""
        out = self.logits(self.features(x))
        return out.reshape(-1, out.shape[-1])


def proxy_stream() -> np.ndarray:
    """The proxy plays' text: all their roles' codes, in stream order."""
    from flotilla.data.shakespeare import load_shakespeare

    text = load_shakespeare()
    plays = text.plays()
    missing = set(PROXY_PLAYS) - set(plays)
    if missing:
        raise ValueError(f"proxy plays not in the Shakespeare data: {sorted(missing)}")
    parts = [text.stream[text.offsets[r] : text.offsets[r + 1]] for r, p in enumerate(plays) if p in PROXY_PLAYS]
    return np.concatenate(parts)


def _train(spec: BackboneSpec, log) -> dict[str, np.ndarray]:
    from flotilla.data.shakespeare import VOCAB_SIZE

    torch.manual_seed(spec.seed)
    model = CharTransformer(VOCAB_SIZE, spec)
    stream = torch.from_numpy(proxy_stream().astype(np.int64))
    # The last 5% of the proxy text is a held-out check of the pre-training (printed, not used).
    split = int(len(stream) * 0.95)
    gen = torch.Generator().manual_seed(spec.seed)
    window = torch.arange(spec.seq_len + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    started = time.perf_counter()
    for step in range(spec.steps):
        for group in opt.param_groups:  # linear warm-up over 100 steps, then cosine to zero
            group["lr"] = spec.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        starts = torch.randint(0, split - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        codes = stream[starts[:, None] + window]
        loss = F.cross_entropy(model(codes[:, :-1]), codes[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step + 1) % 250 == 0:
            log(
                f"pretrain step {step + 1}/{spec.steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    with torch.no_grad():
        held = stream[split:]
        n = (len(held) - 1) // spec.seq_len
        x = held[: n * spec.seq_len].view(n, spec.seq_len)
        y = held[1 : n * spec.seq_len + 1]
        heldout = float(F.cross_entropy(model(x), y))
    if log:
        log(f"pretrain held-out proxy loss {heldout:.3f} nats/char")
    arrays = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    arrays["_heldout_loss"] = np.array(heldout)
    return arrays


def pretrain_backbone(spec: BackboneSpec = BackboneSpec(), log=print) -> CharTransformer:
    """The pre-trained backbone for ``spec``: from the data cache, or trained now (and cached)."""
    from flotilla.data.cache import cached
    from flotilla.data.shakespeare import VOCAB_SIZE

    params = {**asdict(spec), "proxy_plays": list(PROXY_PLAYS)}
    arrays = cached("char-backbone", _VERSION, params, lambda: _train(spec, log))
    model = CharTransformer(VOCAB_SIZE, spec)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if not k.startswith("_")}
    model.load_state_dict(state)
    model.heldout_loss = float(arrays["_heldout_loss"])
    return model
