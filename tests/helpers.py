"""Small synthetic federated data for fast core tests."""

import torch

from flotilla.core.dataset import FederatedDataset


def synthetic_dataset(num_clients=8, per_client=20, dim=5, classes=3, seed=0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    n = num_clients * per_client
    x = torch.randn(2 * n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(1)
    train = [torch.arange(i * per_client, (i + 1) * per_client) for i in range(num_clients)]
    test = [n + torch.arange(i * per_client, (i + 1) * per_client) for i in range(num_clients)]
    return FederatedDataset("synthetic", lambda idx: (x[idx], y[idx]), train, test)
