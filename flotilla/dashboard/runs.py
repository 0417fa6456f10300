"""Run directories under a folder, read while they are written.

A run directory is any folder holding ``config.yaml`` or ``metrics.jsonl`` (see
:mod:`flotilla.runs.rundir`; a server's state directory is one).  Metrics
are appended one JSON line per round; a reader keeps a byte offset per run and reads only what is
new, holding back a last line without its newline (the writer is mid-append).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# a run whose files changed this recently counts as running (a finished run writes model.safetensors)
RUNNING_WITHIN_S = 30.0


@dataclass
class WatchedRun:
    name: str
    path: Path
    offset: int = 0  # bytes of metrics.jsonl already read
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    error: str | None = None  # a damaged line or config, shown instead of hiding the run

    def read_new(self) -> list[dict[str, Any]]:
        """Records appended since the last call (complete lines only)."""
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        size = f.stat().st_size
        if size < self.offset:  # truncated (a resume drops lines after its checkpoint): read again
            self.offset, self.records = 0, []
        if size == self.offset:
            return []
        with open(f, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                self.error = f"{f}: a line that is not JSON was skipped"
        self.records.extend(new)
        return new

    def read_config(self) -> None:
        if not (self.path / "config.yaml").exists():
            return
        try:
            self.config = yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            self.error = f"{self.path / 'config.yaml'}: unreadable ({type(e).__name__})"

    def status(self) -> str:
        if (self.path / "model.safetensors").exists():
            return "finished"
        newest = max((p.stat().st_mtime for p in self.path.iterdir() if p.is_file()), default=0.0)
        return "running" if time.time() - newest < RUNNING_WITHIN_S else "stopped"

    def summary(self) -> dict[str, Any]:
        last = self.records[-1] if self.records else {}
        return {
            "name": self.name,
            "path": str(self.path),
            "status": self.status(),
            "rounds_done": last.get("round", 0),
            "rounds": (self.config or {}).get("rounds"),
            "config": self.config,
            "error": self.error,
        }


class RunsWatcher:
    """Every run directory in ``root`` (the folder itself, its children, or their children)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder of runs")
        self.runs: dict[str, WatchedRun] = {}

    @staticmethod
    def is_run(path: Path) -> bool:
        return (path / "config.yaml").exists() or (path / "metrics.jsonl").exists()

    def _find(self) -> list[Path]:
        if self.is_run(self.root):
            return [self.root]
        found = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir():
                continue
            if self.is_run(child):
                found.append(child)
            else:
                found += [g for g in sorted(child.iterdir()) if g.is_dir() and self.is_run(g)]
        return found

    def poll(self) -> tuple[list[WatchedRun], dict[str, list[dict[str, Any]]]]:
        """(runs that appeared, {run name: records appended}) since the last poll."""
        appeared = []
        for path in self._find():
            name = str(path.relative_to(self.root)) if path != self.root else path.name
            if name not in self.runs:
                run = WatchedRun(name, path)
                run.read_config()
                self.runs[name] = run
                appeared.append(run)
        grown = {}
        for name, run in self.runs.items():
            new = run.read_new()
            if new:
                grown[name] = new
        return appeared, grown
