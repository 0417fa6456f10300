"""Train K clients of a cohort at once on stacked weights (``client.vectorize: K``).

A small model leaves a GPU idle when clients train one after another: each local step is a
handful of tiny kernels.  Here the K clients' weights are the rows of one ``K x numel`` matrix
and one local step of all of them is one call of ``torch.func.vmap`` over
``grad(functional_call(model, row, batch))``: the same kernels, K times wider.

Each client keeps what the sequential :class:`~flotilla.core.client.LocalTrainer` gives it:

* its own batches, from ``dataset.train_batches`` with a CPU generator seeded by its own
  ``client_seed`` (the same shuffle, the same batches, the same step count);
* its own SGD (momentum, weight decay) on its own row, the same ops in the same order;
* a client that has run out of steps is masked: it is left out of later steps, so its row stops
  changing.  Clients whose batch at a step is smaller (the last batch of a pass) train in their
  own vmap call at that step, so every loss is the mean over the client's real examples.

The deltas equal the sequential path's up to float rounding (a batched convolution sums in
another order; tests/test_vectorize.py states the tolerance).  In-model randomness (dropout)
is drawn per client by vmap (``randomness="different"``) from one seed per group: reproducible,
but not the sequential path's masks.  Models whose forward pass changes state (BatchNorm's
running statistics) or that vmap cannot batch (nn.LSTM / GRU / RNN) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flotilla.core.client import ClientResult, ClientSpec, LossFn, local_epochs
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import seed_device, to_device
from flotilla.core.flat import FlatModel

# Layers refused: BatchNorm updates running statistics in place during training (shared by all
# clients in the sequential path, impossible to batch); vmap has no batching rule for fused RNNs.
_UNBATCHABLE = (nn.modules.batchnorm._BatchNorm, nn.RNNBase)


def vectorize_refusal(model: nn.Module) -> str | None:
    """Why ``client.vectorize`` cannot train ``model`` (one line), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return (
                f"client.vectorize: the model's layer {name or 'model'} ({type(m).__name__}) updates running "
                "statistics while training, which stacked clients cannot share; set client.vectorize: 1"
            )
        if isinstance(m, nn.RNNBase):
            return (
                f"client.vectorize: the model's layer {name or 'model'} ({type(m).__name__}) is a fused recurrent "
                "kernel that torch.func.vmap cannot batch; set client.vectorize: 1"
            )
    return None


class VectorizedTrainer:
    """Local SGD of up to ``k`` clients at once on ``flat``'s model (its parameters are not touched)."""

    def __init__(self, flat: FlatModel, loss_fn: LossFn, spec: ClientSpec, k: int):
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"client.vectorize: must be an integer >= 2 to stack clients, got {k!r}")
        why = vectorize_refusal(flat.model)
        if why:
            raise ValueError(why)
        from torch.func import functional_call, grad_and_value, vmap

        self.flat = flat
        self.loss_fn = loss_fn
        self.spec = spec
        self.k = k
        model, names, shapes = flat.model, flat.names, flat.shapes
        sizes = [p.numel() for p in flat.params]

        def loss_of(row: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            params, offset = {}, 0
            for name, shape, n in zip(names, shapes, sizes):
                params[name] = row[offset : offset + n].view(shape)
                offset += n
            return loss_fn(functional_call(model, params, (x,)), y)

        # One local step's gradient (and loss) for every row, each with its own batch.
        self._grads = vmap(grad_and_value(loss_of), randomness="different")

    def train(
        self,
        dataset: FederatedDataset,
        clients: Sequence[int],
        start: torch.Tensor,
        seeds: Sequence[int],
        deltas_out: torch.Tensor,
    ) -> list[ClientResult]:
        """Train ``clients`` (at most ``k``) from ``start``; row i of ``deltas_out`` gets client i's ``w_end - start``."""
        if not 1 <= len(clients) <= self.k or len(seeds) != len(clients):
            raise ValueError(f"train: 1..{self.k} clients with one seed each, got {len(clients)} and {len(seeds)}")
        flat, spec = self.flat, self.spec
        device, n = flat.device, len(clients)
        w0 = start.to(device)
        weights = w0.expand(n, -1).clone()  # one row per client
        momentum = torch.zeros_like(weights) if spec.momentum > 0 else None
        batches = [
            dataset.train_batches(
                c, spec.batch_size, torch.Generator().manual_seed(s), local_epochs(spec, s), spec.steps
            )
            for c, s in zip(clients, seeds)
        ]
        # Dropout etc.: one seed for the group (vmap draws each row's own randomness from it).
        torch.default_generator.manual_seed(seeds[0])
        seed_device(seeds[0], device)
        flat.model.train()
        loss_sum = torch.zeros(n, device=device)
        steps, seen = [0] * n, [0] * n
        active = list(range(n))
        while active:
            # This step's batch for every client still training; a client out of batches is done (masked).
            step = {}
            for i in active:
                b = next(batches[i], None)
                if b is not None:
                    step[i] = b
            active = list(step)
            # Clients with equally shaped batches train in one vmap call.
            groups: dict[tuple, list[int]] = {}
            for i, (x, y) in step.items():
                groups.setdefault((tuple(x.shape), tuple(y.shape)), []).append(i)
            for rows in groups.values():
                self._step(weights, momentum, rows, [step[i] for i in rows], loss_sum)
                for i in rows:
                    steps[i] += 1
                    seen[i] += step[i][1].shape[0]
        torch.sub(weights, w0, out=weights)
        deltas_out[:n].copy_(weights)
        losses = loss_sum.tolist()
        return [
            ClientResult(c, dataset.num_train(c), seen[i], steps[i], losses[i] / max(steps[i], 1))
            for i, c in enumerate(clients)
        ]

    def _step(self, weights, momentum, rows: list[int], batch: list, loss_sum: torch.Tensor) -> None:
        """One local SGD step of ``rows``; the same update, op by op, as LocalTrainer._sgd_step."""
        spec = self.spec
        whole = len(rows) == weights.shape[0]
        index = None if whole else torch.tensor(rows, device=weights.device)
        w = weights if whole else weights.index_select(0, index)
        # Stacked where the batches were made (the CPU), then one copy to the device.
        x, y = to_device((torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])), weights.device)
        g, loss = self._grads(w, x, y)
        if spec.weight_decay:
            g.add_(w, alpha=spec.weight_decay)
        if momentum is not None:
            m = momentum if whole else momentum.index_select(0, index)
            g = m.mul_(spec.momentum).add_(g)
            if not whole:
                momentum.index_copy_(0, index, m)
        w.add_(g, alpha=-spec.lr)
        if not whole:
            weights.index_copy_(0, index, w)
            loss_sum.index_add_(0, index, loss)
        else:
            loss_sum.add_(loss)
