"""The run directory: resolved config, metrics.jsonl, training-state checkpoint, final model, plot.

Layout::

    RUN_DIR/config.yaml          resolved experiment config (what `--resume` rebuilds from)
    RUN_DIR/metrics.jsonl        one JSON object per round
    RUN_DIR/state.safetensors    latest full training state (global weights, server optimizer, round)
    RUN_DIR/model.safetensors    final model, keyed by the model's own parameter names
    RUN_DIR/plot.png             accuracy and loss against rounds
    RUN_DIR/tensorboard/         event files, if enabled

Every file is written atomically (temp file + rename) so a run killed at any moment can resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- config -----------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.yaml", lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))

    def read_config(self) -> dict[str, Any]:
        f = self.path / "config.yaml"
        if not f.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory: no config.yaml")
        return yaml.safe_load(f.read_text())

    # -- metrics ------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Drop metric lines after ``last_round`` (written after the last checkpoint)."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(self.metrics_file, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        return kept

    # -- checkpoints ----------------------------------------------------------------------
    def save_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        _atomic_write(self.path / "state.safetensors",
                      lambda p: save_file(tensors, str(p), metadata={"flotilla": json.dumps(meta)}))

    def has_state(self) -> bool:
        return (self.path / "state.safetensors").exists()

    def load_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "state.safetensors"))

    def save_model(self, named: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous().clone() for k, v in named.items()}
        _atomic_write(self.path / "model.safetensors", lambda p: save_file(tensors, str(p)))
