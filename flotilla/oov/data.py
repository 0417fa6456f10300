"""Shakespeare by role as word streams: the federated word-LM data and each user's own words.

Each role's words are split in time order: the first ``1 - test_fraction`` are its training text,
the rest its test text.  Roles with fewer than ``min_words`` training words, or a test text
shorter than one window, are dropped.  The vocabulary is built from the training text of every
kept role (the federated training text) and nothing else.  Windows are ``seq_len + 1`` words,
back to back (stride ``seq_len``) inside one role's train or test part, so every word after a
part's first is a target exactly once per pass: ``x [B, T]``, ``y [B * T]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flotilla.core.dataset import FederatedDataset
from flotilla.oov.vocab import Vocab, tokenize, top_words


@dataclass(frozen=True)
class RoleText:
    name: str
    train: list[str]
    test: list[str]


def role_words(min_words: int, seq_len: int, test_fraction: float) -> list[RoleText]:
    """Every role with enough words, its tokens split into train and test (deterministic)."""
    from flotilla.data.shakespeare import ALL_LETTERS, load_shakespeare

    text = load_shakespeare()
    # Codes to ASCII in one pass (every ALL_LETTERS character is ASCII; UNKNOWN becomes a space).
    table = bytes(ord(ALL_LETTERS[c]) if c < len(ALL_LETTERS) else 32 for c in range(256))
    chars = text.stream.tobytes().translate(table).decode("ascii")
    roles = []
    for r, name in enumerate(text.names):
        tokens = tokenize(chars[text.offsets[r] : text.offsets[r + 1]])
        cut = int(len(tokens) * (1 - test_fraction))
        if cut >= max(min_words, seq_len + 1) and len(tokens) - cut > seq_len:
            roles.append(RoleText(name, tokens[:cut], tokens[cut:]))
    if not roles:
        raise ValueError(f"no role has {min_words} training words and a test text over {seq_len} words")
    return roles


def build_vocab(roles: list[RoleText], size: int) -> Vocab:
    return Vocab(top_words((r.train for r in roles), size))


def window_starts(length: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Starts of back-to-back windows of ``seq_len + 1`` tokens in a part of ``length`` tokens."""
    return torch.arange(offset, offset + length - seq_len, seq_len, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All back-to-back windows of one id sequence: ``(x [n, T], y [n * T])``."""
    starts = window_starts(len(ids), seq_len)
    codes = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return codes[:, :-1], codes[:, 1:].reshape(-1)


class WordWindows(FederatedDataset):
    """The federated word-LM data: one id stream, windows by role; ``roles[c]`` keeps client c's words."""

    def __init__(self, roles: list[RoleText], vocab: Vocab, seq_len: int):
        self.roles = roles
        self.vocab = vocab
        self.seq_len = seq_len
        parts, train, test, offset = [], [], [], 0
        for r in roles:
            parts += [vocab.ids(r.train), vocab.ids(r.test)]
            train.append(window_starts(len(r.train), seq_len, offset))
            test.append(window_starts(len(r.test), seq_len, offset + len(r.train)))
            offset += len(r.train) + len(r.test)
        self._stream = torch.cat(parts)
        self._window = torch.arange(seq_len + 1)
        super().__init__(f"shakespeare-words{seq_len}", self._fetch, train, test, [r.name for r in roles])

    def _fetch(self, starts: torch.Tensor):
        codes = self._stream[starts[:, None] + self._window]
        return codes[:, :-1], codes[:, 1:].reshape(-1)
