"""Start an experiment from a checkpoint (``init: {checkpoint: PATH}``) instead of a random model.

The checkpoint is a safetensors file of tensors keyed by the module's own parameter names (what
``flotilla pretrain`` writes, and a run's ``model.safetensors``).  It is loaded into the task's
model where the experiment builds it, once, before any runtime copies the model: the in-process
simulator, worker processes, the fleet and Ray (the driver's model is the first global model)
and ``flotilla serve`` (the server's initial model) all start from it.

Full loading needs every parameter of the model, with the same shape; a mismatch is one error
naming the tensors.  ``partial: true`` loads the tensors whose name and shape match and keeps the
rest as initialised, and says which.  Nothing is written into the model until the check passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from flotilla.core.schema import Section


class InitConfig(Section):
    """Initial global model from a checkpoint (flotilla pretrain, or a run's model.safetensors)."""

    checkpoint: str = Field(..., description="safetensors file of the initial weights, keyed by parameter name")
    partial: bool = Field(
        False, description="load only the tensors whose name and shape match the model; report the rest"
    )


class InitError(ValueError):
    """The checkpoint cannot initialise this model; the message names the file and the tensors."""


@dataclass
class InitReport:
    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # model tensors left as initialised (partial)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    mismatched: list[str] = field(default_factory=list)  # "name: model [..] vs checkpoint [..]"

    def summary(self) -> str:
        line = f"init: loaded {len(self.loaded)} tensors from {self.checkpoint}"
        if self.kept:
            line += f"; kept as initialised: {', '.join(self.kept)}"
        if self.mismatched:
            line += f" (shape differs: {'; '.join(self.mismatched)})"
        if self.unused:
            line += f"; unused from the checkpoint: {', '.join(self.unused)}"
        return line


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable file is one InitError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InitError(f"init.checkpoint: {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InitError(f"init.checkpoint: {path} is not a readable safetensors file ({e})") from None


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def load_init(model: nn.Module, checkpoint: str | Path, partial: bool = False) -> InitReport:
    """Copy the checkpoint's tensors into ``model``'s parameters and buffers (checked first)."""
    tensors = read_checkpoint(checkpoint)
    own = dict(model.state_dict())
    report = InitReport(str(checkpoint))
    matched = {}
    for name, target in own.items():
        src = tensors.get(name)
        if src is None:
            report.kept.append(name)
        elif src.shape != target.shape:
            report.kept.append(name)
            report.mismatched.append(f"{name}: model {_shape(target)} vs checkpoint {_shape(src)}")
        else:
            matched[name] = src
    report.unused = sorted(set(tensors) - set(own))
    report.loaded = list(matched)
    if not partial and (report.kept or report.unused):
        problems = report.mismatched + [f"{n}: missing from the checkpoint" for n in report.kept if n not in tensors]
        problems += [f"{n}: not in the model" for n in report.unused]
        raise InitError(
            f"init.checkpoint: {checkpoint} does not fit the task's model: {'; '.join(problems)} "
            f"(set init.partial: true to load only the matching tensors)"
        )
    if not matched:
        raise InitError(f"init.checkpoint: {checkpoint} has no tensor matching the model by name and shape")
    with torch.no_grad():
        for name, src in matched.items():
            own[name].copy_(src.to(own[name].dtype))
    return report


def apply_init(cfg, model: nn.Module) -> InitReport | None:
    """Load ``cfg.init`` into ``model`` (nothing without an ``init:`` section); print what was loaded."""
    init = getattr(cfg, "init", None)
    if init is None:
        return None
    report = load_init(model, init.checkpoint, init.partial)
    import sys

    print(report.summary(), file=sys.stderr)
    return report
