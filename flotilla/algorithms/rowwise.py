"""Sparse embedding uploads and per-row aggregation (RF^2, Maeng et al. 2022): ``server.embedding_rows``.

A recommendation client's local SGD reads only the embedding rows of the users, items and genres
in its own data, so only those rows can change: its upload is those rows (4-byte row indices and
``rows x dim`` float32 values per table) plus the dense rest of the model (the MLPs), instead of
every table.  :class:`SparseCodec` encodes a flat delta that way and counts its bytes exactly; an
update that moved a row its data never touched (weight decay, SCAFFOLD's correction) cannot be
sent sparsely and is refused, never silently cut.

Modes (the config key ``server.embedding_rows``):

- ``dense``: today's :class:`~flotilla.core.aggregate.WeightedMean` on the whole delta (default).
- ``sparse``: sparse uploads, decoded (zeros for untouched rows) and averaged with the same
  weighted mean: the result equals ``dense`` bit for bit; the round reports the bytes.
- ``rowwise``: RF^2's per-row averaging: each embedding row is the weighted mean over only the
  clients that touched it (weights: the round's client weights, i.e. examples); rows nobody
  touched get 0; the dense part is the plain weighted mean over all clients.

With a ``channels`` section (flotilla.channels.rows) the device does the row-sparse encoding instead:
the values go through the upload chain (fp16, quantize, topk, ...), the bytes are the channels'
``bytes_up`` (row ids or a bitmap, whichever is smaller, and a row count per table), ``sparse`` then
needs no aggregator of its own (the weighted mean of the decoded updates) and ``rowwise`` keeps
:class:`SparseRowMean` without its fp32 byte metrics.

The task tells which rows a client touches: its dataset has ``tables`` (parameter names of the
embedding tables) and ``embedding_rows(client) -> {name: row ids}`` (flotilla.tasks.movielens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flotilla.algorithms.base import Setting
from flotilla.core.aggregate import Aggregator, UpdateRejected, check_update
from flotilla.core.protocols import Components, Shape

MODES = ("dense", "sparse", "rowwise")
KEY = "server.embedding_rows"
INDEX_BYTES = VALUE_BYTES = 4  # int32 row index, float32 value


@dataclass(frozen=True)
class Table:
    """One embedding table's place in the flat vector: ``flat[start:stop].view(rows, dim)``."""

    name: str
    start: int
    rows: int
    dim: int

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.dim


def layout(model: nn.Module, names) -> list[Table]:
    """The tables ``names`` (parameter names) within ``model``'s flat vector (FlatModel's order)."""
    found, offset = {}, 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in names:
            if p.dim() != 2:
                raise ValueError(f"{KEY}: {name} is not an embedding table (shape {tuple(p.shape)})")
            found[name] = Table(name, offset, p.shape[0], p.shape[1])
        offset += p.numel()
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{KEY}: the model has no trainable parameter {', '.join(missing)}")
    return [found[n] for n in names]


@dataclass
class SparseUpload:
    """What a client sends: per table the touched row ids and their rows, plus the dense part."""

    rows: list[torch.Tensor]  # int32 [k_t] per table
    values: list[torch.Tensor]  # float32 [k_t, dim_t] per table
    dense: torch.Tensor  # float32: every coordinate outside the tables

    @property
    def nbytes(self) -> int:
        return (
            sum(r.numel() * INDEX_BYTES + v.numel() * VALUE_BYTES for r, v in zip(self.rows, self.values))
            + self.dense.numel() * VALUE_BYTES
        )


class SparseCodec:
    """Flat delta <-> :class:`SparseUpload` for one model layout."""

    def __init__(self, numel: int, tables: list[Table]):
        self.numel = numel
        self.tables = tables
        in_table = torch.zeros(numel, dtype=torch.bool)
        for t in tables:
            in_table[t.start : t.stop] = True
        self.dense_index = torch.nonzero(~in_table).squeeze(1)

    @property
    def dense_bytes(self) -> int:
        """The size of a dense upload of the whole vector."""
        return self.numel * VALUE_BYTES

    def encode(self, delta: torch.Tensor, touched: dict[str, torch.Tensor], where: str = "update") -> SparseUpload:
        rows, values = [], []
        for t in self.tables:
            block = delta[t.start : t.stop].view(t.rows, t.dim)
            r = torch.as_tensor(touched[t.name], dtype=torch.long)
            moved = block.ne(0).any(dim=1)
            moved[r] = False
            if bool(moved.any()):
                raise UpdateRejected(
                    f"{where}: changed {int(moved.sum())} rows of {t.name} its data never touches, which a sparse "
                    f"upload would drop ({KEY} needs plain local SGD: no weight decay, no SCAFFOLD)"
                )
            rows.append(r.to(torch.int32))
            values.append(block[r].clone())
        return SparseUpload(rows, values, delta[self.dense_index].clone())

    def decode(self, upload: SparseUpload, out: torch.Tensor) -> torch.Tensor:
        """The flat delta the upload stands for, zeros for the rows not sent, into ``out``."""
        out.zero_()
        out[self.dense_index] = upload.dense
        for t, r, v in zip(self.tables, upload.rows, upload.values):
            out[t.start : t.stop].view(t.rows, t.dim)[r.long()] = v
        return out


