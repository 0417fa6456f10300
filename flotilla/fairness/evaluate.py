"""Per-tier test metrics: the run's evaluation split by device tier.

For each tier, the task's metrics pooled over the evaluation clients of that tier, recorded as
``tier_<tier>_<metric>`` (``tier_low_accuracy``, ``tier_high_loss``; movielens adds ``auc`` and
``ap``).  A task with its own evaluation (``Task.evaluate``) is called once per tier's clients;
otherwise flotilla.core.evaluate's loss / accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flotilla.core.evaluate import TestTally
from flotilla.fairness.tiers import TIERS

METRICS = ("loss", "accuracy", "auc", "ap")


class TierEvaluation:
    def __init__(
        self,
        flat,
        dataset,
        clients: Sequence[int],
        loss_fn,
        tier: np.ndarray,
        batch_size: int = 1024,
        task_evaluate: Callable | None = None,
    ):
        self.flat, self.dataset, self.loss_fn = flat, dataset, loss_fn
        self.batch_size = batch_size
        self.task_evaluate = task_evaluate
        tier = np.asarray(tier)
        self.groups = {n: [c for c in clients if tier[c] == t] for t, n in enumerate(TIERS)}

    @torch.no_grad()
    def __call__(self, weights: torch.Tensor) -> dict[str, float]:
        self.flat.load(weights)
        model = self.flat.model
        out: dict[str, float] = {}
        for name, clients in self.groups.items():
            if not clients:
                continue
            if self.task_evaluate is not None:
                rec = self.task_evaluate(model, self.dataset, clients, self.batch_size)
            else:
                tally = TestTally()
                for c in clients:
                    tally.add_client(model, self.dataset, c, self.loss_fn, self.batch_size)
                if tally.total == 0:
                    continue
                rec = tally.metrics()
            out.update({f"tier_{name}_{k}": rec[k] for k in METRICS if k in rec})
        return out
