"""Task ``movielens``: click prediction on MovieLens ``ml-latest-small``, one client per user; a
DLRM-style model; metrics loss, AUC and average precision (AP), pooled and per client.

A rating is a click when it is >= ``click_threshold`` (default 4.0: 51.6% of the ratings; RF^2 used
5 stars on ML-20M, but here that leaves 15% positives and ~2 per user's test split, too few for a
per-user AUC; see docs/fairness.md).  Each user's ratings are split in time: the last
``test_fraction`` of them (by timestamp) are the user's test set.

An example ``x`` is one int64 row: ``[user, item, year, genre_1 .. genre_10]`` (genre padding =
``NUM_GENRES``); ``y`` is the click as float32.  The dataset also tells which embedding rows a
client's training touches (:meth:`MovieLensDataset.embedding_rows`), which sparse uploads and
per-row averaging (flotilla.algorithms.rowwise, ``server.embedding_rows``) need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from flotilla.core.dataset import Batch, FederatedDataset
from flotilla.core.schema import Section
from flotilla.tasks.registry import Task, TaskType, register

# The dslabs subset's sizes (flotilla.data.movielens checks them on load); repeated here so that
# building the model (a device in flotilla join) needs neither the data nor rdata.
NUM_USERS, NUM_MOVIES, NUM_GENRES, MAX_GENRES = 671, 9_066, 20, 10


class DLRMConfig(Section):
    embedding_dim: int = Field(16, ge=1, description="size of the user, item and genre embeddings (RF^2: 16)")
    bottom: list[int] = Field(
        [16], description="hidden sizes of the bottom MLP over the dense features (then a layer to embedding_dim)"
    )
    top: list[int] = Field([256], description="hidden sizes of the top MLP (then one output logit; RF^2: 256)")
    user_embedding: bool = Field(
        True, description="embed the user id (RF^2's DLRM leaves it out: false reproduces that)"
    )

    @field_validator("bottom", "top")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError(f"every layer width must be >= 1, got {v}")
        return v


class MovieLensTask(Section):
    """Click prediction on MovieLens ml-latest-small (Debian r-cran-dslabs), one client per user; DLRM."""

    name: Literal["movielens"] = Field(description="which task (decides the other task.* keys)")
    path: str | None = Field(
        None,
        description="dslabs lazy-load database without extension (default: $FLOTILLA_DSLABS, else "
        "/usr/lib/R/site-library/dslabs/data/Rdata)",
    )
    click_threshold: float = Field(
        4.0, gt=0.5, le=5.0, description="a rating >= this is a click (ratings are 0.5..5 in steps of 0.5)"
    )
    test_fraction: float = Field(0.1, gt=0, lt=1, description="each user's latest ratings held out (RF^2: 0.1)")
    max_users: int | None = Field(
        None, ge=1, le=NUM_USERS, description="keep a seeded random subset of N users (quick runs and tests)"
    )
    model: DLRMConfig = DLRMConfig()


# --- data -----------------------------------------------------------------------------------
class MovieLensDataset(FederatedDataset):
    """Clients are users; indices point into one store of example rows ``x`` and clicks ``y``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, train, test, client_names, tables: Sequence[str]):
        self.x, self.y = x, y
        self.tables = tuple(tables)
        self._rows: dict[int, dict[str, torch.Tensor]] = {}
        super().__init__("movielens", self._fetch, train, test, client_names)

    def _fetch(self, indices: torch.Tensor) -> Batch:
        return self.x[indices], self.y[indices]

    def embedding_rows(self, client: int) -> dict[str, torch.Tensor]:
        """Parameter name -> the sorted rows of that embedding table ``client``'s training reads (so the
        only rows its local SGD can change)."""
        rows = self._rows.get(client)
        if rows is None:
            x = self.x[self.train_indices[client]]
            genres = x[:, 3:].unique()
            found = {
                "user.weight": x[:, 0].unique(),
                "item.weight": x[:, 1].unique(),
                "genre.weight": genres[genres != NUM_GENRES],
            }
            rows = self._rows[client] = {name: found[name] for name in self.tables}
        return rows


