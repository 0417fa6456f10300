"""Task movielens (flotilla/data/movielens.py, flotilla/tasks/movielens.py) and sparse embedding uploads /
per-row aggregation (flotilla/algorithms/rowwise.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flotilla.algorithms.base import Setting
from flotilla.algorithms.rowwise import SparseCodec, SparseRowMean, Table, layout, refusal
from flotilla.config import ConfigError, validate
from flotilla.core.aggregate import UpdateRejected, WeightedMean
from flotilla.data.cache import DatasetMissingError
from flotilla.data.movielens import load_movielens, parse_movielens
from flotilla.tasks import build_task
from flotilla.tasks.movielens import (
    DLRM,
    NUM_GENRES,
    auc,
    average_precision,
    evaluate_clients,
    movielens_federated,
    time_split,
)

SMALL = {"name": "movielens", "max_users": 40}


def small_task(**keys):
    return validate({"task": {**SMALL, **keys}, "rounds": 1}).task


@pytest.fixture(scope="module")
def ratings():
    return load_movielens()


# --- data -------------------------------------------------------------------------------------
def test_reads_the_real_database():
    """Parses dslabs' R database itself (no cache): the ml-latest-small subset's sizes."""
    arrays = parse_movielens()
    assert len(arrays["rating"]) == 100_004
    assert len(np.unique(arrays["user"])) == 671
    assert len(arrays["movie_id"]) == len(np.unique(arrays["item"])) == 9_066
    assert len(arrays["genre_names"]) == 20 and "Drama" in arrays["genre_names"].tolist()
    assert set(np.unique(arrays["rating"]).tolist()) == {x / 2 for x in range(1, 11)}
    assert (arrays["genres"][:, 0] >= 0).all()  # every movie has a genre
    assert arrays["title"][arrays["movie_id"] == 1][0] == "Toy Story"


def test_missing_database_names_the_package(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"apt-get install r-cran-dslabs"):
        parse_movielens(tmp_path / "Rdata")


def test_time_split_by_hand():
    user = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1])
    stamp = np.array([5, 1, 9, 3, 2, 1, 7, 7, 0, 2, 4, 8, 3])
    order, is_test = time_split(user, stamp, 0.2)
    # user 0: 11 ratings -> 2 test (the two latest: stamps 8, 9); user 1: 3 ratings -> 1 test (stamp 3)
    assert sorted(stamp[order[is_test & (user[order] == 0)]].tolist()) == [8, 9]
    assert stamp[order[is_test & (user[order] == 1)]].tolist() == [3]
    assert sorted(order.tolist()) == list(range(len(user)))


def test_each_users_test_ratings_are_its_latest(ratings):
    data = movielens_federated(small_task(), seed=0)
    assert data.num_clients == 40
    users = [int(name.removeprefix("user")) for name in data.client_names]
    for c, u in enumerate(users):
        train, test = data.train_indices[c].numpy(), data.test_indices[c].numpy()
        assert (ratings.user[train] == u).all() and (ratings.user[test] == u).all()
        assert len(train) + len(test) == int((ratings.user == u).sum())
        assert len(test) == max(1, int(0.1 * (len(train) + len(test))))
        assert ratings.timestamp[test].min() >= ratings.timestamp[train].max()


@pytest.mark.parametrize("threshold", [4.0, 3.5])
def test_click_is_rating_at_or_above_the_threshold(ratings, threshold):
    data = movielens_federated(small_task(click_threshold=threshold), seed=0)
    idx = torch.cat(data.train_indices + data.test_indices)
    x, y = data.fetch(idx)
    assert torch.equal(y, torch.from_numpy((ratings.rating[idx.numpy()] >= threshold).astype(np.float32)))
    assert torch.equal(x[:, 1], torch.from_numpy(ratings.item[idx.numpy()]).long())
    genres = ratings.genres[ratings.item[idx.numpy()]]
    assert torch.equal(x[:, 3:], torch.from_numpy(np.where(genres < 0, NUM_GENRES, genres)).long())


# --- metrics ----------------------------------------------------------------------------------
def test_auc_and_ap_by_hand():
    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    labels = [1, 0, 1, 0, 1]
    # pairs (pos, neg): 0.9>0.8, 0.9>0.3, 0.8=0.8 (1/2), 0.8>0.3, 0.1<0.8, 0.1<0.3 -> 3.5 / 6
    assert auc(scores, labels) == pytest.approx(3.5 / 6)
    # thresholds 0.9: P=1, R=1/3; 0.8: P=2/3, R=2/3; 0.3: R unchanged; 0.1: P=3/5, R=1
    assert average_precision(scores, labels) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)
    assert np.isnan(auc([0.1, 0.2], [1, 1])) and np.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_auc_and_ap_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties
        assert auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(scores, labels) == pytest.approx(
            metrics.average_precision_score(labels, scores), abs=1e-12
        )


# --- sparse uploads and per-row aggregation ---------------------------------------------------
TABLES = [Table("a", 0, 5, 2), Table("b", 10, 3, 4)]  # flat: a = [0, 10), b = [10, 22), dense = [22, 30)
NUMEL = 30


def sparse_delta(rows: dict[str, list[int]], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(NUMEL)
    for t in TABLES:
        block = delta[t.start : t.stop].view(t.rows, t.dim)
        block[rows[t.name]] = torch.randn(len(rows[t.name]), t.dim, generator=g)
    delta[22:] = torch.randn(8, generator=g)
    return delta


def test_sparse_upload_bytes_are_exact():
    codec = SparseCodec(NUMEL, TABLES)
    rows = {"a": torch.tensor([1, 4]), "b": torch.tensor([2])}
    up = codec.encode(sparse_delta({"a": [1, 4], "b": [2]}, 0), rows)
    # a: 2 indices x 4 B + 2 rows x 2 x 4 B; b: 1 x 4 + 1 x 4 x 4; dense: 8 x 4
    assert up.nbytes == (2 * 4 + 2 * 2 * 4) + (4 + 4 * 4) + 8 * 4 == 76
    assert codec.dense_bytes == 120
    assert torch.equal(codec.decode(up, torch.empty(NUMEL)), sparse_delta({"a": [1, 4], "b": [2]}, 0))


def test_an_update_moving_untouched_rows_is_refused_and_changes_nothing():
    agg = SparseRowMean(NUMEL, TABLES, lambda c: {"a": torch.tensor([0]), "b": torch.tensor([0])}, per_row=True)
    agg.add(sparse_delta({"a": [0], "b": [0]}, 1), 2.0, 0)
    before = agg.sum.clone()
    with pytest.raises(UpdateRejected, match=r"changed 1 rows of b"):
        agg.add(sparse_delta({"a": [0], "b": [0, 2]}, 2), 1.0, 1)
    assert agg.count == 1 and torch.equal(agg.sum, before) and agg.total_weight == 2.0


def test_plain_mean_of_sparse_uploads_equals_dense_bit_for_bit():
    touched = {c: {"a": sorted({c % 5, (2 * c) % 5}), "b": [c % 3]} for c in range(7)}
    sparse = SparseRowMean(NUMEL, TABLES, lambda c: {k: torch.tensor(v) for k, v in touched[c].items()}, False)
    dense = WeightedMean(NUMEL)
    for agg in (sparse, dense):
        agg.reset()
        for c in range(7):
            agg.add(sparse_delta(touched[c], c), float(c + 1) * 1.7, c)
    assert torch.equal(sparse.result(), dense.result())
    assert sparse.round_metrics()["upload_bytes_dense"] == 120


def test_per_row_mean_by_hand():
    t = [Table("e", 0, 3, 1)]  # a 3-row, 1-wide table, then 1 dense coordinate
    rows = {0: {"e": torch.tensor([0])}, 1: {"e": torch.tensor([0, 1])}}
    agg = SparseRowMean(4, t, rows.__getitem__, per_row=True)
    agg.add(torch.tensor([1.0, 0.0, 0.0, 10.0]), 1.0, 0)
    agg.add(torch.tensor([4.0, 6.0, 0.0, 40.0]), 3.0, 1)
    # row 0: (1*1 + 3*4) / 4; row 1: only client 1 touched it -> 6; row 2: nobody -> 0;
    # dense: (1*10 + 3*40) / 4.  The plain mean would give row 1 = 3*6/4 = 4.5.
    assert agg.result().tolist() == [13 / 4, 6.0, 0.0, 130 / 4]
    assert agg.round_metrics()["upload_bytes_mean"] == (4 + 4 + 4) / 2 + (2 * 4 + 2 * 4 + 4) / 2


def test_layout_finds_the_tables_in_flat_order():
    model = DLRM()
    tables = layout(model, ["item.weight", "genre.weight", "user.weight"])
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert [t.start for t in tables] == [sizes["user.weight"], sizes["user.weight"] + sizes["item.weight"], 0]
    assert (tables[0].rows, tables[0].dim) == (9066, 16)


def run_rounds(embedding_rows: str, rounds: int = 2):
    from flotilla.experiment.run import run_experiment

    cfg = validate(
        {
            "task": SMALL,
            "rounds": rounds,
            "cohort": 8,
            "client": {"lr": 1.0, "batch_size": 100000},
            "server": {"optimizer": "fedadagrad", "lr": 0.1, "beta1": 0.0, "embedding_rows": embedding_rows},
            "output": {"progress": False},
        }
    )
    return run_experiment(cfg, write_run_dir=False)


def test_sparse_rounds_equal_dense_rounds_and_report_bytes():
    dense, sparse, rowwise = run_rounds("dense"), run_rounds("sparse"), run_rounds("rowwise")
    assert torch.equal(dense.weights, sparse.weights)
    assert not torch.equal(dense.weights, rowwise.weights)
    record = sparse.history[-1]
    assert 0 < record["upload_bytes_mean"] < record["upload_bytes_max"] <= record["upload_bytes_dense"]
    assert record["upload_bytes_dense"] == dense.weights.numel() * 4
    for key in ("loss", "auc", "ap", "client_auc_mean", "eval_examples"):
        assert key in record and "upload_bytes_mean" not in dense.history[-1]


def test_evaluate_clients_gives_per_client_metrics():
    task = build_task(small_task(), 0)
    data = task.dataset
    per = evaluate_clients(task.model, data, range(data.num_clients))
    assert set(per) == set(range(data.num_clients))
    for c, m in per.items():
        assert m["n"] == data.num_test(c)
        assert m["positives"] == int(data.y[data.test_indices[c]].sum())
        assert np.isnan(m["auc"]) == (m["positives"] in (0, m["n"]))


# --- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, message",
    [
        ({"task": {**SMALL, "click_threshold": 0.5}}, "task.click_threshold"),
        ({"task": {**SMALL, "click_threshold": 5.5}}, "task.click_threshold"),
        ({"task": {**SMALL, "test_fraction": 1.0}}, "task.test_fraction"),
        ({"task": {**SMALL, "threshold": 4}}, "task.threshold: unknown key"),
        ({"task": {**SMALL, "model": {"embeding_dim": 8}}}, "task.model.embeding_dim: unknown key"),
        ({"task": {**SMALL, "model": {"top": [64, 0]}}}, "task.model.top: every layer width must be >= 1"),
        ({"server": {"embedding_rows": "rows"}}, "server.embedding_rows"),
        ({"server": {"embedding_rows": "rowwise"}, "mode": "async"}, "server.embedding_rows: rowwise cannot run"),
        ({"server": {"embedding_rows": "sparse"}, "workers": 2}, "server.embedding_rows: sparse cannot run"),
        ({"server": {"embedding_rows": "rowwise"}, "client": {"weight_decay": 0.1}}, "client.weight_decay moves"),
        (
            {"server": {"embedding_rows": "rowwise"}, "secure_aggregation": {"degree": "full"}},
            "server.embedding_rows: rowwise cannot run here: secure aggregation",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(keys, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate({"task": SMALL, "rounds": 1, **keys})


def test_refusals_name_each_reason():
    plain = Setting()
    assert refusal("dense", Setting(aggregation="buffer")) is None
    assert refusal("rowwise", plain) is None
    assert "user-level DP" in refusal("rowwise", Setting(user_level_dp=True))
    assert "DP-SGD" in refusal("sparse", Setting(sample_level_dp=True))
    assert "Ray" in refusal("rowwise", plain, ray=True)
    assert "flotilla serve" in refusal("rowwise", plain, network=True)
    assert "SCAFFOLD" in refusal("rowwise", plain, client_algorithm="scaffold")


def test_the_example_config_runs_as_a_smoke_test():
    """examples/movielens.yaml (RF^2's setup) with --set overrides: a round on a few users."""
    from pathlib import Path

    from flotilla.config import load_config
    from flotilla.experiment.run import run_experiment

    path = Path(__file__).resolve().parents[1] / "examples" / "movielens.yaml"
    cfg = load_config(path, ["rounds=2", "cohort=10", "task.max_users=60", "eval.every=2", "output.progress=false"])
    assert (cfg.server.optimizer, cfg.server.lr, cfg.server.beta1, cfg.client.lr) == ("fedadagrad", 0.1, 0.0, 1.0)
    result = run_experiment(cfg, write_run_dir=False)
    last = result.history[-1]
    assert last["round"] == 2 and 0 <= last["auc"] <= 1 and last["upload_bytes_mean"] < last["upload_bytes_dense"]


def test_serve_refuses_sparse_uploads_with_the_reason():
    from flotilla.experiment.serve import server_from_config

    net = {"tls": {"cert": "c.pem", "key": "k.pem"}, "tokens": "t.txt"}
    cfg = validate({"task": SMALL, "rounds": 1, "server": {"embedding_rows": "rowwise"}, "network": net})
    with pytest.raises(ConfigError, match=r"server\.embedding_rows: rowwise is simulated only; the wire carries dense"):
        server_from_config(cfg)


def test_without_the_user_embedding_the_user_table_is_neither_built_nor_uploaded():
    """RF^2's DLRM leaves the user id out (task.model.user_embedding: false)."""
    task = build_task(small_task(model={"user_embedding": False}), 0)
    names = [n for n, _ in task.model.named_parameters()]
    assert "user.weight" not in names and task.dataset.tables == ("item.weight", "genre.weight")
    assert set(task.dataset.embedding_rows(0)) == {"item.weight", "genre.weight"}
    x, _ = task.dataset.fetch(task.dataset.train_indices[0])
    assert task.model(x).shape == (len(x),)
