"""Personalisation by local fine-tuning ("FedAvg + FT"; e.g. Wang et al. 2019, Yu et al. 2020):
the federation trains one global model with any algorithm, and each client personalises it by
a few local SGD steps on its own training data.

Personalised evaluation: every evaluation client fine-tunes the *global* model (from scratch at
each evaluation, so nothing carries over between evaluations), then is evaluated on its own test
data.  The metrics keep the global model's ``loss`` / ``accuracy`` and add the same measures of
the personalised models under ``personal_*``.  Fine-tuning is seeded from (seed, client), so a
resumed run reports the same numbers, and it never touches the training state.

    eval: {personalize: {steps: 20}}          # or epochs: 1; lr / batch_size default to client's
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from pydantic import Field

from flotilla.core.client import ClientSpec, LocalTrainer, LossFn, client_seed
from flotilla.core.evaluate import TestTally
from flotilla.core.flat import FlatModel
from flotilla.core.schema import Section

_STREAM = (1 << 40) + 0xF17E  # the seed stream of fine-tuning: never a training round or version


class PersonalizeConfig(Section):
    steps: int | None = Field(
        None, ge=1, description="local fine-tuning steps per evaluation client (instead of epochs)"
    )
    epochs: int = Field(1, ge=1, description="local fine-tuning epochs (ignored when steps is set)")
    lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: client.lr)")
    batch_size: int | None = Field(None, ge=1, description="fine-tuning batch size (default: client.batch_size)")


def finetune_spec(cfg: PersonalizeConfig, client: ClientSpec) -> ClientSpec:
    """The client's local-SGD settings with the fine-tuning schedule (momentum and weight decay kept)."""
    return replace(
        client,
        epochs=cfg.epochs,
        steps=cfg.steps,
        lr=cfg.lr if cfg.lr is not None else client.lr,
        batch_size=cfg.batch_size if cfg.batch_size is not None else client.batch_size,
    )


class PersonalizedEvaluation:
    """``evaluate(weights) -> {personal_loss, personal_accuracy, personal_client_acc_*}``."""

    def __init__(
        self,
        flat: FlatModel,
        dataset,
        clients: Sequence[int],
        loss_fn: LossFn,
        spec: ClientSpec,
        *,
        seed: int,
        batch_size: int = 1024,
    ):
        self.flat, self.dataset, self.clients, self.loss_fn = flat, dataset, list(clients), loss_fn
        self.trainer = LocalTrainer(flat, loss_fn, spec)
        self.seed, self.batch_size = seed, batch_size
        self._delta = torch.empty(flat.numel)

    def __call__(self, weights: torch.Tensor) -> dict[str, float]:
        tally = TestTally()
        for c in self.clients:
            # Fine-tune from the global weights; the model then holds client c's personalised weights.
            self.trainer.train(self.dataset, c, weights, client_seed(self.seed, _STREAM, c), self._delta)
            tally.add_client(self.flat.model, self.dataset, c, self.loss_fn, self.batch_size)
        self.flat.load(weights)  # leave the shared model as the caller gave it
        return tally.metrics("personal_")
