"""Per-client state (one float32 vector per client id) for algorithms that keep some: SCAFFOLD's
control variates, a personalised model.

Both stores hold only clients that were written: a client never seen costs nothing (``get``
answers "none yet"), so memory does not grow with the population.

- :class:`MemoryStore`: a dict of tensors (memory grows with the clients seen).
- :class:`DiskStore`: rows of a float32 file, written with ``pwrite`` and read with ``preadv``
  into the caller's buffer; a row is given to a client when it is first written, so the file
  grows with the clients seen, and memory holds only the id -> row map.

Checkpoints: ``state_dict()`` holds every stored vector (ids + one stacked tensor), so a resumed
run is bit-identical whichever store it uses.  Its size is ``clients seen x numel x 4`` bytes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch


class MemoryStore:
    def __init__(self, numel: int):
        self.numel = numel
        self._rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, client: int, out: torch.Tensor) -> bool:
        """Copy ``client``'s vector into ``out``; False (``out`` untouched) if it has none yet."""
        row = self._rows.get(client)
        if row is None:
            return False
        out.copy_(row)
        return True

    def put(self, client: int, value: torch.Tensor) -> None:
        row = self._rows.get(client)
        if row is None:
            self._rows[client] = value.detach().clone()
        else:
            row.copy_(value)

    def clients(self) -> list[int]:
        return sorted(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def close(self) -> None:
        self.clear()


class DiskStore:
    """Rows of a float32 file in ``directory`` (a temporary file, removed on close)."""

    def __init__(self, numel: int, directory: str | Path | None = None):
        self.numel = numel
        self.row_bytes = numel * 4
        self.directory = Path(directory) if directory is not None else None
        self._row: dict[int, int] = {}
        self._fd: int | None = None
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self._row)

    def _open(self) -> int:
        if self._fd is None:  # created lazily: a run that never stores anything writes no file
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="flotilla-client-state-", suffix=".f32", dir=self.directory)
            self._fd, self.path = fd, Path(path)
            # The file goes when the store does, even if nobody calls close() (a crashed run).
            self._finalizer = weakref.finalize(self, _remove, fd, self.path)
        return self._fd

    def get(self, client: int, out: torch.Tensor) -> bool:
        row = self._row.get(client)
        if row is None:
            return False
        view = memoryview(out.numpy()).cast("B")
        got = os.preadv(self._fd, [view], row * self.row_bytes)
        if got != self.row_bytes:
            raise OSError(
                f"client state file {self.path}: short read for client {client} ({got} of {self.row_bytes} bytes)"
            )
        return True

    def put(self, client: int, value: torch.Tensor) -> None:
        fd = self._open()
        row = self._row.get(client)
        if row is None:
            row = self._row[client] = len(self._row)
        data = np.ascontiguousarray(value.detach().numpy(), dtype=np.float32).tobytes()
        if os.pwrite(fd, data, row * self.row_bytes) != self.row_bytes:
            raise OSError(f"client state file {self.path}: short write for client {client} (disk full?)")

    def clients(self) -> list[int]:
        return sorted(self._row)

    def clear(self) -> None:
        self._row.clear()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        self._row.clear()
        if self._fd is not None:
            self._finalizer()
            self._fd = None


def _remove(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    path.unlink(missing_ok=True)


def store_state(store, prefix: str) -> dict[str, torch.Tensor]:
    """Every stored vector, for a checkpoint: ``{prefix}clients`` (int64 ids) and ``{prefix}values``."""
    ids = store.clients()
    values = torch.empty(len(ids), store.numel)
    for i, c in enumerate(ids):
        store.get(c, values[i])
    return {f"{prefix}clients": torch.tensor(ids, dtype=torch.int64), f"{prefix}values": values}


def load_store_state(store, state: dict[str, torch.Tensor], prefix: str) -> None:
    ids, values = state[f"{prefix}clients"], state[f"{prefix}values"]
    if values.dim() != 2 or values.shape[0] != ids.numel() or (ids.numel() and values.shape[1] != store.numel):
        raise ValueError(
            f"checkpoint {prefix}values has shape {tuple(values.shape)}, expected ({ids.numel()}, {store.numel})"
        )
    store.clear()
    for c, v in zip(ids.tolist(), values):
        store.put(int(c), v)
