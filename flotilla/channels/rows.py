"""Sparse embedding rows as an upload format that composes with the other channels (issue 19).

A recommendation client's local SGD changes only the embedding rows its data reads
(flotilla.algorithms.rowwise, ``server.embedding_rows``), so its upload is, per embedding table,
the touched row ids and those rows' values, plus every other (dense) parameter.  The *values* then
go through the upload chain (fp16 / bf16, quantize, topk / random) exactly as a dense update
would, tensor by tensor, with each table replaced by the ``(k, dim)`` block of its ``k`` touched
rows: ``quantize`` with ``per_channel`` gets a scale per row, ``topk`` keeps its fraction of the
touched values.  So the decoded update equals the chain applied to the dense update restricted to
the touched rows, zeros elsewhere.

Wire layout (one message, little endian), and so its byte count:

- per table, its row count ``k`` as a uint32 (4 bytes: a receiver needs it to parse the message;
  FLSim's sparse masks need none because their count is fixed by the keep fraction);
- per table, the row ids as int32 (``4 k`` bytes) or a bitmap over the table's rows
  (``ceil(rows / 8)``), whichever is smaller (the bitmap on a tie): decided by ``k``;
- the chain's payload (flotilla.channels.codec) over the parameter tensors in model order, each
  table as its ``(k, dim)`` block: 4 bytes a value in fp32, 2 in fp16, packed codes plus a scale
  and zero point per group when quantised, a mask plus kept values when sparsified.

The size depends on the chain, the shapes and the device's row counts, not on the values: a
device knows it before training.  ``len(encode(x)) == message_bytes(rows)`` and
``decode(encode(x)) == what the simulator aggregates``, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flotilla.channels.codec import Codec, Step

COUNT_BYTES = ID_BYTES = 4  # uint32 row count per table, int32 row id


def row_set_bytes(rows: int, k: int) -> int:
    """Bytes of a table's touched-row set: ``k`` int32 ids or a bitmap, whichever is smaller."""
    return min(ID_BYTES * k, math.ceil(rows / 8))


def _uses_ids(rows: int, k: int) -> bool:
    return ID_BYTES * k < math.ceil(rows / 8)