class SparseRowMean(Aggregator):
    """Aggregates sparse uploads: the weighted mean (``per_row=False``, equal to WeightedMean) or
    RF^2's per-row mean over the clients that touched each row (``per_row=True``)."""

    def __init__(
        self,
        numel: int,
        tables: list[Table],
        rows_of: Callable[[int], dict[str, torch.Tensor]],
        per_row: bool,
        report_bytes: bool = True,
    ):
        self.report_bytes = report_bytes  # False when channels count the (compressed) bytes
        self.codec = SparseCodec(numel, tables)
        self.rows_of = rows_of
        self.per_row = per_row
        self.sum = torch.zeros(numel)
        self._decoded = torch.zeros(numel)
        self._out = torch.zeros(numel)
        self.row_weight = [torch.zeros(t.rows, dtype=torch.float64) for t in tables]
        self.upload_bytes: dict[int, int] = {}  # this round: client -> bytes of its upload
        self.total_weight = 0.0
        self.count = 0

    def reset(self) -> None:
        self.sum.zero_()
        for w in self.row_weight:
            w.zero_()
        self.upload_bytes = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: torch.Tensor, weight: float = 1.0, client: int | None = None) -> None:
        where = f"update from client {client}"
        check_update(delta, self.codec.numel, where)
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateRejected(f"{where}: weight must be a positive finite number, got {weight}")
        upload = self.codec.encode(delta, self.rows_of(client), where)  # refused before any state changes
        # The same operation as WeightedMean on the decoded vector: the plain mean is bit-identical.
        self.sum.add_(self.codec.decode(upload, self._decoded), alpha=weight)
        for w, r in zip(self.row_weight, upload.rows):
            w[r.long()] += weight
        self.total_weight += weight
        self.count += 1
        self.upload_bytes[client] = upload.nbytes

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no updates to aggregate")
        out = torch.div(self.sum, self.total_weight, out=self._out)
        if self.per_row:
            for t, w in zip(self.codec.tables, self.row_weight):
                hit = torch.nonzero(w > 0).squeeze(1)
                rows = out[t.start : t.stop].view(t.rows, t.dim)
                summed = self.sum[t.start : t.stop].view(t.rows, t.dim)
                rows[hit] = (summed[hit].double() / w[hit, None]).float()
        return out

    def round_metrics(self) -> dict[str, float]:
        sizes = np.array(list(self.upload_bytes.values()), dtype=np.float64)
        if not len(sizes) or not self.report_bytes:
            return {}
        return {
            "upload_bytes_mean": float(sizes.mean()),
            "upload_bytes_max": float(sizes.max()),
            "upload_bytes_dense": float(self.codec.dense_bytes),
        }


# --- configuration: refusals and the component -----------------------------------------------
def refusal(
    mode: str,
    setting: Setting,
    *,
    weight_decay: float = 0.0,
    client_algorithm: str | None = None,
    ray: bool = False,
    network: bool = False,
    channels: bool = False,
) -> str | None:
    """Why ``server.embedding_rows: mode`` cannot run in this setting (one line naming the key), or None.

    ``channels`` composes (row-sparse uploads through the chain, flotilla.channels.rows); the runtimes
    it cannot run on are refused when it is built (flotilla.channels.sim.rows_refusal)."""
    if mode == "dense":
        return None
    if mode not in MODES:
        return f"{KEY}: unknown mode {mode!r} (known: {', '.join(MODES)})"
    why = None
    if network:
        why = "flotilla serve's wire format carries whole dense deltas; sparse uploads are simulated only"
    elif setting.aggregation != "round":
        why = (
            "mode: async sums any K arrivals in FedBuff's buffer with staleness weights; sparse per-row "
            "aggregation is written for the round aggregator (sync rounds)"
        )
    elif ray:
        why = "Ray actors return dense partial sums of their clients' deltas; use the in-process runtime"
    elif not setting.composable:
        why = f"{setting.why_not_composable or 'worker processes aggregate on their own'}; set workers: 1"
    elif setting.secure_aggregation:
        why = (
            "secure aggregation shows the server only the masked sum, so it cannot learn which rows each "
            "client touched or average rows over them (and masks cover every coordinate)"
        )
    elif setting.sample_level_dp:
        why = "DP-SGD adds noise to every coordinate, so every embedding row moves and nothing is sparse"
    elif setting.user_level_dp:
        why = (
            "user-level DP clips and noises the dense sum; noise on every row makes every row touched, and a "
            "per-row mean over the clients that touched a row changes the sensitivity the noise is set for"
        )
    elif weight_decay > 0:
        why = "client.weight_decay moves every embedding row, so untouched rows would not be zero"
    elif client_algorithm == "scaffold":
        why = "SCAFFOLD's control-variate correction moves every embedding row"
    return f"{KEY}: {mode} cannot run here: {why}" if why else None


def embedding_rows_components(mode: str, shape: Shape, model: nn.Module, channels: bool = False) -> Components:
    """The aggregator component for ``mode`` (``sparse`` or ``rowwise``) on the algorithm of ``shape``; with
    ``channels`` the device encodes the rows (flotilla.channels.sim), so ``sparse`` needs no aggregator."""
    why = refusal(mode, Setting(shape.aggregation, shape.composable, shape.why_not_composable), channels=channels)
    if why:
        raise ValueError(why)
    dataset = shape.dataset
    rows_of = getattr(dataset, "embedding_rows", None)
    if rows_of is None:
        raise ValueError(
            f"{KEY}: {mode} needs a task whose data says which embedding rows each client touches "
            f"(movielens); {getattr(dataset, 'name', 'this task')} does not"
        )
    tables = layout(model, dataset.tables)
    if channels and mode == "sparse":
        return Components()
    return Components(
        aggregator=lambda numel: SparseRowMean(
            numel, tables, rows_of, per_row=mode == "rowwise", report_bytes=not channels
        )
    )
