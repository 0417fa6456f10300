import numpy as np
import pytest

from flotilla.data import partition as P


def _assert_exactly_once(parts, n):
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


@pytest.fixture
def labels():
    # 10 balanced classes, shuffled, like a small image data set.
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 500))


def test_iid_assigns_every_example_once():
    parts = P.iid(1003, 10, np.random.default_rng(0))
    _assert_exactly_once(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_quantity_skew_assigns_every_example_once_with_skewed_sizes():
    parts = P.quantity_skew(5000, 50, np.random.default_rng(0), sigma=1.0)
    _assert_exactly_once(parts, 5000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1
    assert sizes.max() > 4 * sizes.min()


def test_quantity_skew_every_client_gets_one_even_when_tight():
    parts = P.quantity_skew(60, 50, np.random.default_rng(1), sigma=3.0)
    _assert_exactly_once(parts, 60)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_assigns_every_example_once(labels):
    parts = P.dirichlet(labels, 20, 0.1, np.random.default_rng(0))
    _assert_exactly_once(parts, len(labels))
    assert min(len(p) for p in parts) == len(labels) // 20


def test_dirichlet_with_sizes_uses_each_example_at_most_once(labels):
    parts = P.dirichlet(labels, 40, 0.3, np.random.default_rng(0), sizes=[50] * 40)
    everything = np.concatenate(parts)
    assert [len(p) for p in parts] == [50] * 40
    assert len(np.unique(everything)) == len(everything) == 2000


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    def skew(alpha):
        parts = P.dirichlet(labels, 50, alpha, np.random.default_rng(0))
        return P.label_distance(parts, labels)

    s100, s1, s01 = skew(100.0), skew(1.0), skew(0.1)
    assert s100 < 0.25 < s1 < s01  # ~0.14 at alpha=100 is multinomial noise of 100 draws
    assert s01 > 0.5


def test_partitions_are_deterministic_given_the_seed(labels):
    a = P.dirichlet(labels, 10, 0.5, np.random.default_rng(7))
    b = P.dirichlet(labels, 10, 0.5, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_split_test_like_follows_client_label_mix(labels):
    rng = np.random.default_rng(0)
    train = P.dirichlet(labels, 20, 0.1, rng)
    test_labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 100))
    test = P.split_test_like(train, len(test_labels), rng, train_labels=labels, test_labels=test_labels)
    _assert_exactly_once(test, len(test_labels))
    assert P.label_distance(test, test_labels) > 0.5  # as skewed as the train split
    # Each client's dominant test class is its dominant train class.
    agree = [
        np.bincount(labels[tr], minlength=10).argmax() == np.bincount(test_labels[te], minlength=10).argmax()
        for tr, te in zip(train, test)
    ]
    assert np.mean(agree) >= 0.9


def test_split_test_like_follows_sizes():
    rng = np.random.default_rng(0)
    train = P.quantity_skew(10000, 10, rng)
    test = P.split_test_like(train, 1000, rng)
    _assert_exactly_once(test, 1000)
    for tr, te in zip(train, test):
        assert abs(len(te) - len(tr) / 10) <= 1


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda rng: P.iid(5, 10, rng), "num_clients"),
        (lambda rng: P.iid(5, 0, rng), "num_clients"),
        (lambda rng: P.quantity_skew(5, 10, rng), "num_clients"),
        (lambda rng: P.quantity_skew(100, 10, rng, sigma=-1), "sigma"),
        (lambda rng: P.quantity_skew(100, 10, rng, min_size=20), "min_size"),
        (lambda rng: P.dirichlet(np.zeros(100, dtype=int), 10, 0.0, rng), "alpha"),
        (lambda rng: P.dirichlet(np.zeros(100, dtype=int), 10, -1.0, rng), "alpha"),
        (lambda rng: P.dirichlet(np.zeros(5, dtype=int), 10, 0.5, rng), "num_clients"),
        (lambda rng: P.dirichlet(np.zeros(100, dtype=int), 10, 0.5, rng, min_size=11), "min_size"),
        (lambda rng: P.dirichlet(np.zeros(100, dtype=int), 2, 0.5, rng, sizes=[60, 60]), "sizes"),
        (lambda rng: P.dirichlet(np.zeros(100), 2, 0.5, rng), "labels"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, word):
    with pytest.raises(ValueError, match=word):
        call(np.random.default_rng(0))
