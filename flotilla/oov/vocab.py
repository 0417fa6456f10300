"""Words, the closed vocabulary, spellings and the text metrics of the OOV study.

Tokens: lower-cased runs of letters with inner apostrophes (``o'er``); punctuation and digits are
dropped.  Vocabulary id 0 is ``<unk>`` (every word outside it); the top-V words get ids 1..V,
by descending count, ties broken by the word itself, so the same text always gives the same
vocabulary.  A word's spelling is its letters as codes 1..27 (``a``-``z``, ``'``), 0 = padding.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

UNK = 0
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
LETTERS = "abcdefghijklmnopqrstuvwxyz'"
CHAR_CODES = len(LETTERS) + 1  # + padding
MAX_WORD_LEN = 12  # longer words are cut (their first 12 letters encode them)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def top_words(token_lists: Iterable[Sequence[str]], size: int) -> list[str]:
    """The ``size`` most frequent words, by count then alphabetically (deterministic)."""
    counts = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    return sorted(counts, key=lambda w: (-counts[w], w))[:size]


def user_oov_words(train_tokens: Sequence[str], known: set[str], k: int) -> list[str]:
    """A user's ``k`` most frequent words outside ``known``, from their own training text only."""
    return top_words([[w for w in train_tokens if w not in known]], k)


class Vocab:
    """``<unk>`` + ``words``: ids, and the spelling of each id."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary words must be distinct")
        self.index = {w: i + 1 for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words) + 1

    def ids(self, tokens: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.index.get(w, UNK) for w in tokens], dtype=torch.long)

    def spellings(self) -> torch.Tensor:
        """``[len(self), MAX_WORD_LEN]`` character codes; row 0 (``<unk>``) is all padding."""
        return spell(["", *self.words])


def spell(words: Sequence[str]) -> torch.Tensor:
    out = torch.zeros(len(words), MAX_WORD_LEN, dtype=torch.long)
    for i, w in enumerate(words):
        codes = [LETTERS.index(c) + 1 for c in w[:MAX_WORD_LEN]]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out


def oov_rate(tokens: Sequence[str], known: set[str]) -> float:
    """Fraction of ``tokens`` outside ``known``."""
    if not tokens:
        raise ValueError("oov_rate of an empty text")
    return sum(w not in known for w in tokens) / len(tokens)


def exact_match_at_k(
    logits: torch.Tensor, targets: torch.Tensor, k: int = 3, exclude: int | None = UNK
) -> torch.Tensor:
    """Per position: is the true next word among the top-``k`` predicted words?

    ``<unk>`` (id ``exclude``) is not a word, so it is never predicted and a target that is
    ``<unk>`` is never matched.
    """
    if exclude is not None:
        logits = logits.clone()
        logits[:, exclude] = float("-inf")
    top = logits.topk(k, dim=-1).indices
    hit = (top == targets[:, None]).any(dim=-1)
    return hit & (targets != exclude) if exclude is not None else hit
