"""The server's decision logic, free of any networking: who trains, which uploads count, when to step.

The gRPC layer (:mod:`flotilla.network.server`) authenticates the caller, streams bytes and maps
:class:`Refused` to a gRPC status; everything else happens here, on the same algorithm objects
as the simulator: an aggregator with the ``reset/add/count/result`` interface
(:class:`~flotilla.core.aggregate.WeightedMean` by default), :func:`~flotilla.core.aggregate.check_update`
and a :class:`~flotilla.core.server_opt.ServerOptimizer`.

Modes
-----
``sync``  rounds as in :class:`~flotilla.sim.sync.SyncFedAvg`: up to ``ceil(cohort *
          over_selection)`` devices hold an assignment for the current round; the round closes at
          the first ``cohort`` accepted updates (later ones are refused as *late*), or at
          ``round_deadline_s`` if at least ``min_updates`` arrived.  One server step per round.
``async`` FedBuff (:class:`~flotilla.core.fedbuff.FedBuff`, the simulator's buffer): at most
          ``concurrency`` assignments in flight; each accepted update is added with its staleness
          weight ``s(tau)`` (:class:`~flotilla.core.staleness.Staleness`); one server step every
          ``buffer_size`` updates.  Updates staler than ``max_staleness`` are refused.

Assignments are stateless signed *tickets* (HMAC over assignment id = nonce, device, model
version, round, expiry), so uploads for assignments issued before a server restart still verify.
Replays are refused from the set of nonces already accepted within the staleness window (older
tickets are refused as stale anyway), so that memory is bounded by concurrency, not population.

User-level DP (``privacy``, :mod:`flotilla.network.dp`): the aggregator is the privacy package's
DPFedAvg (sync) or DPFedBuff (async); epsilon is reported by step and ``done`` comes at the
budget.  Secure buffer (``sealed``, async only): the aggregator is a SecureFedBuff, assignment ids
are the buffer's nonces, and uploads are ciphertexts relayed into it (:meth:`_receive_sealed`).
Sync secure aggregation (``masked``, :mod:`flotilla.network.secagg`): devices run the 4-round
masking protocol through :meth:`secagg_step` instead of uploading; the round's SecAggServer holds
only the sum of masked vectors; the unmasked weighted mean is the round's step; an abort makes none.

Every upload is checked before it touches state: ticket signature and owner, expiry, replayed
nonce, version (named by the upload, must match the ticket; within the staleness limit), dtype,
shape, number of examples, finite values, norm bound.  A refusal is counted under its reason and
logged; the model, buffer and ledger are unchanged.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from flotilla.core.aggregate import UpdateRejected, WeightedMean, check_update
from flotilla.core.client import client_seed
from flotilla.core.fedbuff import FedBuff
from flotilla.core.server_opt import ServerOptimizer
from flotilla.core.staleness import Staleness
from flotilla.network.store import StateStore

log = logging.getLogger("flotilla.network")

class Refused(Exception):
    """An RPC refused: ``code`` names the gRPC status, ``reason`` the counter, ``str()`` the detail."""

    def __init__(self, code: str, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class CoordinatorSettings:
    mode: str = "sync"                      # "sync" | "async"
    total_steps: int = 10                   # server steps (rounds / buffer flushes) to run
    seed: int = 0
    weighting: str = "examples"             # "examples" | "uniform"
    # sync
    cohort: int = 10
    over_selection: float = 1.3
    min_updates: int = 1
    round_deadline_s: float | None = None
    # async
    concurrency: int = 10
    buffer_size: int = 10
    max_staleness: int | None = None
    staleness: Staleness = Staleness()
    normalize: str = "mean"                 # FedBuff: "mean" or "sum" (see flotilla.core.fedbuff)
    # both
    assignment_timeout_s: float = 120.0
    max_update_norm: float | None = None
    max_examples: int | None = None
    retry_after_s: float = 0.5
    selection_window_s: float = 1.0         # sync: collect check-ins this long, then sample the cohort
    secagg_stage_s: float = 30.0            # sync secure aggregation: a protocol stage closes this long after it opened

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"network.mode: must be 'sync' or 'async', got {self.mode!r}")
        if self.weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting: must be 'examples' or 'uniform', got {self.weighting!r}")
        if self.over_selection < 1:
            raise ValueError(f"network.over_selection: must be >= 1, got {self.over_selection}")
        if not 1 <= self.min_updates <= self.cohort:
            raise ValueError(f"network.min_updates: must be between 1 and cohort={self.cohort}, got {self.min_updates}")
        for name in ("total_steps", "cohort", "concurrency", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def slots(self) -> int:
        """Assignments that may be outstanding (sync: including the round's accepted ones)."""
        return math.ceil(self.cohort * self.over_selection) if self.mode == "sync" else self.concurrency

    @property
    def step_size(self) -> int:
        return self.cohort if self.mode == "sync" else self.buffer_size

    @property
    def staleness_limit(self) -> int | None:
        return 0 if self.mode == "sync" else self.max_staleness


@dataclass(frozen=True)
class Ticket:
    id: str          # the per-assignment nonce
    device: str
    version: int
    round: int
    seed: int
    expires: float   # unix time

    def encode(self, secret: bytes) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(asdict(self), separators=(",", ":")).encode()).decode()
        return payload + "." + hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def decode(text: str, secret: bytes) -> Ticket:
        payload, _, sig = text.rpartition(".")
        good = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
        if not payload or not hmac.compare_digest(sig, good):
            raise Refused("PERMISSION_DENIED", "ticket", "upload refused: the assignment ticket is not one this server signed")
        try:
            return Ticket(**json.loads(base64.urlsafe_b64decode(payload)))
        except (ValueError, TypeError) as e:  # signed but unreadable: a server bug, not an attack
            raise Refused("INVALID_ARGUMENT", "ticket", f"upload refused: unreadable ticket ({e})") from None


