"""The run directory: resolved config, metrics.jsonl, training-state checkpoint, final model, plot.

Layout::

    RUN_DIR/config.yaml          resolved experiment config (what `--resume` rebuilds from)
    RUN_DIR/metrics.jsonl        one JSON object per round
    RUN_DIR/state.safetensors    latest full training state (global weights, server optimizer, round)
    RUN_DIR/model.safetensors    final model, keyed by the model's own parameter names
    RUN_DIR/plot.png             accuracy and loss against rounds
    RUN_DIR/tensorboard/         event files, if enabled

Every file is written atomically (temp file + rename) so a run killed at any moment can resume;
a temp file left by a kill is removed on the next save and on resume.  The metrics file is
appended to, so a kill can leave a partial last line: it is dropped on resume.  Metrics are
strict JSON: a non-finite number (an infinite epsilon) is written as null.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TMP = ".tmp"
FILES = ("config.yaml", "metrics.jsonl", "state.safetensors", "model.safetensors")  # written atomically
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' save_file writes one, then renames it


class DamagedRunError(ValueError):
    """A run file cannot be read back (truncated or corrupted); the message names it."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + TMP)
    write(tmp)
    os.replace(tmp, path)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no inf/nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


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
        try:
            config = yaml.safe_load(f.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise DamagedRunError(f"{f}: damaged, not the YAML config a run writes ({type(e).__name__})") from None
        if not isinstance(config, dict):
            raise DamagedRunError(f"{f}: damaged, not the YAML config a run writes")
        return config

    # -- metrics ------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(_json_line(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records; a partial last line (a kill mid-append) is left out, damage elsewhere is an error."""
        if not self.metrics_file.exists():
            return []
        text = self.metrics_file.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # no newline after it: the append was cut short
                    break
                raise DamagedRunError(f"{self.metrics_file}: line {i + 1} is not a JSON record") from None
        return records

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Drop metric lines after ``last_round`` (written after the last checkpoint) and a partial last line."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        _atomic_write(self.metrics_file, lambda p: p.write_text("".join(_json_line(r) for r in kept)))
        return kept

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / "state.safetensors"

    def save_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.remove_temp_files()
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        _atomic_write(self.state_file, lambda p: save_file(tensors, str(p), metadata={"flotilla": json.dumps(meta)}))

    def has_state(self) -> bool:
        return self.state_file.exists()

    def load_state(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.state_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise DamagedRunError(
                f"{self.state_file}: the checkpoint is damaged (truncated or corrupted: {e}); "
                f"this run cannot be resumed from it"
            ) from None

    def state_meta(self) -> dict[str, Any]:
        """The metadata saved with the checkpoint (``{"round": ...}``)."""
        try:
            with safe_open(str(self.state_file), "pt") as f:
                return json.loads((f.metadata() or {}).get("flotilla", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise DamagedRunError(
                f"{self.state_file}: the checkpoint is damaged (truncated or corrupted: {e}); "
                f"this run cannot be resumed from it"
            ) from None

    def remove_temp_files(self) -> list[Path]:
        """Delete the temp files of this directory's own writes that a kill left behind (one process
        writes a run directory, and every write renames its temp file, so any found here is stale):
        ours (``state.safetensors.tmp``) and safetensors' own (``.tmpXXXXXX``, renamed onto ours)."""
        stale = [p for name in FILES if (p := self.path / (name + TMP)).is_file()]
        if self.path.is_dir():
            stale += [p for p in self.path.glob(".tmp*") if SAFETENSORS_TMP.fullmatch(p.name) and p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save_model(self, named: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous().clone() for k, v in named.items()}
        _atomic_write(self.path / "model.safetensors", lambda p: save_file(tensors, str(p)))


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(finite_json(record), allow_nan=False) + "\n"
