"""Task ``shakespeare-words``: next-word prediction over a closed vocabulary, one client per role.

The vocabulary is the top ``vocab_size`` words of the federated training text (every kept role's
training part; ties broken by the word); every other word is ``<unk>``.  The model
(:class:`flotilla.oov.model.WordLM`) builds word embeddings from characters.  Every position of a
window is a target (``x [B, T]``, ``y [B * T]``), so the core's accuracy is next-word top-1
accuracy with ``<unk>`` counted as a class.  Personal OOV adapters are trained after federated
training, on each device, by ``benchmarks/oov.py`` (see docs/oov.md); they are not part of this
task's model and never travel.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register


class WordLMConfig(Section):
    dim: int = Field(64, ge=1, description="word embedding width (built from characters)")
    hidden: int = Field(128, ge=1, description="LSTM hidden units")
    char_dim: int = Field(8, ge=1, description="character embedding size of the word encoder")
    filters: int = Field(24, ge=1, description="character CNN filters per width (widths 2, 3, 4)")


class ShakespeareWordsTask(Section):
    """Next-word prediction with a character-aware closed vocabulary, one client per (play, role)."""

    name: Literal["shakespeare-words"] = Field(description="which task (decides the other task.* keys)")
    vocab_size: int = Field(2000, ge=1, description="top-V words of the federated training text (+ <unk>)")
    seq_len: int = Field(20, ge=1, description="words of context per window (every position is a target)")
    min_words: int = Field(300, ge=1, description="roles with fewer training words are dropped")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="last fraction of each role's words held out")
    max_clients: int | None = Field(None, ge=1, description="train on a seeded random subset of N roles")
    model: WordLMConfig = WordLMConfig()


@lru_cache(maxsize=4)
def _roles_and_vocab(min_words: int, seq_len: int, test_fraction: float, vocab_size: int):
    from flotilla.oov.data import build_vocab, role_words

    roles = role_words(min_words, seq_len, test_fraction)
    return roles, build_vocab(roles, vocab_size)


def vocabulary(cfg: ShakespeareWordsTask):
    """The kept roles and the vocabulary (from every kept role, before ``max_clients``: devices rebuild it)."""
    return _roles_and_vocab(cfg.min_words, cfg.seq_len, cfg.test_fraction, cfg.vocab_size)


def model(cfg: ShakespeareWordsTask):
    from flotilla.oov.model import WordLM

    m = cfg.model
    return WordLM(vocabulary(cfg)[1].spellings(), m.dim, m.hidden, m.char_dim, m.filters)


def build(cfg: ShakespeareWordsTask, seed: int) -> Task:
    import numpy as np

    from flotilla.oov.data import WordWindows

    roles, vocab = vocabulary(cfg)
    if cfg.max_clients is not None and cfg.max_clients < len(roles):
        keep = np.random.default_rng([seed, 0x0DD]).choice(len(roles), cfg.max_clients, replace=False)
        roles = [roles[i] for i in sorted(keep.tolist())]
    data = WordWindows(roles, vocab, cfg.seq_len)
    torch.manual_seed(seed)
    return Task(cfg.name, data, model(cfg), F.cross_entropy)


TASK = register(TaskType("shakespeare-words", ShakespeareWordsTask, build, model))