@dataclass
class Upload:
    """A validated upload, ready to commit."""
    ticket: Ticket
    num_examples: int
    train_loss: float
    examples_seen: int
    delta: torch.Tensor | None        # None for a sealed upload (the server cannot read it)
    norm: float
    ephemeral_pk: bytes = b""         # sealed upload: the client's ephemeral X25519 key
    ciphertext: bytes = b""           # sealed upload: what the secure buffer opens


class Coordinator:
    """Owns the global model, the aggregator, the server optimizer and the durable store."""

    def __init__(
        self,
        weights: torch.Tensor,
        server_opt: ServerOptimizer,
        settings: CoordinatorSettings,
        store: StateStore,
        *,
        aggregator=None,
        device_index: Callable[[str], int] = lambda device: 0,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        privacy=None,
        sealed: bool = False,
        masked=None,
        masked_release=None,
    ):
        self.weights = weights
        self.numel = weights.numel()
        self.server_opt = server_opt
        self.settings = settings
        self.store = store
        if aggregator is None:
            # validate=False: check_delta has already run check_update on every upload.
            aggregator = WeightedMean(self.numel, validate=False) if settings.mode == "sync" else FedBuff(
                self.numel, settings.buffer_size, settings.staleness, normalize=settings.normalize,
                max_staleness=settings.max_staleness, validate=False)
        self.aggregator = aggregator
        # User-level DP (flotilla.network.dp.NetworkPrivacy): epsilon, budget, mechanism state.
        self.privacy = privacy
        # Async secure buffer (flotilla.secure.fedbuff.SecureFedBuff): devices seal their update to
        # the buffer's key; the server relays ciphertexts it cannot read; only sums of >= K leave.
        self.sealed = sealed
        if sealed and (settings.mode != "async" or not hasattr(aggregator, "secure")):
            raise ValueError("secure_aggregation: the network server runs the secure buffer (a SecureFedBuff) in async mode only")
        # Sync secure aggregation (flotilla.network.secagg.SecAggParams): devices run the 4-round
        # masking protocol through secagg_step; the server holds only the sum of masked vectors.
        self.masked = masked
        self.masked_release = masked_release           # user-level DP: (noise_fn, expected cohort) for the unmasked sum
        self.secagg = None                             # the current round's SecAggRound
        self.secagg_aborted: set[str] = set()          # tickets of aborted secure rounds (cleared at each step)
        self.secagg_restart = -math.inf                # tickets issued before the last abort cannot join
        if masked is not None and (settings.mode != "sync" or sealed or (privacy is None) != (masked_release is None)):
            raise ValueError("secure_aggregation: the masking protocol runs in sync mode, without the secure buffer; "
                             "with DP the noise is added to the unmasked sum (masked_release)")
        self.device_index = device_index
        self.on_step = on_step
        self.clock = clock
        self.secret = store.secret()
        self.lock = asyncio.Lock()

        self.version = 0
        self.live: dict[str, Ticket] = {}              # device -> its outstanding assignment
        self.buffer: list[dict[str, Any]] = []         # ledger entries of updates in the aggregator
        self.used: dict[str, tuple[int, int, float]] = {}  # nonce -> (seq, version, expires) within the window
        self.counters: Counter[str] = Counter()        # accepted, rejected.<reason>, assigned
        self.round_started = clock()
        self.candidates: set[str] = set()              # sync: devices that checked in during the window
        # async: a device that just uploaded waits retry_after_s before its next assignment, so
        # the slot it freed goes to whichever waiting device checks in first (about uniformly
        # random, as the simulator draws from the eligible devices) rather than back to itself.
        self.cooldown: dict[str, float] = {}
        self.selected_round = -1
        self._pruned_at = 0.0
        self.next_seq = 0
        self.examples_seen_total = 0
        self._recover()
        self._served = {self.version: self._serialize()}   # model bytes of versions still in flight

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self) -> None:
        rec = self.store.recover(self.numel, sealed=self.sealed)
        for line in rec.repairs:
            log.warning("recovery: %s", line)
        if rec.tensors is not None:
            w = rec.tensors["weights"]
            if w.shape != self.weights.shape:
                raise ValueError(f"{self.store.path}: saved model has {w.numel()} weights, this model has {self.numel}")
            self.weights.copy_(w)
            self.server_opt.load_state_dict({k.removeprefix("server_opt."): v for k, v in rec.tensors.items()
                                             if k.startswith("server_opt.")})
            self.version = int(rec.meta["version"])
            self.counters.update(rec.meta.get("counters", {}))
            self.examples_seen_total = int(rec.meta.get("examples_seen", 0))
            if self.privacy is not None:
                self.privacy.load(rec.meta.get("dp", {}))
        self.next_seq = rec.next_seq
        self.aggregator.reset()
        if self.sealed and rec.pending:
            # The buffer's key pair lives only in memory (an enclave's sealed storage is out of scope):
            # ciphertexts accepted before the restart cannot be opened by the new buffer.
            log.warning("recovery: %d sealed updates buffered before the restart are lost (the secure buffer's key "
                        "does not survive a restart); they are folded out at the next step", len(rec.pending))
            self.counters["lost_on_restart"] += len(rec.pending)
        for entry, delta in ([] if self.sealed else rec.pending):
            self._add(delta, entry)
            self.buffer.append(entry)
            self.used[entry["assignment"]] = (int(entry["seq"]), int(entry["base_version"]), float(entry["expires"]))
        # ``accepted`` is authoritative in the ledger: recount it (a crash may have lost the
        # in-memory increments made after the last snapshot).
        self.counters["accepted"] = self.next_seq
        if rec.tensors is not None or rec.pending:
            log.info("resumed at version %d with %d buffered updates (next ledger seq %d)",
                     self.version, len(self.buffer), self.next_seq)

    def _serialize(self) -> bytes:
        return self.weights.numpy().tobytes()

    # -- what devices see -------------------------------------------------------------------
    @property
    def step_limit(self) -> int:
        """Server steps to run: total_steps, or fewer when the privacy budget allows fewer."""
        s = self.settings.total_steps
        return s if self.privacy is None else min(s, self.privacy.limit)

    @property
    def done(self) -> bool:
        return self.version >= self.step_limit

    @property
    def one_per_device(self) -> bool:
        """User-level DP in async mode: a device contributes at most once per buffer."""
        return self.privacy is not None and self.settings.mode == "async"

    def model_bytes(self, version: int) -> bytes:
        """The weights of ``version`` as bytes.  Versions are kept while an assignment needs them
        (memory grows with the versions in flight, not with the devices)."""
        data = self._served.get(version)
        if data is None:
            raise Refused("FAILED_PRECONDITION", "version_gone",
                          f"model version {version} is no longer served (current {self.version}); check in again")
        return data

    def _prune(self, now: float, force: bool = False) -> None:
        """Drop expired assignments (freeing their slots), old cooldowns and unneeded versions;
        at most every 0.1 s unless forced, since every check-in calls it."""
        if not force and now - self._pruned_at < 0.1:
            return
        self._pruned_at = now
        for device, t in list(self.live.items()):
            if t.expires <= now:
                del self.live[device]
                self._cancel(t)
                self.counters["timed_out"] += 1
                log.info("assignment %s of %s timed out; its slot is free for another device", t.id[:8], device)
            elif self.settings.mode == "sync" and t.version != self.version:
                del self.live[device]
        self.cooldown = {d: t for d, t in self.cooldown.items() if t > now}
        needed = {t.version for t in self.live.values()} | {self.version}
        for v in [v for v in self._served if v not in needed]:
            del self._served[v]

    def check_in(self, device: str) -> Ticket | float | None:
        """A ticket to train, seconds to wait, or ``None`` when training is finished."""
        if self.done:
            return None
        now = self.clock()
        self._prune(now)
        s = self.settings
        if s.mode == "sync":
            if any(e["device"] == device for e in self.buffer):
                return s.retry_after_s   # already contributed to this round
            opens = self.round_started + s.selection_window_s
            if now < opens:
                self.candidates.add(device)
                return opens - now + 0.05
            if self.selected_round != self.version:
                self._select(now)
            if device in self.live:
                return self.live[device]   # selected, or asked again after a restart: same assignment
            if len(self.live) + len(self.buffer) >= s.slots:
                return s.retry_after_s
        else:
            # One assignment per device at a time: asking again gives up the previous one.
            given_up = self.live.pop(device, None)
            if given_up is not None:
                self._cancel(given_up)
            if self.one_per_device and any(e["device"] == device for e in self.buffer):
                return s.retry_after_s   # DP: already in this buffer; wait for the release
            rest = self.cooldown.get(device, 0.0) - now
            if rest > 0:
                return rest
            if len(self.live) >= s.slots:
                return s.retry_after_s
        return self._issue(device, now)

    def _issue(self, device: str, now: float) -> Ticket:
        s = self.settings
        # Sync: the simulator's seed for (round, client).  Async: a device may train several times
        # from one version, so each assignment gets its own seed (as each simulated trip does).
        nth = self.version if s.mode == "sync" else self.counters["assigned"]
        # Secure buffer: the buffer issues the single-use nonce, and it is the assignment id.
        nonce = self.aggregator.secure.assign(device, self.version).nonce.hex() if self.sealed else secrets.token_hex(16)
        ticket = Ticket(nonce, device, self.version, self.version,
                        client_seed(s.seed, nth, self.device_index(device)), now + s.assignment_timeout_s)
        self.live[device] = ticket
        self.counters["assigned"] += 1
        return ticket

    def _select(self, now: float) -> None:
        """Sync: draw the round's devices uniformly from those that checked in during the window
        (as the simulator samples its cohort), not first come first served, which favours the
        devices that just finished the previous round.  Later check-ins fill any free slots."""
        self.selected_round = self.version
        pool = sorted(self.candidates - {e["device"] for e in self.buffer} - set(self.live))
        self.candidates = set()
        free = self.settings.slots - len(self.live) - len(self.buffer)
        if free <= 0 or not pool:
            return
        rng = np.random.default_rng([self.settings.seed, self.version, 0x5E1EC7])
        for i in sorted(rng.choice(len(pool), size=min(free, len(pool)), replace=False).tolist()):
            self._issue(pool[i], now)

    def _cancel(self, ticket: Ticket) -> None:
        """Secure buffer: forget the nonce of an assignment whose update will not come."""
        if self.sealed:
            from flotilla.secure.buffer import Assignment
            self.aggregator.secure.cancel(Assignment(ticket.device, ticket.version, bytes.fromhex(ticket.id), b""))

    def seal_info(self, ticket: Ticket) -> tuple[bytes, bytes]:
        """(buffer public key, nonce) that a device seals its update to."""
        return self.aggregator.secure.public_key, bytes.fromhex(ticket.id)

    def ticket_text(self, ticket: Ticket) -> str:
        return ticket.encode(self.secret)

    # -- validation (nothing here changes state except the rejection counters) ----------------
    def refuse(self, err: Refused, device: str) -> Refused:
        self.counters[f"rejected.{err.reason}"] += 1
        log.warning("refused %s: %s", device, err)
        return err

    def check_header(self, device: str, ticket_text: str, base_version: int, dtype: str,
                     shape: list[int], num_examples: int) -> Ticket:
        """Everything that can be judged before the delta's bytes arrive."""
        ticket = Ticket.decode(ticket_text, self.secret)
        if ticket.device != device:
            raise Refused("PERMISSION_DENIED", "ticket", f"upload refused: assignment {ticket.id[:8]} belongs to another device")
        self._check_fresh(ticket)
        if base_version != ticket.version:
            raise Refused("INVALID_ARGUMENT", "version",
                          f"upload refused: it names model version {base_version} but assignment {ticket.id[:8]} was for version {ticket.version}")
        if self.masked is not None:
            raise Refused("INVALID_ARGUMENT", "dtype", "upload refused: this server runs synchronous secure aggregation; "
                          "devices send masked inputs through SecAggStep, never a plaintext delta")
        expected = "sealed" if self.sealed else "float32"
        if dtype != expected:
            why = (" (this server runs the secure buffer: seal the update to the buffer key sent with the assignment)"
                   if self.sealed else "")
            raise Refused("INVALID_ARGUMENT", "dtype", f"upload refused: dtype {dtype!r}, expected {expected!r}{why}")
        if list(shape) != [self.numel]:
            raise Refused("INVALID_ARGUMENT", "shape", f"upload refused: shape {tuple(shape)}, expected ({self.numel},)")
        if num_examples < 1 or (self.settings.max_examples is not None and num_examples > self.settings.max_examples):
            raise Refused("INVALID_ARGUMENT", "examples",
                          f"upload refused: num_examples={num_examples}, must be between 1 and {self.settings.max_examples or 'inf'}")
        return ticket

    def _check_fresh(self, ticket: Ticket) -> None:
        """Replay, expiry and staleness: checked on the header and again at commit time."""
        if ticket.id in self.used:
            raise Refused("ALREADY_EXISTS", "replay",
                          f"upload refused: replayed nonce, assignment {ticket.id[:8]} was already accepted as update #{self.used[ticket.id][0]}")
        if self.done:
            why = " (privacy budget spent)" if self.privacy is not None and self.version >= self.privacy.limit else ""
            raise Refused("FAILED_PRECONDITION", "late", f"upload refused: training finished at version {self.version}{why}")
        if ticket.expires <= self.clock():
            raise Refused("DEADLINE_EXCEEDED", "expired", f"upload refused: assignment {ticket.id[:8]} expired")
        staleness = self.version - ticket.version
        if staleness < 0:
            raise Refused("INVALID_ARGUMENT", "version", f"upload refused: version {ticket.version} is ahead of the server ({self.version})")
        if self.settings.mode == "sync":
            if staleness > 0:
                raise Refused("FAILED_PRECONDITION", "late",
                              f"upload refused: late, round {ticket.round} closed (the server is at round {self.version})")
            if any(e["device"] == ticket.device for e in self.buffer):
                raise Refused("ALREADY_EXISTS", "replay", f"upload refused: device {ticket.device} already contributed to round {self.version}")
        elif self.one_per_device and any(e["device"] == ticket.device for e in self.buffer):
            raise Refused("ALREADY_EXISTS", "duplicate",
                          f"upload refused: device {ticket.device} already has an update in this buffer "
                          f"(user-level DP: one update per device per release)")
        elif self.settings.max_staleness is not None and staleness > self.settings.max_staleness:
            raise Refused("FAILED_PRECONDITION", "stale",
                          f"upload refused: stale, trained from version {ticket.version}, server is at {self.version} "
                          f"(staleness {staleness} > max_staleness {self.settings.max_staleness})")

    def check_delta(self, delta: torch.Tensor, device: str) -> float:
        norm = float(torch.linalg.vector_norm(delta))
        # A NaN or inf anywhere makes the norm non-finite, so the full element-wise check (the
        # core's check_update, 3x the cost of the norm) runs only when the norm is not finite.
        if not math.isfinite(norm) or delta.dtype != torch.float32 or delta.shape != (self.numel,):
            try:
                check_update(delta, self.numel, f"upload from {device}")
            except UpdateRejected as e:
                raise Refused("INVALID_ARGUMENT", "nonfinite" if "non-finite" in str(e) else "invalid", f"upload refused: {e}") from None
        bound = self.settings.max_update_norm
        if bound is not None and norm > bound:
            raise Refused("INVALID_ARGUMENT", "norm", f"upload refused: update norm {norm:.4g} exceeds the bound {bound:.4g}")
        return norm

    # -- committing ---------------------------------------------------------------------------
    async def commit(self, up: Upload, raw: bytes | memoryview) -> tuple[int, int]:
        """Make an upload count: durable first, then into the aggregator; maybe a server step.
        Returns ``(seq, version)``.  Callers must not cancel it half-way (the server shields it)."""
        self._check_fresh(up.ticket)
        loop = asyncio.get_running_loop()
        # Stage the bytes (the slow, fsync'd part) outside the lock, so uploads stage in parallel.
        name = await loop.run_in_executor(None, self.store.stage, raw)
        attempted = False   # once the ledger write starts the file must stay (recovery decides)
        try:
            async with self.lock:
                self._check_fresh(up.ticket)     # the version may have moved while the bytes streamed
                s = self.settings
                weight = float(up.num_examples) if s.weighting == "examples" else 1.0
                seq = self.next_seq
                entry = {"seq": seq, "assignment": up.ticket.id, "device": up.ticket.device, "base_version": up.ticket.version,
                         "expires": up.ticket.expires, "version": self.version, "staleness": self.version - up.ticket.version,
                         "num_examples": up.num_examples, "weight": weight, "norm": round(up.norm, 6),
                         "train_loss": up.train_loss, "examples_seen": up.examples_seen, "file": name}
                if self.sealed:
                    entry["norm"] = None                 # the server cannot see it
                    self._receive_sealed(up)             # the buffer opens, validates and adds, or refuses
                attempted = True
                await loop.run_in_executor(None, self.store.accept, entry)
                self.next_seq += 1
                if not self.sealed:
                    self._add(up.delta, entry)
                self.buffer.append(entry)
                self.used[up.ticket.id] = (seq, up.ticket.version, up.ticket.expires)
                if (held := self.live.get(up.ticket.device)) is not None and held.id == up.ticket.id:
                    del self.live[up.ticket.device]
                if s.mode == "async":
                    self.cooldown[up.ticket.device] = self.clock() + s.retry_after_s
                self.counters["accepted"] += 1
                if self.aggregator.count >= s.step_size:
                    await self._step()
                return seq, self.version
        finally:
            if not attempted:
                self.store.discard(name)

    def _add(self, delta: torch.Tensor, entry: dict[str, Any]) -> None:
        """Into the aggregator, exactly as the simulator adds (also used to rebuild the buffer on restart)."""
        if self.settings.mode == "sync":
            self.aggregator.add(delta, float(entry["weight"]), entry["device"])
        elif self.aggregator.add(delta, float(entry["weight"]), int(entry["staleness"]), entry["device"]) == 0.0:
            raise RuntimeError(f"update #{entry['seq']} was dropped by the buffer as too stale after it was accepted")

    def _receive_sealed(self, up: Upload) -> None:
        """Relay a ciphertext into the secure buffer; its refusals leave the buffer unchanged."""
        from flotilla.core.aggregate import UpdateRejected
        from flotilla.secure.buffer import EncryptedUpdate
        from flotilla.secure.errors import DuplicateContribution, ProtocolError, ReplayedMessage, TamperedMessage
        t = up.ticket
        sealed = EncryptedUpdate(t.device, t.version, bytes.fromhex(t.id), up.ephemeral_pk, up.ciphertext)
        try:
            self.aggregator.secure.receive(sealed, self.version)
        except TamperedMessage as e:
            raise Refused("INVALID_ARGUMENT", "tampered", f"upload refused: {e}") from None
        except ReplayedMessage as e:
            raise Refused("ALREADY_EXISTS", "replay", f"upload refused: {e}") from None
        except ProtocolError as e:
            raise Refused("FAILED_PRECONDITION", "unknown_assignment",
                          f"upload refused: {e} (the assignment was given up, timed out or issued before a server "
                          f"restart); check in again") from None
        except DuplicateContribution as e:
            raise Refused("ALREADY_EXISTS", "duplicate", f"upload refused: {e}") from None
        except UpdateRejected as e:
            raise Refused("INVALID_ARGUMENT", "invalid", f"upload refused: {e}") from None

    # -- sync secure aggregation (flotilla.network.secagg) -----------------------------------------
    def continues_request(self, device: str) -> bool:
        """Whether ``device`` is midway through a SecAggStep request sent in parts."""
        return self.secagg is not None and device in self.secagg.parts.pending

    async def secagg_step(self, device: str, req: dict[str, Any]) -> dict[str, Any]:
        """One SecAggStep request of ``device`` (see flotilla.network.secagg); a refusal changes no state."""
        from flotilla.network.secagg import MESSAGES, SecAggRound
        from flotilla.secure.errors import ProtocolError, ReplayedMessage, SecAggAborted, TamperedMessage
        from flotilla.secure.serialize import dumps, loads
        if self.masked is None:
            raise Refused("FAILED_PRECONDITION", "invalid", "SecAggStep: this server does not run synchronous secure aggregation")
        if not isinstance(req, dict) or not isinstance(req.get("ticket"), str) or req.get("op") not in (*MESSAGES, "join", "get", "part"):
            raise Refused("INVALID_ARGUMENT", "invalid", "SecAggStep: expected {op: join|advertise|shares|masked|unmask|get|part, ticket, ...}")
        ticket = Ticket.decode(req["ticket"], self.secret)
        if ticket.device != device:
            raise Refused("PERMISSION_DENIED", "ticket", f"SecAggStep: assignment {ticket.id[:8]} belongs to another device")
        op = req["op"]
        async with self.lock:
            await self._secagg_advance()
            r = self.secagg
            if op == "get" and req.get("want") == "result" and ticket.version < self.version:
                return {"status": "ok", "version": self.version}
            if ticket.version != self.version or self.done:
                return {"status": "abort", "message": f"round {ticket.version} is over (the server is at round {self.version}); check in again"}
            if ticket.expires <= self.clock():
                raise Refused("DEADLINE_EXCEEDED", "expired", f"SecAggStep: assignment {ticket.id[:8]} expired")
            if op == "join":
                if ticket.id in self.secagg_aborted or ticket.expires - self.settings.assignment_timeout_s < self.secagg_restart - 1e-3:
                    return {"status": "abort", "message": f"round {self.version} was aborted; check in again"}
                if r is None:
                    r = self.secagg = SecAggRound(self.numel, self.settings.slots, self.masked, self.version, self.clock(),
                                                  dp_clip=self.privacy.user.clip_norm if self.privacy is not None else None)
                if device not in r.ids:
                    if r.stage != "advertise" or len(r.ids) >= r.config.cohort:
                        raise Refused("FAILED_PRECONDITION", "late", f"SecAggStep: round {self.version} has closed its cohort; check in again later")
                    n = req.get("num_examples")
                    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (
                            self.settings.weighting == "examples" and n > self.masked.max_weight):
                        raise Refused("INVALID_ARGUMENT", "examples", f"SecAggStep: num_examples must be an int in "
                                      f"[1, max_weight={self.masked.max_weight:g}], got {n!r}")
                    loss, seen = req.get("train_loss", 0.0), req.get("examples_seen", 0)
                    if not isinstance(loss, (int, float)) or not math.isfinite(loss) or not isinstance(seen, int) or seen < 0:
                        raise Refused("INVALID_ARGUMENT", "invalid", "SecAggStep: train_loss must be finite, examples_seen an int >= 0")
                    r.ids[device] = len(r.ids) + 1
                    r.meta[r.ids[device]] = {"num_examples": n, "train_loss": float(loss), "examples_seen": seen, "ticket": ticket}
                    if len(r.ids) == 1:
                        r.opened = self.clock()
                return {"status": "ok", "id": r.ids[device],
                        "config": {**r.config_json(), "uniform": self.settings.weighting == "uniform"}}
            if r is None or device not in r.ids:
                if ticket.id in self.secagg_aborted:
                    return {"status": "abort", "message": f"round {self.version} was aborted; check in again"}
                raise Refused("FAILED_PRECONDITION", "invalid", "SecAggStep: join the round first")
            me = r.ids[device]
            if op == "part":        # a request too large for one message, in slices (see flotilla.network.secagg)
                try:
                    text = r.parts.add(device, ticket.id, req)
                except ValueError as e:
                    raise Refused("INVALID_ARGUMENT", "invalid", f"SecAggStep: {e}") from None
                if text is None:
                    return {"status": "ok", "part": req["index"]}
                outer = req["ticket"]
                try:
                    req = json.loads(text)
                except ValueError:
                    raise Refused("INVALID_ARGUMENT", "invalid", "SecAggStep: the reassembled parts are not JSON") from None
                if not isinstance(req, dict) or req.get("ticket") != outer or req.get("op") not in MESSAGES:
                    raise Refused("INVALID_ARGUMENT", "invalid", "SecAggStep: the reassembled request must be "
                                  "advertise|shares|masked|unmask with the parts' ticket")
                op = req["op"]
            if op == "get":
                want = req.get("want")
                ready = {"directory": r.directory is not None, "bundle": r.bundles is not None,
                         "request": r.request is not None, "result": False}
                if want not in ready:
                    raise Refused("INVALID_ARGUMENT", "invalid", f"SecAggStep: unknown want {want!r}")
                if not ready[want]:
                    return {"status": "wait", "retry_after_s": 0.05}
                if want == "directory":
                    msg = r.directory
                elif want == "bundle":
                    if me not in r.bundles:
                        return {"status": "abort", "message": "this device dropped out of the round (no share bundle)"}
                    msg = r.bundles[me]
                else:
                    if me not in r.request.survivors:
                        return {"status": "abort", "message": "this device dropped out of the round (no masked input)"}
                    msg = r.request
                return {"status": "ok", "msg": dumps(msg)}
            cls = MESSAGES[op]
            try:
                msg = loads(req.get("msg"), cls, length=r.config.length)
                if getattr(msg, "sender") != me:
                    raise Refused("PERMISSION_DENIED", "ticket", f"SecAggStep: {cls.__name__} names sender {msg.sender}, this device is {me}")
                receive = {"advertise": r.server.receive_advertise, "shares": r.server.receive_shares,
                           "masked": r.server.receive_masked_input, "unmask": r.server.receive_unmask}[op]
                receive(msg)
            except TamperedMessage as e:
                raise Refused("INVALID_ARGUMENT", "tampered", f"SecAggStep: {e}") from None
            except ReplayedMessage as e:
                raise Refused("ALREADY_EXISTS", "replay", f"SecAggStep: {e}") from None
            except ProtocolError as e:
                late = f"stage {r.stage!r}" in str(e) or "cannot" in str(e)
                raise Refused("FAILED_PRECONDITION" if late else "INVALID_ARGUMENT", "late" if late else "invalid",
                              f"SecAggStep: {e}") from None
            except SecAggAborted as e:
                await self._secagg_abort(str(e))
                return {"status": "abort", "message": str(e)}
            await self._secagg_advance()
            return {"status": "ok"}

    async def _secagg_advance(self) -> None:
        """Close due stages; finish (one server step) or abort the round.  Called with the lock held."""
        from flotilla.secure.errors import SecAggAborted
        r = self.secagg
        if r is None:
            return
        try:
            for _ in range(4):
                stage = r.stage
                if r.advance(self.clock(), self.settings.secagg_stage_s, self.settings.cohort):
                    mean, _ = r.finish(*(self.masked_release or ()))
                    await self._secagg_commit(r, mean)
                    return
                if r.stage == stage:
                    return
        except SecAggAborted as e:
            await self._secagg_abort(str(e))

    async def _secagg_abort(self, why: str) -> None:
        """No step: the model is unchanged; the round starts over with a new selection."""
        log.warning("round %d: %s; the round starts over", self.version, why)
        self.counters["secagg_aborted"] += 1
        if self.secagg is not None:
            self.secagg_aborted |= {m["ticket"].id for m in self.secagg.meta.values()}
        self.secagg = None
        for device, t in list(self.live.items()):
            if t.version == self.version:
                del self.live[device]
        self.selected_round = -1
        self.round_started = self.secagg_restart = self.clock()

    async def _secagg_commit(self, r, mean: torch.Tensor) -> None:
        """The unmasked weighted mean becomes this round's step; the ledger records who was in the sum
        (no delta, no norm: the server never had either)."""
        loop = asyncio.get_running_loop()
        included = sorted(r.server.u3)
        for pid in included:
            m = r.meta[pid]
            t = m["ticket"]
            weight = float(m["num_examples"]) if self.settings.weighting == "examples" else 1.0
            entry = {"seq": self.next_seq, "assignment": t.id, "device": t.device, "base_version": t.version,
                     "expires": t.expires, "version": self.version, "staleness": 0, "num_examples": m["num_examples"],
                     "weight": weight, "norm": None, "train_loss": m["train_loss"], "examples_seen": m["examples_seen"],
                     "file": f"secagg-{t.id}.none", "secagg_id": pid}
            await loop.run_in_executor(None, self.store.accept, entry)
            self.next_seq += 1
            self.buffer.append(entry)
            self.used[t.id] = (entry["seq"], t.version, t.expires)
            if (held := self.live.get(t.device)) is not None and held.id == t.id:
                del self.live[t.device]
            self.counters["accepted"] += 1
        self.counters["secagg_dropped"] += len(r.server.u1 | r.server.u2) - len(included)
        self.aggregator.reset()
        self.aggregator.add(mean, 1.0, "secagg")
        self.secagg = None
        self.secagg_aborted = set()
        await self._step()

    async def close_round_if_due(self) -> None:
        """Sync mode: apply a round whose deadline has passed, if it has ``min_updates``."""
        s = self.settings
        if self.masked is not None and self.secagg is not None and not self.done:
            async with self.lock:
                await self._secagg_advance()
            return
        if s.mode != "sync" or s.round_deadline_s is None or self.done:
            return
        if self.clock() - self.round_started < s.round_deadline_s:
            return
        async with self.lock:
            if self.clock() - self.round_started < s.round_deadline_s or self.done:
                return
            if len(self.buffer) >= s.min_updates:
                log.info("round %d: deadline reached with %d of %d updates; closing it", self.version, len(self.buffer), s.cohort)
                await self._step()
            else:
                log.warning("round %d: deadline reached with %d updates (< min_updates=%d); extending it",
                            self.version, len(self.buffer), s.min_updates)
                self.round_started = self.clock()

    async def _step(self) -> None:
        entries = self.buffer
        self.server_opt.step(self.weights, self.aggregator.result())
        self.version += 1
        seen = sum(int(e["examples_seen"]) for e in entries)
        self.examples_seen_total += seen
        meta = {"counters": dict(self.counters), "examples_seen": self.examples_seen_total}
        if self.privacy is not None:
            meta["dp"] = self.privacy.state()
        state = {"weights": self.weights}
        state.update({f"server_opt.{k}": v for k, v in self.server_opt.state.items()})
        self._served[self.version] = self._serialize()   # before any await: check-ins may hand it out
        await asyncio.get_running_loop().run_in_executor(None, self.store.step, self.version, entries, state, meta)
        self._prune(self.clock(), force=True)
        self.aggregator.reset()
        self.buffer = []
        self.round_started = self.clock()
        self._prune_used()
        record = {
            "round": self.version,
            "train_loss": sum(e["train_loss"] * e["examples_seen"] for e in entries) / max(seen, 1),
            "examples_seen": seen,
            "clients": len(entries),
            "staleness_mean": sum(e["staleness"] for e in entries) / max(len(entries), 1),
            "staleness_max": max((e["staleness"] for e in entries), default=0),
        }
        if self.privacy is not None:
            dp = self.privacy.report(self.version)
            record.update(epsilon=dp["epsilon"], delta=dp["delta"], clip_norm=dp["clip_norm"])
        log.info("step %d: %d updates, train_loss %.4f", self.version, len(entries), record["train_loss"])
        if self.on_step is not None:
            self.on_step(record)

    def _prune_used(self) -> None:
        """Forget nonces whose tickets would now be refused anyway (expired or too stale)."""
        now, limit = self.clock(), self.settings.staleness_limit
        self.used = {n: u for n, u in self.used.items()
                     if u[2] > now and (limit is None or self.version - u[1] <= limit)}

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._prune(self.clock(), force=True)
        rejected = {k.removeprefix("rejected."): v for k, v in self.counters.items() if k.startswith("rejected.")}
        return {
            "mode": self.settings.mode,
            "version": self.version,
            "round": self.version,
            "total_steps": self.settings.total_steps,
            "step_limit": self.step_limit,
            "done": self.done,
            "in_flight": len(self.live),
            "buffered": len(self.buffer),
            "accepted": self.counters["accepted"],
            "rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "assigned": self.counters["assigned"],
            "timed_out": self.counters["timed_out"],
            "weights_sha256": hashlib.sha256(self._served[self.version]).hexdigest(),
            **({} if self.privacy is None else {"privacy": self.privacy.report(self.version)}),
        }
