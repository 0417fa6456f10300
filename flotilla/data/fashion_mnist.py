"""Fashion-MNIST (60,000 train + 10,000 test 28x28 greyscale images, 10 classes).

The raw data comes from the Debian package ``dataset-fashion-mnist`` (four gzip'd IDX files
in ``/usr/share/datasets/fashion-mnist/``); nothing is downloaded.  Another folder holding the
same four files is given by ``root=`` (config key ``task.root``) or the environment variable
``FLOTILLA_FASHION_MNIST``.  The files are parsed once
and cached as uint8/int64 arrays (see :mod:`flotilla.data.cache`).  Fashion-MNIST has no
writer ids, so clients are made with a partition from :mod:`flotilla.data.partition`.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from flotilla.core.dataset import FederatedDataset

from . import partition as part
from .cache import DatasetMissingError, cached

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "FLOTILLA_FASHION_MNIST"
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530  # of the training pixels scaled to [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_VERSION = "1"


def data_root(root: str | Path | None = None) -> Path:
    """The folder of the IDX files: ``root`` if given, else ``$FLOTILLA_FASHION_MNIST``, else the Debian path."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def load_fashion_mnist(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train uint8 [60000,28,28], y_train int64 [60000], x_test uint8 [10000,28,28], y_test int64)``."""
    root = data_root(root)
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found at {root}/ (missing {', '.join(missing)}): install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), which puts the IDX files in "
            f"{DEFAULT_ROOT}/, or set the config key task.root (root= in Python) or the environment variable "
            f"{ROOT_ENV} to a folder holding them."
        )
    arrays = cached(
        "fashion_mnist",
        _VERSION,
        {"root": str(root.resolve())},
        lambda: {key: _read_idx(root / name) for key, name in FILES.items()},
    )
    return (arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"], arrays["y_test"].astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: 2 zero bytes, a dtype code (8 = uint8), ndim, then big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return array.astype(np.int64) if ndim == 1 else array.copy()


@functools.lru_cache(maxsize=2)
def _normalised(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float images [N,1,28,28] normalised once, so a batch is a single gather (kept per process)."""
    x_train, y_train, x_test, y_test = load_fashion_mnist(root)

    def to_float(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).unsqueeze(1).float().div_(255.0)
        return t.sub_(MEAN).div_(STD)

    return to_float(x_train), torch.from_numpy(y_train), to_float(x_test), torch.from_numpy(y_test)


def _fetcher(x: torch.Tensor, y: torch.Tensor):
    def fetch(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[indices], y[indices]

    return fetch


def fashion_mnist_federated(
    partition: str = "iid",
    num_clients: int = 100,
    alpha: float = 0.5,
    sigma: float = 1.0,
    seed: int = 0,
    max_examples_per_client: int | None = None,
    examples_per_client: int | None = None,
    root: str | Path | None = None,
) -> FederatedDataset:
    """Fashion-MNIST split among ``num_clients`` clients.

    ``partition``: ``"iid"``, ``"dirichlet"`` (label skew, ``alpha``) or ``"quantity"``
    (lognormal sizes, ``sigma``).  By default all 60,000 training images are shared out.
    ``examples_per_client=k`` instead draws ``num_clients * k`` images without replacement
    (the "users x images" setup of pfl-research, e.g. 1,000 x 50); with ``"quantity"`` then
    ``k`` is the mean size.  ``max_examples_per_client`` caps each client afterwards (random
    subsample).  Each client also gets a slice of the 10,000 test images drawn from its own
    distribution (test size proportional to its train size; for ``"dirichlet"`` the same
    label mix).  ``fetch`` returns ``x`` float32 [B,1,28,28] normalised and ``y`` int64 [B].
    """
    if partition not in ("iid", "dirichlet", "quantity"):
        raise ValueError(f"partition must be 'iid', 'dirichlet' or 'quantity', got {partition!r}")
    if max_examples_per_client is not None and max_examples_per_client < 1:
        raise ValueError(f"max_examples_per_client must be >= 1, got {max_examples_per_client}")
    x_train, y_train, x_test, y_test = _normalised(str(data_root(root)))
    labels = y_train.numpy()
    rng = np.random.default_rng(seed)
    train = _partition_train(partition, labels, num_clients, alpha, sigma, examples_per_client, rng)
    if max_examples_per_client is not None:
        train = [
            np.sort(rng.choice(p, max_examples_per_client, replace=False)) if len(p) > max_examples_per_client else p
            for p in train
        ]
    skewed = partition == "dirichlet"
    test = part.split_test_like(
        train, len(y_test), rng, train_labels=labels if skewed else None, test_labels=y_test.numpy() if skewed else None
    )
    name = f"fashion_mnist-{partition}"
    return FederatedDataset(
        name,
        _fetcher(x_train, y_train),
        [torch.from_numpy(p) for p in train],
        [torch.from_numpy(p) for p in test],
        client_names=[f"client{i}" for i in range(num_clients)],
        fetch_test=_fetcher(x_test, y_test),
    )


def _partition_train(partition, labels, num_clients, alpha, sigma, examples_per_client, rng) -> list[np.ndarray]:
    if examples_per_client is None:
        if partition == "iid":
            return part.iid(len(labels), num_clients, rng)
        if partition == "quantity":
            return part.quantity_skew(len(labels), num_clients, rng, sigma=sigma)
        return part.dirichlet(labels, num_clients, alpha, rng)
    if examples_per_client < 1:
        raise ValueError(f"examples_per_client must be >= 1, got {examples_per_client}")
    total = num_clients * examples_per_client
    if total > len(labels):
        raise ValueError(
            f"examples_per_client={examples_per_client} x num_clients={num_clients} = {total} "
            f"exceeds the {len(labels)} training images"
        )
    if partition == "dirichlet":
        return part.dirichlet(labels, num_clients, alpha, rng, sizes=[examples_per_client] * num_clients)
    pool = rng.choice(len(labels), total, replace=False)
    parts = (
        part.iid(total, num_clients, rng)
        if partition == "iid"
        else part.quantity_skew(total, num_clients, rng, sigma=sigma)
    )
    return [np.sort(pool[p]) for p in parts]
