"""Local training of one client on the one shared model, in place.

The simulator, the Ray backend and the network client all call :class:`LocalTrainer.train`.
The model's weights are loaded from the global flat vector, trained with plain (optionally
momentum / weight-decay) SGD applied to the flat parameter vector in one fused step, and the
delta ``w_end - w_start`` is written into a caller-owned buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import seed_device, to_device
from flotilla.core.flat import FlatModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClientSpec:
    epochs: int = 1
    steps: int | None = None  # if set, exactly this many local steps instead of epochs
    batch_size: int = 10
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    # (fraction, min, max): that share of clients trains a uniform min..max epochs (system heterogeneity)
    heterogeneous_epochs: tuple[float, int, int] | None = None


@dataclass
class ClientResult:
    client: int
    num_examples: int  # examples in the client's training set (the FedAvg weight)
    examples_seen: int  # examples processed, counting repeats over epochs
    steps: int
    loss: float  # mean training loss over the local steps


def local_epochs(spec: ClientSpec, seed: int) -> int:
    """The epochs one client trains: ``spec.epochs``, or with heterogeneous epochs a draw from its seed."""
    if spec.heterogeneous_epochs is None:
        return spec.epochs
    fraction, low, high = spec.heterogeneous_epochs
    rng = np.random.default_rng([seed, 0xE90C])
    return int(rng.integers(low, high + 1)) if rng.random() < fraction else spec.epochs


def client_seed(seed: int, round_or_version: int, client: int) -> int:
    """A per-(run, round, client) seed: training is reproducible and resumable at any round."""
    return int(np.random.SeedSequence([seed, round_or_version, client]).generate_state(1, np.uint64)[0] >> 1)


class LocalTrainer:
    """Trains ``flat``'s model for one client at a time; holds no per-client state."""

    def __init__(self, flat: FlatModel, loss_fn: LossFn, spec: ClientSpec):
        self.flat = flat
        self.loss_fn = loss_fn
        self.spec = spec
        self._momentum = torch.zeros(flat.numel, device=flat.device) if spec.momentum > 0 else None

    def train(
        self,
        dataset: FederatedDataset,
        client: int,
        start: torch.Tensor,
        seed: int,
        delta_out: torch.Tensor,
    ) -> ClientResult:
        """Train from global weights ``start``; write ``w_end - start`` into ``delta_out``."""
        flat, spec, model = self.flat, self.spec, self.flat.model
        flat.load(start)
        if self._momentum is not None:
            self._momentum.zero_()
        generator = torch.Generator().manual_seed(seed)
        # Dropout and other in-model randomness.  Only the CPU generator: torch.manual_seed also
        # seeds every accelerator backend and records a stack trace, ~2 ms per client.
        torch.default_generator.manual_seed(seed)
        device = flat.device
        seed_device(seed, device)
        model.train()
        steps = seen = 0
        loss_sum = torch.zeros((), device=device)
        # The shuffle stays on the CPU generator: the same batches on every device.
        for x, y in dataset.train_batches(client, spec.batch_size, generator, local_epochs(spec, seed), spec.steps):
            x, y = to_device((x, y), device)
            flat.grad.zero_()
            loss = self.loss_fn(model(x), y)
            loss.backward()
            self._sgd_step()
            loss_sum += loss.detach()
            steps += 1
            seen += y.shape[0]
        flat.delta_into(start, delta_out)
        return ClientResult(client, dataset.num_train(client), seen, steps, float(loss_sum) / max(steps, 1))

    def _sgd_step(self) -> None:
        # No no_grad() needed (its context manager costs ~0.1 ms a step): the flat vectors are
        # plain tensors, not parameters, so autograd records nothing here.
        w, g, spec = self.flat.flat, self.flat.grad, self.spec
        if spec.weight_decay:
            g.add_(w, alpha=spec.weight_decay)
        if self._momentum is not None:
            g = self._momentum.mul_(spec.momentum).add_(g)
        w.add_(g, alpha=-spec.lr)
