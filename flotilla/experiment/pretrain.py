"""``flotilla pretrain CONFIG``: train a task's model centrally on proxy data, write a checkpoint.

    task: {name: mnist-5k}          # any registered task; its clients' training data are pooled
    epochs: 3
    batch_size: 64
    lr: 0.05
    momentum: 0.9
    output: pretrained/mnist5k.safetensors

The checkpoint is a safetensors file keyed by the model's own parameter (and buffer) names, with
the config and the test accuracy in its metadata; ``init: {checkpoint: PATH}`` starts any
experiment from it (flotilla.experiment.init).  Also here: the top eigenvalue of the loss'
Hessian at a model's weights, by power iteration on Hessian-vector products (Nguyen et al.,
"Where to Begin?", compare it at a pre-trained and at a random initialisation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError

from flotilla.core.schema import Section
from flotilla.tasks import TaskConfig, build_task


class PretrainConfig(Section):
    """A ``flotilla pretrain`` file: central training on a (proxy) task's pooled data."""

    task: TaskConfig
    seed: int = Field(0, ge=0, description="model initialisation and shuffling")
    epochs: int = Field(1, ge=1, description="passes over the pooled training data")
    batch_size: int = Field(64, ge=1, description="batch size")
    lr: float = Field(0.05, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    max_examples: int | None = Field(None, ge=1, description="train on a seeded subset of this many examples")
    max_test_examples: int | None = Field(
        None, ge=1, description="report the test accuracy on a seeded subset of this many test examples"
    )
    output: str = Field(..., description="checkpoint file to write (.safetensors)")


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    from flotilla.config import ConfigError, apply_overrides, read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pretrain file holds a mapping (task, epochs, output...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for i, p in enumerate(err["loc"]) if not (i == 1 and err["loc"][0] == "task")]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {'.'.join(loc) or 'config'}: {msg}") from None


def _pooled(indices: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([i for i in indices if len(i)]) if indices else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def central_accuracy(model, dataset, indices: torch.Tensor, fetch, batch_size: int = 1024) -> float:
    model.eval()
    right = 0
    for s in range(0, len(indices), batch_size):
        x, y = fetch(indices[s : s + batch_size])
        right += int((model(x).argmax(-1) == y).sum())
    return right / max(len(indices), 1)


def pretrain(cfg: PretrainConfig, echo=print) -> dict[str, Any]:
    """Train ``cfg.task``'s model on all its clients' training examples; write the checkpoint atomically."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg.task, cfg.seed)
    data, model = task.dataset, task.model
    train = _pooled(data.train_indices)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        train = train[torch.randperm(len(train), generator=g)[: cfg.max_examples]]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    torch.manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=g)]
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            x, y = data.fetch(order[s : s + cfg.batch_size])
            opt.zero_grad()
            loss = task.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
        echo(f"epoch {epoch + 1}/{cfg.epochs}: train loss {total / max(len(order), 1):.4f}")
    test = _pooled(data.test_indices)
    if cfg.max_test_examples is not None and cfg.max_test_examples < len(test):
        test = test[
            torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_test_examples]
        ]
    acc = central_accuracy(model, data, test, data.fetch_test) if len(test) else None
    meta = {"task": json.dumps(cfg.task.model_dump(mode="json")), "epochs": str(cfg.epochs)}
    if acc is not None:
        meta["test_accuracy"] = f"{acc:.6f}"
        echo(f"test accuracy {acc:.4f} on {len(test)} examples")
    write_checkpoint(model, cfg.output, meta)
    echo(f"checkpoint: {cfg.output}")
    return {"test_accuracy": acc, "checkpoint": cfg.output, "examples": len(train)}


def write_checkpoint(model, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as safetensors (temp file + rename: never half-written)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def top_hessian_eigenvalue(model, loss_fn, batches, iters: int = 20, seed: int = 0, tol: float = 1e-4) -> float:
    """The largest-magnitude eigenvalue of the Hessian of the mean loss over ``batches`` (a list of
    ``(x, y)``) at the model's weights: power iteration, each step one Hessian-vector product
    (double backward, torch.autograd) summed over the batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    n = sum(len(y) for _, y in batches)
    model.eval()
    eig = 0.0
    for _ in range(iters):
        hv = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = loss_fn(model(x), y) * (len(y) / n)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((gr * u).sum() for gr, u in zip(grads, v, strict=True))
            for acc, h in zip(hv, torch.autograd.grad(dot, params), strict=True):
                acc.add_(h)
        new = float(sum((h * u).sum() for h, u in zip(hv, v, strict=True)))  # Rayleigh quotient v.Hv
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [h / norm for h in hv]
        if abs(new - eig) <= tol * max(abs(new), 1e-12):
            return new
        eig = new
    return eig