class RowsCodec:
    """Row-sparse uploads of one model layout through a channel chain (``steps``, possibly empty).

    ``tables``: objects with ``name``, ``start``, ``rows``, ``dim`` (flotilla.algorithms.rowwise.Table),
    each one whole parameter tensor of ``shapes`` (FlatModel order)."""

    def __init__(self, steps: list[Step] | tuple[Step, ...], shapes: list[tuple[int, ...]], tables):
        self.steps = tuple(steps)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.numel = sum(math.prod(s) for s in self.shapes)
        starts = np.cumsum([0] + [math.prod(s) for s in self.shapes])[:-1].tolist()
        self.tables = list(tables)
        self.slot: list[int] = []  # parameter index of each table
        for t in self.tables:
            i = starts.index(t.start) if t.start in starts else -1
            if i < 0 or self.shapes[i] != (t.rows, t.dim):
                raise ValueError(f"channels: embedding table {t.name} is not a parameter tensor of this model")
            self.slot.append(i)
        self.starts = starts
        probe = Codec(self.steps, [])  # validates the chain once
        self.stochastic = probe.stochastic

    # -- layout -------------------------------------------------------------------------------
    def _counts(self, rows: dict[str, Tensor]) -> list[int]:
        return [int(len(rows[t.name])) for t in self.tables]

    def codec(self, counts: list[int]) -> Codec:
        """The chain over this message's tensors: each table as its ``(k, dim)`` block."""
        shapes = list(self.shapes)
        for t, i, k in zip(self.tables, self.slot, counts):
            shapes[i] = (k, t.dim)
        return Codec(self.steps, shapes)

    def header_bytes(self, counts: list[int]) -> int:
        return sum(COUNT_BYTES + row_set_bytes(t.rows, k) for t, k in zip(self.tables, counts))

    def message_bytes(self, rows: dict[str, Tensor]) -> int:
        """The exact size of a message sending ``rows`` (table name -> sorted row ids)."""
        counts = self._counts(rows)
        return self.header_bytes(counts) + self.codec(counts).message_bytes

    # -- encode / decode ------------------------------------------------------------------------
    def _ids(self, rows: dict[str, Tensor]) -> list[Tensor]:
        out = []
        for t in self.tables:
            r = torch.as_tensor(rows[t.name], dtype=torch.long).reshape(-1)
            if len(r) and (int(r[0]) < 0 or int(r[-1]) >= t.rows or (len(r) > 1 and not bool((r.diff() > 0).all()))):
                raise ValueError(f"channels: rows of {t.name} must be strictly increasing ids in [0, {t.rows})")
            out.append(r)
        return out

    def _gather(self, x: Tensor, ids: list[Tensor]) -> Tensor:
        parts, by_slot = [], dict(zip(self.slot, zip(self.tables, ids)))
        for i, (start, shape) in enumerate(zip(self.starts, self.shapes)):
            block = x[start : start + math.prod(shape)]
            if i in by_slot:
                t, r = by_slot[i]
                block = block.view(t.rows, t.dim)[r].reshape(-1)
            parts.append(block)
        return torch.cat(parts) if parts else x.new_zeros(0)

    def _scatter(self, v: Tensor, ids: list[Tensor]) -> Tensor:
        out, off, by_slot = torch.zeros(self.numel), 0, dict(zip(self.slot, zip(self.tables, ids)))
        for i, (start, shape) in enumerate(zip(self.starts, self.shapes)):
            if i in by_slot:
                t, r = by_slot[i]
                n = len(r) * t.dim
                out[start : start + t.rows * t.dim].view(t.rows, t.dim)[r] = v[off : off + n].view(len(r), t.dim)
            else:
                n = math.prod(shape)
                out[start : start + n] = v[off : off + n]
            off += n
        return out

    def encode(
        self, x: Tensor, rows: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[bytes, Tensor]:
        """``(wire bytes, what the receiver reconstructs)`` of flat delta ``x`` sending ``rows``.

        ValueError if ``x`` moved a row outside ``rows`` (a sparse upload would drop it)."""
        if x.dim() != 1 or x.numel() != self.numel:
            raise ValueError(f"channels: expected a flat vector of {self.numel} values, got {tuple(x.shape)}")
        x = x.detach().to(torch.float32)
        ids = self._ids(rows)
        for t, r in zip(self.tables, ids):
            moved = x[t.start : t.stop].view(t.rows, t.dim).ne(0).any(dim=1)
            moved[r] = False
            if bool(moved.any()):
                raise ValueError(
                    f"channels: the update changed {int(moved.sum())} rows of {t.name} outside the rows its data "
                    "touches, which a row-sparse upload would drop"
                )
        counts = [len(r) for r in ids]
        head = [np.asarray(counts, dtype="<u4").tobytes()]
        for t, r in zip(self.tables, ids):
            if _uses_ids(t.rows, len(r)):
                head.append(r.numpy().astype("<i4").tobytes())
            else:
                bits = np.zeros(t.rows, dtype=np.uint8)
                bits[r.numpy()] = 1
                head.append(np.packbits(bits, bitorder="little").tobytes())
        payload, sent = self.codec(counts).encode(self._gather(x, ids), generator)
        data = b"".join(head) + payload
        assert len(data) == self.header_bytes(counts) + len(payload)
        return data, self._scatter(sent, ids)

    def decode(self, data: bytes | bytearray | memoryview) -> tuple[Tensor, dict[str, Tensor]]:
        """``(the float32 flat delta, table name -> row ids)`` of a message; ValueError if malformed."""
        view = memoryview(bytes(data))
        n_head = COUNT_BYTES * len(self.tables)
        if len(view) < n_head:
            raise ValueError(f"row-sparse payload has {len(view)} bytes, fewer than its {n_head}-byte row counts")
        counts = np.frombuffer(view[:n_head], dtype="<u4").astype(np.int64).tolist()
        for t, k in zip(self.tables, counts):
            if k > t.rows:
                raise ValueError(f"row-sparse payload: {k} rows of {t.name}, which has {t.rows}")
        pos, ids = n_head, []
        for t, k in zip(self.tables, counts):
            size = row_set_bytes(t.rows, k)
            raw = view[pos : pos + size]
            if len(raw) != size:
                raise ValueError("row-sparse payload too short for its row sets")
            pos += size
            if _uses_ids(t.rows, k):
                r = np.frombuffer(raw, dtype="<i4").astype(np.int64)
                if k and (r[0] < 0 or r[-1] >= t.rows or (k > 1 and not (np.diff(r) > 0).all())):
                    raise ValueError(f"row-sparse payload: row ids of {t.name} out of range or not increasing")
            else:
                r = np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little"))
                if len(r) != k or (k and r[-1] >= t.rows):
                    raise ValueError(f"row-sparse payload: the bitmap of {t.name} marks other than {k} rows")
            ids.append(torch.from_numpy(r.copy()))
        codec = self.codec(counts)
        values = codec.decode(view[pos:])  # checks the payload's exact size
        return self._scatter(values, ids), {t.name: r for t, r in zip(self.tables, ids)}
