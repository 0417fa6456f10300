"""A closed-vocabulary word LM with a character-aware word encoder, and the per-user OOV adapter.

:class:`WordLM` (what trains federated): every vocabulary word's embedding is computed from its
letters by a character CNN (widths 2, 3, 4, max-pooled over the word, then a linear map), one
learned vector stands for ``<unk>``; a tanh bounds every embedding; an LSTM reads the input embeddings and its output, mapped to
the embedding width, scores every word by a dot product with the same character-built
embeddings plus a per-word bias.

:class:`PersonalLM` (what stays on one device): the user's own top OOV words get embeddings
from the (frozen) character encoder plus a small trainable adapter (a residual bottleneck,
starting as the identity) and a trainable bias each; their scores join the base vocabulary's
logits in one softmax, and they may appear in the input too.  Only the adapter trains; it is a
module of its own, never part of the federated model, so it is never in the flat vector that is
uploaded.  Ids: ``0`` = ``<unk>``, ``1..V`` = base words, ``V+1..V+K`` = this user's words.
"""

from __future__ import annotations

import torch
from torch import nn

from flotilla.oov.vocab import CHAR_CODES, UNK, spell


class CharWordEncoder(nn.Module):
    """Spellings ``[N, L]`` -> word embeddings ``[N, dim]``."""

    def __init__(self, dim: int, char_dim: int = 16, filters: int = 32, widths=(2, 3, 4)):
        super().__init__()
        self.chars = nn.Embedding(CHAR_CODES, char_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, filters, w, padding=w - 1) for w in widths)
        self.out = nn.Linear(filters * len(widths), dim)

    def forward(self, spellings: torch.Tensor) -> torch.Tensor:
        c = self.chars(spellings).transpose(1, 2)  # [N, char_dim, L]
        pooled = torch.cat([torch.relu(conv(c)).amax(dim=2) for conv in self.convs], dim=1)
        return torch.tanh(self.out(pooled))  # bounded embeddings keep the tied dot-product logits stable


class WordLM(nn.Module):
    """Next-word LM over ``<unk>`` + the vocabulary whose spellings are given; logits ``[B * T, V + 1]``."""

    def __init__(
        self, spellings: torch.Tensor, dim: int = 64, hidden: int = 128, char_dim: int = 16, filters: int = 32
    ):
        super().__init__()
        self.register_buffer("spellings", spellings, persistent=False)  # derived from the vocabulary
        self.encoder = CharWordEncoder(dim, char_dim, filters)
        self.unk = nn.Parameter(torch.randn(dim) * 0.1)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.to_embedding = nn.Linear(hidden, dim)
        self.bias = nn.Parameter(torch.zeros(len(spellings)))

    def table(self) -> torch.Tensor:
        """Embeddings of every vocabulary id (row 0 is ``<unk>``)."""
        return torch.cat([self.unk[None], self.encoder(self.spellings[1:])])

    def scores(self, x: torch.Tensor, table: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(table[x])
        logits = self.to_embedding(out) @ table.T + bias
        return logits.reshape(-1, logits.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x, self.table(), self.bias)


class OOVAdapter(nn.Module):
    """One user's words: residual bottleneck on their character embeddings, and a bias per word."""

    def __init__(self, words: list[str], dim: int, bottleneck: int = 16, bias_init: float = 0.0):
        super().__init__()
        if not words:
            raise ValueError("an OOV adapter needs at least one word")
        self.words = list(words)
        self.register_buffer("spellings", spell(self.words), persistent=False)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)  # starts as the character encoder's own embedding
        nn.init.zeros_(self.up.bias)
        self.bias = nn.Parameter(torch.full((len(words),), float(bias_init)))

    def embed(self, base_embeddings: torch.Tensor) -> torch.Tensor:
        return base_embeddings + self.up(torch.tanh(self.down(base_embeddings)))


class PersonalLM(nn.Module):
    """``base`` (frozen here: pass the device's own copy) + one user's :class:`OOVAdapter`."""

    def __init__(self, base: WordLM, adapter: OOVAdapter):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapter = adapter

    @property
    def vocab_size(self) -> int:
        return len(self.base.spellings) + len(self.adapter.words)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_table = self.base.table()
        user = self.adapter.embed(self.base.encoder(self.adapter.spellings))
        table = torch.cat([base_table, user])
        return self.base.scores(x, table, torch.cat([self.base.bias, self.adapter.bias]))


def personal_model(base: WordLM, words: list[str], bottleneck: int = 16) -> PersonalLM:
    """A :class:`PersonalLM` whose new words start with the mean bias of the base vocabulary's words."""
    bias_init = float(base.bias[UNK + 1 :].detach().mean())
    return PersonalLM(base, OOVAdapter(words, base.unk.numel(), bottleneck, bias_init))
