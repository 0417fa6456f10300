"""Central evaluation on clients' held-out data: overall loss/accuracy and the per-client spread."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flotilla.core.client import LossFn
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel


@torch.no_grad()
def evaluate(
    flat: FlatModel,
    weights: torch.Tensor,
    dataset: FederatedDataset,
    clients: Sequence[int],
    loss_fn: LossFn,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Loss and accuracy pooled over all test examples of ``clients``, plus per-client accuracy
    mean and 10th/50th/90th percentiles (clients with no test data are skipped)."""
    flat.load(weights)
    model = flat.model
    model.eval()
    total_loss = 0.0
    total_correct = 0
    total = 0
    per_client = []
    for c in clients:
        correct = n = 0
        for x, y in dataset.test_batches(c, batch_size):
            out = model(x)
            total_loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=-1) == y).sum())
            n += len(y)
        if n:
            per_client.append(correct / n)
            total_correct += correct
            total += n
    if total == 0:
        raise ValueError("evaluation clients have no test examples")
    acc = np.asarray(per_client)
    return {
        "loss": total_loss / total,
        "accuracy": total_correct / total,
        "client_acc_mean": float(acc.mean()),
        "client_acc_p10": float(np.percentile(acc, 10)),
        "client_acc_p50": float(np.percentile(acc, 50)),
        "client_acc_p90": float(np.percentile(acc, 90)),
        "eval_examples": total,
    }


def eval_clients(dataset: FederatedDataset, max_clients: int | None, seed: int) -> list[int]:
    """All clients with test data, or a fixed seeded subset of them."""
    import numpy as np

    have_test = [c for c in range(dataset.num_clients) if dataset.num_test(c) > 0]
    if max_clients is not None and max_clients < len(have_test):
        rng = np.random.default_rng([seed, 0xE7A1])
        have_test = sorted(rng.choice(have_test, size=max_clients, replace=False).tolist())
    return have_test
