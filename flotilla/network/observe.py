"""What an operator can watch of a running server: one snapshot dict, refreshed on the server's loop.

The server's state (the coordinator's tables and counters) belongs to its asyncio loop.  Watchers
in other threads (the dashboard, the Prometheus exporter) must not read it mid-change, so the loop
itself builds a plain, JSON-ready snapshot about once a second and swaps it in; readers take the
latest one under a lock.  Counters that only the server's handlers know (devices seen, bytes on
the wire, server step latencies) are kept here and folded into each snapshot.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

LEDGER_TAIL = 20  # ledger lines shown (the last steps and acceptances)
STEP_LATENCIES = 200  # recent server step durations kept for the snapshot


class Observations:
    def __init__(self):
        self.devices_seen: set[str] = set()
        self.bytes_in = 0  # upload bodies received
        self.bytes_out = 0  # model bytes sent in downloads
        self.step_latency_s: deque[float] = deque(maxlen=STEP_LATENCIES)
        self.step_latency_total = 0  # steps timed (the Prometheus histogram counts every one)
        self.step_observers: list = []  # callables(seconds) told of each step (the exporter's histogram)
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self.refreshed_at = 0.0

    def saw_step(self, seconds: float) -> None:
        self.step_latency_s.append(seconds)
        self.step_latency_total += 1
        for observe in self.step_observers:
            observe(seconds)

    def publish(self, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._snapshot = snapshot
            self.refreshed_at = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot


def ledger_tail(path: Path, lines: int = LEDGER_TAIL) -> list[dict[str, Any]]:
    """The last ``lines`` complete JSON lines of the ledger (read without the server's lock)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        chunk = f.read()
    out = []
    for line in chunk.split(b"\n")[-lines - 1 :]:
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a partial first or last line of the window
    return out[-lines:]
