"""Where training runs: ``device: cpu | cuda | auto``.

The device holds what a client trains with (the model, its flat weight and gradient buffers, the
momentum buffer, each batch).  The server side (global weights, aggregation, server optimizer,
privacy noise, secure aggregation) stays on the CPU, so checkpoints are device-independent and
every component above the core keeps working on plain CPU vectors.  Per client that costs one
copy of the weights to the device and one copy of the trained weights back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DEVICES = ("cpu", "cuda", "auto")

CUDA_MISSING = (
    "device: cuda was asked for but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
    "use device: cpu or auto"
)

# Worker processes (workers: N) are forked after the parent has built its model.
CUDA_FORK = (
    "worker processes are forked and CUDA cannot run in a forked process; with device: cuda use "
    "workers: 1 (client.vectorize keeps one GPU busy) or runtime: ray with gpus_per_actor"
)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (cuda if torch sees a GPU, else cpu) -> a ``torch.device``.

    ``cuda`` without a GPU raises ``ValueError`` with one line saying so.  A ``torch.device`` (or
    ``cuda:1``) is accepted as is, so components can pass a resolved device along.
    """
    if name is None:
        return torch.device("cpu")
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(CUDA_MISSING)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {name!r}")
    return device


def check_device(name: str) -> str:
    """Validate a config value at config time (the pydantic validator calls this); returns it unchanged."""
    if name not in DEVICES:
        raise ValueError(f"must be one of {', '.join(DEVICES)}, got {name!r}")
    resolve_device(name)
    return name


def is_cpu(device: torch.device | str | None) -> bool:
    return device is None or torch.device(device).type == "cpu"


def to_device(batch, device: torch.device):
    """Move a batch (a tensor, or a tuple / list / dict of them) to ``device``; CPU batches stay as they are."""
    if is_cpu(device):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every tensor on the CPU (checkpoints are device-independent)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def seed_device(seed: int, device: torch.device) -> None:
    """Seed in-model randomness (dropout) on an accelerator; the CPU generator is seeded by the caller."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