def time_split(user: np.ndarray, timestamp: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per user, its ratings ordered by time (ties: database order); the last ``test_fraction`` (at
    least one, leaving at least one for training) are test.  Returns ``(order, is_test)`` over the
    ratings: ``order`` groups users (ascending) and sorts each by time."""
    order = np.lexsort((np.arange(len(user)), timestamp, user))
    u = user[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, len(u)])
    n_test = np.clip((counts * test_fraction).astype(np.int64), 1, np.maximum(counts - 1, 1))
    position = np.arange(len(u)) - np.repeat(starts, counts)
    is_test = position >= np.repeat(counts - n_test, counts)
    return order, is_test


def movielens_federated(cfg: MovieLensTask, seed: int = 0) -> MovieLensDataset:
    from flotilla.data.movielens import load_movielens

    data = load_movielens(cfg.path)
    genres = data.genres.astype(np.int64)
    genres[genres < 0] = NUM_GENRES  # EmbeddingBag's padding row
    item = data.item.astype(np.int64)
    x = np.concatenate(
        [data.user[:, None].astype(np.int64), item[:, None], data.year[item][:, None].astype(np.int64), genres[item]],
        axis=1,
    )
    y = (data.rating >= cfg.click_threshold).astype(np.float32)
    order, is_test = time_split(data.user, data.timestamp, cfg.test_fraction)
    users = np.arange(NUM_USERS)
    if cfg.max_users is not None:
        users = np.sort(np.random.default_rng([seed, 0x3E1]).choice(NUM_USERS, cfg.max_users, replace=False))
    owner = data.user[order]
    train, test = [], []
    for u in users:
        mine = owner == u
        train.append(torch.from_numpy(order[mine & ~is_test]))
        test.append(torch.from_numpy(order[mine & is_test]))
    tables = ["item.weight", "genre.weight"] + (["user.weight"] if cfg.model.user_embedding else [])
    return MovieLensDataset(
        torch.from_numpy(x), torch.from_numpy(y), train, test, [f"user{u}" for u in users.tolist()], tables
    )


# --- model ----------------------------------------------------------------------------------
def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM (Naumov et al. 2019) at MovieLens scale: dense features (the movie's year, and whether it
    is known) through a bottom MLP; user, item and genre (multi-hot, an EmbeddingBag mean)
    embeddings; pairwise dot products of all these vectors; the bottom output and the dots through
    a top MLP to one click logit."""

    def __init__(self, cfg: DLRMConfig = DLRMConfig()):
        super().__init__()
        d = cfg.embedding_dim
        self.user = nn.Embedding(NUM_USERS, d) if cfg.user_embedding else None
        self.item = nn.Embedding(NUM_MOVIES, d)
        self.genre = nn.EmbeddingBag(NUM_GENRES + 1, d, mode="mean", padding_idx=NUM_GENRES)
        for table in (self.user, self.item, self.genre):
            if table is not None:  # DLRM's initialisation: U(-1/sqrt(rows), 1/sqrt(rows))
                bound = table.num_embeddings**-0.5
                nn.init.uniform_(table.weight, -bound, bound)
        self.bottom = _mlp([2, *cfg.bottom, d], last_relu=True)
        vectors = 4 if cfg.user_embedding else 3
        # which pairs of vectors are dotted (a buffer: it follows the model to its device; not saved)
        self.register_buffer("pairs", torch.triu_indices(vectors, vectors, offset=1), persistent=False)
        self.top = _mlp([d + self.pairs.shape[1], *cfg.top, 1], last_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        year = x[:, 2].float()
        known = (year > 0).float()
        b = self.bottom(torch.stack([known * (year - 1990.0) / 20.0, known], dim=1))
        vectors = [b, self.item(x[:, 1]), self.genre(x[:, 3:])]
        if self.user is not None:
            vectors.append(self.user(x[:, 0]))
        t = torch.stack(vectors, dim=1)
        dots = torch.bmm(t, t.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([b, dots], dim=1)).squeeze(-1)


def click_loss(logits: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, clicks)


# --- metrics --------------------------------------------------------------------------------
def auc(scores, labels) -> float:
    """ROC AUC: the chance a random positive scores above a random negative (ties count half), by
    the rank-sum (Mann-Whitney) formula with average ranks for ties; NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[group]  # 1-based average rank of each score's tie group
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def average_precision(scores, labels) -> float:
    """AP = sum over score thresholds (high to low) of (recall_k - recall_{k-1}) x precision_k, tied
    scores forming one threshold (scikit-learn's definition); NaN without positives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1.0)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def score_metrics(logits, labels) -> dict[str, float]:
    """``{loss, accuracy, auc, ap, n, positives}`` of click logits against 0/1 labels (pooled).  In numpy:
    hundreds of tiny per-client calls into torch's thread pool cost ~30 ms each on a busy machine."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n = len(y)
    # BCE with logits, stably: max(z, 0) - z y + log(1 + exp(-|z|))
    loss = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    return {
        "loss": float(loss.mean()) if n else float("nan"),
        "accuracy": float(((z > 0) == (y > 0.5)).mean()) if n else float("nan"),
        "auc": auc(z, y),
        "ap": average_precision(z, y),
        "n": n,
        "positives": int(y.sum()),
    }


@torch.no_grad()
def client_scores(
    model: nn.Module, dataset: FederatedDataset, clients: Sequence[int], batch_size: int = 4096
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per client with test data, ``(logits, labels)`` of its test examples under ``model`` as it is now
    (pool them over any group of clients, e.g. a device tier, and call :func:`score_metrics`).  All
    clients' examples go through the model in shared batches (one forward pass per client would
    cost ~10x more for MovieLens' ~15 test ratings a user)."""
    model.eval()
    device = next(model.parameters()).device  # the model may train on a GPU (device: cuda); scores come back
    clients = [c for c in clients if dataset.num_test(c) > 0]
    if not clients:
        return {}
    indices = torch.cat([dataset.test_indices[c] for c in clients])
    logits, labels = [], []
    for start in range(0, len(indices), batch_size):
        x, y = dataset.fetch_test(indices[start : start + batch_size])
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    sizes = [dataset.num_test(c) for c in clients]
    return dict(zip(clients, zip(torch.cat(logits).split(sizes), torch.cat(labels).split(sizes))))


def evaluate_clients(
    model: nn.Module, dataset: FederatedDataset, clients: Sequence[int], batch_size: int = 4096
) -> dict[int, dict[str, float]]:
    """Per client with test data: ``{loss, accuracy, auc, ap, n, positives}`` (AUC NaN when the client's
    test clicks are all one class; AP NaN without a click)."""
    return {c: score_metrics(*s) for c, s in client_scores(model, dataset, clients, batch_size).items()}


def evaluate(model: nn.Module, dataset: FederatedDataset, clients: Sequence[int], batch_size: int) -> dict:
    """The run's evaluation record: pooled loss / accuracy / AUC / AP over all test examples of
    ``clients``, and the spread of per-client AUC and AP (over clients where they are defined)."""
    scores = client_scores(model, dataset, clients, batch_size)
    if not scores:
        raise ValueError("evaluation clients have no test examples")
    pooled = score_metrics(torch.cat([s[0] for s in scores.values()]), torch.cat([s[1] for s in scores.values()]))
    per = [score_metrics(*s) for s in scores.values()]
    record = {k: pooled[k] for k in ("loss", "accuracy", "auc", "ap")}
    for key in ("auc", "ap"):
        values = np.array([p[key] for p in per if not np.isnan(p[key])])
        if len(values):
            record[f"client_{key}_mean"] = float(values.mean())
            for q in (10, 50, 90):
                record[f"client_{key}_p{q}"] = float(np.percentile(values, q))
        record[f"clients_with_{key}"] = len(values)
    record["eval_examples"] = pooled["n"]
    return record


# --- registration ---------------------------------------------------------------------------
def model(cfg: MovieLensTask) -> DLRM:
    return DLRM(cfg.model)


def build(cfg: MovieLensTask, seed: int) -> Task:
    data = movielens_federated(cfg, seed)
    torch.manual_seed(seed)
    return Task(cfg.name, data, model(cfg), click_loss, evaluate=evaluate)


TASK = register(TaskType("movielens", MovieLensTask, build, model))
