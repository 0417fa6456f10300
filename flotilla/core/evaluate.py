"""Central evaluation on clients' held-out data: overall loss/accuracy and the per-client spread."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flotilla.core.client import LossFn
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import to_device
from flotilla.core.flat import FlatModel


class TestTally:
    """Pools test loss and accuracy over clients, and keeps each client's accuracy for the spread."""

    def __init__(self):
        self.loss = 0.0
        self.correct = 0
        self.total = 0
        self.per_client: list[float] = []

    @torch.no_grad()
    def add_client(self, model, dataset: FederatedDataset, client: int, loss_fn: LossFn, batch_size: int) -> None:
        """Score ``model`` (as it is now) on ``client``'s test data; a client without test data is skipped."""
        model.eval()
        device = next(model.parameters()).device  # the model's device (FlatModel's ``device``)
        correct = n = 0
        for x, y in dataset.test_batches(client, batch_size):
            x, y = to_device((x, y), device)
            out = model(x)
            self.loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=-1) == y).sum())
            n += len(y)
        if n:
            self.per_client.append(correct / n)
            self.correct += correct
            self.total += n

    def metrics(self, prefix: str = "") -> dict[str, float]:
        if self.total == 0:
            raise ValueError("evaluation clients have no test examples")
        acc = np.asarray(self.per_client)
        return {
            f"{prefix}loss": self.loss / self.total,
            f"{prefix}accuracy": self.correct / self.total,
            f"{prefix}client_acc_mean": float(acc.mean()),
            f"{prefix}client_acc_p10": float(np.percentile(acc, 10)),
            f"{prefix}client_acc_p50": float(np.percentile(acc, 50)),
            f"{prefix}client_acc_p90": float(np.percentile(acc, 90)),
        }


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
    tally = TestTally()
    for c in clients:
        tally.add_client(flat.model, dataset, c, loss_fn, batch_size)
    return {**tally.metrics(), "eval_examples": tally.total}


def eval_clients(dataset: FederatedDataset, max_clients: int | None, seed: int) -> list[int]:
    """All clients with test data, or a fixed seeded subset of them."""
    import numpy as np

    have_test = [c for c in range(dataset.num_clients) if dataset.num_test(c) > 0]
    if max_clients is not None and max_clients < len(have_test):
        rng = np.random.default_rng([seed, 0xE7A1])
        have_test = sorted(rng.choice(have_test, size=max_clients, replace=False).tolist())
    return have_test


@torch.no_grad()
def client_correct(
    flat: FlatModel,
    weights: torch.Tensor,
    dataset: FederatedDataset,
    clients: Sequence[int],
    batch_size: int = 1024,
    loss_fn: LossFn | None = None,
) -> tuple[list[torch.Tensor], float]:
    """Per client, a bool tensor: is each of its test examples classified right by ``weights``?
    And the summed loss over all those examples (0.0 without ``loss_fn``).

    The raw material of per-client metrics (a client's accuracy is its mean); flotilla.tune's
    noisy evaluation resamples and re-assigns these examples without another forward pass."""
    flat.load(weights)
    model = flat.model
    model.eval()
    out, loss = [], 0.0
    for c in clients:
        parts = []
        for x, y in dataset.test_batches(c, batch_size):
            x, y = to_device((x, y), flat.device)  # the model may be on a GPU (device: cuda)
            logits = model(x)
            parts.append((logits.argmax(dim=-1) == y).cpu())
            if loss_fn is not None:
                loss += float(loss_fn(logits, y)) * len(y)
        out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool))
    return out, loss
