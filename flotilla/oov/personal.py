"""On-device personalisation: one user's OOV adapter, trained and scored on that user's text only.

Everything here runs on one device after (or between) federated rounds.  The federated model is
read, copied, and never changed: the adapter is trained on a private copy, and nothing of it is
written into the federated model's flat vector (tests/test_oov.py checks both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from flotilla.oov.data import windows
from flotilla.oov.model import PersonalLM, WordLM, personal_model
from flotilla.oov.vocab import UNK, Vocab, exact_match_at_k, user_oov_words


def personal_ids(tokens: list[str], vocab: Vocab, user_words: list[str]) -> torch.Tensor:
    """Ids in the user's extended vocabulary: base ids, then ``len(vocab) + k`` for user word k, else ``<unk>``."""
    extra = {w: len(vocab) + k for k, w in enumerate(user_words)}
    return torch.tensor([vocab.index.get(w, extra.get(w, UNK)) for w in tokens], dtype=torch.long)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int):
    """Adam on ``model``'s trainable parameters over random batches of the windows ``(x, y)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    # A few lines of Adam rather than torch.optim: constructing a torch.optim optimizer imports
    # torch._dynamo (seconds), too slow for a device's (and a test's) short adaptation.
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(seed)
    y = y.view(-1, x.shape[1])
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx].reshape(-1))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v):
                m_.mul_(beta1).add_(g, alpha=1 - beta1)
                v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v_ / (1 - beta2**step)).sqrt_().add_(eps)
                p.addcdiv_(m_, denom, value=-lr / (1 - beta1**step))
    model.eval()
    return model


@dataclass
class UserScore:
    emr: float  # EMR@3 over every test position
    emr_oov: float  # EMR@3 over positions whose target is outside the base vocabulary
    positions: int
    oov_positions: int


@torch.no_grad()
def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, base_size: int, k: int = 3) -> UserScore:
    """EMR@k of ``model`` on windows ``(x, y)``; a target id >= ``base_size`` is a user word (an OOV)."""
    model.eval()
    hits = exact_match_at_k(model(x), y, k)
    oov = (y == UNK) | (y >= base_size)
    n_oov = int(oov.sum())
    return UserScore(
        emr=float(hits.float().mean()),
        emr_oov=float(hits[oov].float().mean()) if n_oov else float("nan"),
        positions=len(y),
        oov_positions=n_oov,
    )


def adapt(base: WordLM, vocab: Vocab, train_tokens: list[str], k_words: int, seq_len: int, **fit_args) -> PersonalLM:
    """The user's adapter over their ``k_words`` most frequent OOV training words, trained on their
    training text (the base is copied and frozen; the federated model is not touched)."""
    words = user_oov_words(train_tokens, set(vocab.words), k_words)
    model = personal_model(copy.deepcopy(base), words)
    x, y = windows(personal_ids(train_tokens, vocab, words), seq_len)
    return fit(model, x, y, **fit_args)


def finetune(base: WordLM, vocab: Vocab, train_tokens: list[str], seq_len: int, **fit_args) -> WordLM:
    """The baseline: local fine-tuning of a copy of the whole model on the user's training text."""
    model = copy.deepcopy(base).requires_grad_(True)
    x, y = windows(vocab.ids(train_tokens), seq_len)
    return fit(model, x, y, **fit_args)
