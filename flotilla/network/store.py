"""The server's durable state: snapshot, pending updates and the accepted-update ledger.

Layout of the state directory (it is also a run directory: ``flotilla report`` reads it)::

    state.safetensors     snapshot after the latest server step: weights, server-optimizer state,
                          version; metadata: the last ledger seq folded into the weights, counters
    pending/<name>.bin    the raw float32 delta of every accepted update not yet in a server step
                          (the buffer / the current round's updates); its ledger line names the file
    ledger.jsonl          append-only: one "accepted" line per accepted update, one "step" line
                          per server step naming the seqs it applied, one "dropped" line per set
                          of accepted updates that will never be applied, with its reason
                          (``nonfinite_step``: the step they formed made the model non-finite and
                          was rolled back; ``lost_on_restart``: sealed updates the restarted
                          secure buffer cannot open)
    secret.key            the key that signs assignment tickets (so tickets survive a restart)
    serve.lock            held (``flock``) by the one server using this directory
    config.yaml, metrics.jsonl, model.safetensors   as in any run directory

Write order, each file fsync'd before the next step (``fsync=False`` skips the syncs, for tests
on slow disks):

* accept: the delta is *staged* to a fresh ``pending/<random>.bin`` (file and folder fsync'd;
          many uploads stage at once, outside the commit lock), then the ledger line naming
          it is appended under the lock, then the client is acked.
* step:   snapshot (temp + rename), then the ledger "step" line, then delete the pending files.

Recovery (:meth:`StateStore.recover`) therefore sees one of a few states and repairs each one:
a pending file with no ledger line (crash before the ack: the update was never accepted; deleted),
a torn last ledger line (dropped), a snapshot newer than the last "step" line (the line is
written), pending files already folded into the snapshot or dropped (deleted).  Every accepted
update is in exactly one place, the snapshot, ``pending/`` or a "dropped" line, and is applied at
most once (exactly once unless dropped, with the reason in the ledger).

Only one server may use a state directory: :meth:`StateStore.lock` (the server calls it first,
:meth:`~StateStore.recover` too) takes an exclusive ``flock`` on ``serve.lock`` (released when the process ends, even by ``kill -9``); a second one is refused
with one line (:class:`~flotilla.network.refusals.InUse`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flotilla.network.durable import write_durable
from flotilla.network.refusals import InUse
from flotilla.runs.rundir import RunDir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Recovered:
    """What :meth:`StateStore.recover` found on disk."""

    tensors: dict[str, torch.Tensor] | None  # the snapshot (None: fresh start)
    meta: dict[str, Any]  # snapshot metadata (counters, version, applied_seq)
    pending: list[tuple[dict[str, Any], torch.Tensor]] = field(default_factory=list)  # (ledger entry, delta)
    next_seq: int = 0
    repairs: list[str] = field(default_factory=list)  # what recovery fixed, for the log
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> accepted updates dropped (ledger)
    accepted: list[dict[str, Any]] = field(default_factory=list)  # every accepted entry (retries' answers)


class StateStore:
    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.run_dir = RunDir(self.path)
        self.pending_dir = self.path / "pending"
        self.ledger_file = self.path / "ledger.jsonl"
        self.snapshot_file = self.path / "state.safetensors"
        self.path.mkdir(parents=True, exist_ok=True)
        self.pending_dir.mkdir(exist_ok=True)
        self._ledger = None
        self._lock = None

    def lock(self) -> None:
        """Take the directory for this process (the server calls it first; :meth:`recover` too).
        Reading (:meth:`read_ledger`, :meth:`steps`) needs no lock, so tools may look while a server runs."""
        if self._lock is None:
            self._lock = self._take_lock()

    def _take_lock(self):
        f = open(self.path / "serve.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise InUse(
                f"state directory {self.path} is in use by another flotilla serve (pid {holder}); "
                "stop it first, or give this one another --state-dir"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        return f

    # -- small durable writes ---------------------------------------------------------------
    def _atomic(self, path: Path, write) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        if self.fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(path.parent)

    def _append(self, record: dict[str, Any]) -> None:
        if self._ledger is None:
            self._ledger = open(self.ledger_file, "a", encoding="utf-8")
        # allow_nan=False: a non-finite number is a bug upstream (every reported number is validated)
        self._ledger.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
        self._ledger.flush()
        if self.fsync:
            os.fsync(self._ledger.fileno())

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def secret(self) -> bytes:
        """The ticket-signing key, created on first use (mode 0600)."""
        f = self.path / "secret.key"
        if not f.exists():
            key = secrets.token_bytes(32)
            fd = os.open(f.with_name("secret.key.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key)
            os.replace(f.with_name("secret.key.tmp"), f)
        return f.read_bytes()

    # -- the durable transitions ------------------------------------------------------------
    def stage(self, delta: bytes | memoryview, name: str | None = None) -> str:
        """Write an upload's delta durably under ``name`` (default: a fresh random one); it counts
        only once :meth:`accept` names it.  Returns the file name."""
        name = name or secrets.token_hex(12) + ".bin"
        write_durable(self.pending_dir / name, delta, self.fsync)  # O_DIRECT where it can (durable.py)
        if self.fsync:
            _fsync_dir(self.pending_dir)
        return name

    def discard(self, name: str) -> None:
        """Remove a staged delta that was not accepted after all."""
        (self.pending_dir / name).unlink(missing_ok=True)

    def accept(self, entry: dict[str, Any]) -> None:
        """The update counts from here: its ledger line (naming the staged ``entry["file"]``) is
        durable.  Call before acking the client."""
        self._append({"event": "accepted", **entry, "t": round(time.time(), 3)})

    def step(
        self, version: int, entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> None:
        """Record a server step that applied the accepted ``entries`` and produced ``version``."""
        seqs = sorted(int(e["seq"]) for e in entries)
        meta = {**meta, "version": version, "applied_seq": max(seqs, default=meta.get("applied_seq", -1))}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        self._atomic(self.snapshot_file, lambda p: save_file(tensors, str(p), metadata={"flotilla": json.dumps(meta)}))
        self._append({"event": "step", "version": version, "seqs": seqs, "t": round(time.time(), 3)})
        for e in entries:
            self.discard(e["file"])

    def drop(self, entries: list[dict[str, Any]], reason: str, why: str, version: int) -> None:
        """Accepted updates that will never be applied: their "dropped" line, then their files go."""
        seqs = sorted(int(e["seq"]) for e in entries)
        self._append(
            {
                "event": "dropped",
                "reason": reason,
                "why": why,
                "version": version,
                "seqs": seqs,
                "t": round(time.time(), 3),
            }
        )
        for e in entries:
            self.discard(e["file"])

    def find_accepted(self, assignment: str) -> dict[str, Any] | None:
        """The ledger entry that accepted ``assignment`` (a linear scan: only for late retries)."""
        needle = f'"assignment":"{assignment}"'
        if not self.ledger_file.exists():
            return None
        with open(self.ledger_file, encoding="utf-8") as f:
            for line in f:
                if needle in line:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    if r.get("event") == "accepted" and r.get("assignment") == assignment:
                        return r
        return None

    def steps(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """Every committed step: (version, the accepted entries it applied), in order."""
        records = self.read_ledger()
        accepted = {int(r["seq"]): r for r in records if r["event"] == "accepted"}
        return [
            (int(r["version"]), [accepted[s] for s in r["seqs"] if s in accepted])
            for r in records
            if r["event"] == "step"
        ]

    # -- reading back ---------------------------------------------------------------------------
    def read_ledger(self) -> list[dict[str, Any]]:
        """Every complete ledger record (a torn last line, from a crash mid-write, is skipped)."""
        if not self.ledger_file.exists():
            return []
        out = []
        for line in self.ledger_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def recover(self, numel: int, sealed: bool = False) -> Recovered:
        """Load the snapshot and the pending updates, repairing what a crash left half-done.
        ``sealed``: pending files are ciphertexts for the secure buffer; their deltas are ``None``."""
        self.lock()
        repairs: list[str] = []
        tensors, meta = None, {}
        if self.snapshot_file.exists():
            from safetensors import safe_open

            with safe_open(str(self.snapshot_file), "pt") as f:
                meta = json.loads(f.metadata()["flotilla"])
            tensors = load_file(str(self.snapshot_file))
        applied_seq = int(meta.get("applied_seq", -1))
        version = int(meta.get("version", 0))

        records = self._repair_torn_tail(repairs)
        accepted = {int(r["seq"]): r for r in records if r["event"] == "accepted"}
        stepped = {s for r in records if r["event"] in ("step", "dropped") for s in r["seqs"]}
        dropped: dict[str, int] = {}
        for r in records:
            if r["event"] == "dropped":
                dropped[r["reason"]] = dropped.get(r["reason"], 0) + len(r["seqs"])
        last_step = max((r["version"] for r in records if r["event"] == "step"), default=0)
        if version > last_step:
            # The snapshot was written but the crash came before its ledger line: write it now.
            seqs = sorted(s for s in accepted if s <= applied_seq and s not in stepped)
            self._append(
                {"event": "step", "version": version, "seqs": seqs, "t": round(time.time(), 3), "recovered": True}
            )
            stepped.update(seqs)
            repairs.append(f"wrote the missing ledger line for step {version} ({len(seqs)} updates)")
        elif version < last_step:
            raise RuntimeError(
                f"{self.path}: ledger records step {last_step} but the snapshot is at version {version}; "
                "the state directory is inconsistent (was state.safetensors replaced?)"
            )

        waiting = {seq: e for seq, e in accepted.items() if seq > applied_seq and seq not in stepped}
        keep = {e["file"] for e in waiting.values()}
        applied_files = {e["file"] for seq, e in accepted.items() if seq not in waiting}
        for f in sorted(self.pending_dir.iterdir()):
            if f.name in keep:
                continue
            f.unlink()
            if f.name in applied_files:
                repairs.append(f"removed {f.name}, already applied in the snapshot")
            elif not f.name.endswith(".tmp"):
                repairs.append(f"dropped unacknowledged upload {f.name} (no ledger line)")
        pending = []
        for seq, entry in sorted(waiting.items()):
            f = self.pending_dir / entry["file"]
            if not f.exists():
                raise RuntimeError(f"{self.path}: ledger accepted update #{seq} but {f} is missing; cannot recover it")
            if sealed:
                pending.append((entry, None))
                continue
            data = f.read_bytes()
            if len(data) != 4 * numel:
                raise RuntimeError(f"{f}: {len(data)} bytes, expected {4 * numel} (float32 x {numel})")
            pending.append((entry, torch.frombuffer(bytearray(data), dtype=torch.float32)))
        next_seq = max(accepted, default=-1) + 1
        return Recovered(tensors, meta, pending, next_seq, repairs, dropped, list(accepted.values()))

    def _repair_torn_tail(self, repairs: list[str]) -> list[dict[str, Any]]:
        if not self.ledger_file.exists():
            return []
        raw = self.ledger_file.read_bytes()
        good = raw.rfind(b"\n") + 1
        records = []
        pos = 0
        for line in raw[:good].split(b"\n")[:-1]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                good = pos
                break
            pos += len(line) + 1
        if good < len(raw):
            with open(self.ledger_file, "r+b") as f:
                f.truncate(good)
            repairs.append(f"dropped a torn ledger tail of {len(raw) - good} bytes")
        return records
