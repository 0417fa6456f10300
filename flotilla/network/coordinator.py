"""The server's decision logic, free of any networking: which uploads count, and when to step.

The gRPC layer (:mod:`flotilla.network.server`) authenticates the caller, streams bytes and maps
:class:`~flotilla.network.refusals.Refused` to a gRPC status; everything else happens here, on the
same algorithm objects as the simulator: an aggregator with the ``reset/add/count/result``
interface (:class:`~flotilla.core.aggregate.WeightedMean` per round, or the FedBuff buffer
:class:`~flotilla.core.fedbuff.FedBuff`), and core's server step,
:meth:`flotilla.core.fedbuff.FedBuffServer.step` (the :class:`~flotilla.core.server_opt.ServerOptimizer`
applied to the aggregate, then the version moves on).  Nothing here re-implements the step.

Pieces in modules of their own: tickets and the per-device assignment table
(:mod:`~flotilla.network.tickets`), which devices train (:mod:`~flotilla.network.selection`), the
sync secure-aggregation relay (:mod:`~flotilla.network.secagg`), user-level DP
(:mod:`~flotilla.network.dp`), durable state (:mod:`~flotilla.network.store`).

Modes
-----
``sync``  rounds as in :class:`~flotilla.sim.sync.SyncFedAvg`: up to ``ceil(cohort *
          over_selection)`` devices hold an assignment for the current round; the round closes at
          the first ``cohort`` accepted updates (later ones are refused as *late*), or at
          ``round_deadline_s`` if at least ``min_updates`` arrived.  One server step per round.
``async`` FedBuff: at most ``concurrency`` assignments in flight; each accepted update is added
          with its staleness weight ``s(tau)``; one server step every ``buffer_size`` updates.
          Updates staler than ``max_staleness`` are refused.

Every upload is checked before it touches state: ticket signature and owner, that it is the
device's live assignment (one per device, see :mod:`~flotilla.network.tickets`), expiry,
staleness, version (named by the upload, must match the ticket), dtype, shape, every number the
device reports (``num_examples``, ``train_loss``, ``examples_seen``), finite values, the norm
bound and the value bound (``max_update_abs``, on by default: no finite update can overflow the
sum).  A refusal is counted under its reason and logged; the model, buffer and ledger are
unchanged.  A refusal the device cannot fix by retrying (``never``, e.g. a norm over the bound)
spoils its assignment: the device's next check-in revokes it, so its slot goes to another device
(sync: the device sits out the round, until the round closes or its deadline passes) instead of
getting the same work back.

After every step the new model is checked: a step that makes it non-finite is rolled back (model,
server-optimizer and DP state restored, version unchanged), its updates are dropped with a ledger
line saying why (``nonfinite_step``), and the round starts over.  No non-finite model is served or
saved.

A retry of an assignment that is already in the ledger gets the same acceptance answer (ledger
seq and version) in any round, even after a restart, if it carries the same bytes (a different
payload under that ticket is a replay: ALREADY_EXISTS).

User-level DP (``privacy``, :mod:`flotilla.network.dp`): the aggregator is the privacy package's
DPFedAvg (sync) or DPFedBuff (async); epsilon is reported by step and ``done`` comes at the
budget.  Secure buffer (``sealed``, async only): the aggregator is a SecureFedBuff, assignment ids
are the buffer's nonces, and uploads are ciphertexts relayed into it (:meth:`_receive_sealed`).
Sealed updates buffered when the server stops cannot be opened by the restarted buffer (its key
lives only in memory): recovery drops them with a ledger line (``lost_on_restart``), removes their
files and counts them in ``status`` and metrics.

SCAFFOLD (``scaffold_population``, flotilla.algorithms.scaffold's ``ControlVariates``): the server
keeps ``c`` (in the snapshot as ``scaffold.c``), serves it after the weights of each version, takes
each device's ``delta c_i`` after its delta in the upload, adds those of accepted uploads only and
moves ``c`` by ``sum / N`` at every step; the devices keep their own ``c_i``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# zlib's CRC-32, computed ~6x faster (ISA-L, carry-less multiply): 0.13 vs 0.82 ms per 4 MB, the
# same values; it holds the GIL (~20 us per 256 KiB block), which spares a GIL hand-off per block
from isal.isal_zlib import crc32

from flotilla.core.aggregate import UpdateRejected, WeightedMean, check_update
from flotilla.core.client import client_seed
from flotilla.core.fedbuff import FedBuff, FedBuffServer
from flotilla.core.server_opt import ServerOptimizer
from flotilla.core.staleness import Staleness
from flotilla.network.refusals import NEVER, Refused
from flotilla.network.selection import Selection
from flotilla.network.store import StateStore
from flotilla.network.tickets import Answer, AssignmentTable, Ticket

log = logging.getLogger("flotilla.network")

__all__ = ["Coordinator", "CoordinatorSettings", "Refused", "Ticket", "Upload", "step_record"]

DEFAULT_MAX_UPDATE_ABS = 1e6
MAX_EXAMPLES_SEEN = 2**53  # exact in a float64 (metrics sum them)
# Refusals of what a device trained (it would send the same again): the assignment is revoked.
REVOKING = {"nonfinite", "norm", "value", "shape", "dtype", "examples", "numbers", "tampered"}


@dataclass(frozen=True)
class CoordinatorSettings:
    mode: str = "sync"  # "sync" | "async"
    total_steps: int = 10  # server steps (rounds / buffer flushes) to run
    seed: int = 0
    weighting: str = "examples"  # "examples" | "uniform"
    # sync
    cohort: int = 10
    over_selection: float = 1.3
    min_updates: int = 1
    round_deadline_s: float | None = 300.0  # None: a round waits for its cohort however long it takes
    # async
    concurrency: int = 10
    buffer_size: int = 10
    max_staleness: int | None = None
    staleness: Staleness = Staleness()
    normalize: str = "mean"  # FedBuff: "mean" or "sum" (see flotilla.core.fedbuff)
    # both
    assignment_timeout_s: float = 120.0
    max_update_norm: float | None = None
    max_update_abs: float | None = DEFAULT_MAX_UPDATE_ABS  # largest |value| of any coordinate of an update
    max_examples: int | None = None
    retry_after_s: float = 0.5
    selection_window_s: float = 1.0  # sync: collect check-ins this long, then sample the cohort
    secagg_stage_s: float = 30.0  # sync secure aggregation: a protocol stage closes this long after it opened

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
        for name in ("max_update_norm", "max_update_abs", "round_deadline_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"network.{name}: must be a positive finite number or null, got {v}")

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


@dataclass
class Upload:
    """A validated upload, ready to commit."""

    ticket: Ticket
    num_examples: int
    train_loss: float
    examples_seen: int
    delta: torch.Tensor | None  # None for a sealed upload (the server cannot read it)
    norm: float
    ephemeral_pk: bytes = b""  # sealed upload: the client's ephemeral X25519 key
    ciphertext: bytes = b""  # sealed upload: what the secure buffer opens
    digest: str | None = None  # fingerprint() of the uploaded bytes (answers retries; commit computes it if None)
    control: torch.Tensor | None = None  # SCAFFOLD: the device's delta c_i (uploaded after the delta)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: a NaN or inf anywhere makes the float32 sum non-finite, so a
    finite sum settles it in one cheap pass (a float64 sum took 1.7 ms per 1M weights, 12x); only a
    non-finite sum (which finite values can also give, by overflow) needs the element-wise check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def fingerprint(data) -> str:
    """A checksum of an upload's bytes, to tell a retry (the same bytes) from a replay (other bytes
    under an accepted ticket).  Not cryptographic on purpose: a match only makes the server repeat
    the answer it gave; it never changes state, so a forged match gains nothing."""
    view = memoryview(data)
    return fingerprint_text(crc32(view), view.nbytes)


# The receivers (gRPC's Upload and the data plane) compute the same fingerprint block by block as
# the bytes arrive, while each block is still in the cache (a pass over the whole body later costs
# about twice as much CPU on a busy machine).
FINGERPRINT_BLOCK = 256 << 10


def block_squares(block) -> float:
    """The sum of squares of one block of float32 bytes (a float32 inner product: one core, no
    BLAS threads).  The data plane's receivers add these up in float64, block by block, while each
    block is still in the cache (:func:`squared_norm` is the same sum over the same blocks): the
    norm costs ~0.1 ms per 4 MB there against ~0.3 ms for a pass over the whole body later."""
    f = np.frombuffer(block, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf or NaN is the answer (check_delta looks closer)
        return float(np.inner(f, f))


def squared_norm(delta: torch.Tensor) -> float:
    """:func:`block_squares` summed over ``delta``'s FINGERPRINT_BLOCK-byte blocks, in order: what
    a data-plane receiver computed as the body arrived, so the norm does not depend on the transport."""
    flat = delta.detach().reshape(-1).numpy()
    step = FINGERPRINT_BLOCK // 4
    return sum(block_squares(flat[i : i + step]) for i in range(0, flat.size, step))


def fingerprint_text(crc: int, size: int) -> str:
    """:func:`fingerprint` of ``size`` bytes whose running :func:`crc32` is ``crc``."""
    return f"crc32:{crc:08x}:{size}"


def step_record(version: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The training half of a step's metrics record, from the ledger entries it applied."""
    seen = sum(int(e["examples_seen"]) for e in entries)
    return {
        "round": version,
        "train_loss": sum(e["train_loss"] * e["examples_seen"] for e in entries) / max(seen, 1),
        "examples_seen": seen,
        "clients": len(entries),
        "staleness_mean": sum(e["staleness"] for e in entries) / max(len(entries), 1),
        "staleness_max": max((e["staleness"] for e in entries), default=0),
    }


class Coordinator:
    """Owns the global model (through core's FedBuffServer), the aggregator, the assignment table
    and the durable store."""

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
        uploads_per_device: int = 2,
        scaffold_population: int | None = None,
    ):
        self.numel = weights.numel()
        # SCAFFOLD (flotilla.algorithms.scaffold): the server's c and the sum of accepted delta c_i.
        # c goes out with every model download (weights then c) and each upload carries delta c_i
        # after the delta (shape [2, numel]); N = the enrolled devices.  The devices keep their c_i.
        self.variates = None
        if scaffold_population is not None:
            from flotilla.algorithms.scaffold import ControlVariates

            if sealed or masked is not None or privacy is not None:
                raise ValueError(
                    "client.algorithm: scaffold needs each device's delta c_i in the clear, outside "
                    "user-level DP and secure aggregation; remove one"
                )
            self.variates = ControlVariates(self.numel, max(1, scaffold_population), store=None)
        self.rows = 1 if self.variates is None else 2  # float32 vectors of numel in a download and an upload
        self.server_opt = server_opt
        self.settings = settings
        self.store = store
        if aggregator is None:
            # validate=False: check_delta has already run check_update on every upload.
            aggregator = (
                WeightedMean(self.numel, validate=False)
                if settings.mode == "sync"
                else FedBuff(
                    self.numel,
                    settings.buffer_size,
                    settings.staleness,
                    normalize=settings.normalize,
                    max_staleness=settings.max_staleness,
                    validate=False,
                )
            )
        self.aggregator = aggregator
        # core's server step: weights, version, the aggregator as its buffer, the server optimizer
        self.algo = FedBuffServer(weights, aggregator, server_opt)
        # User-level DP (flotilla.network.dp.NetworkPrivacy): epsilon, budget, mechanism state.
        self.privacy = privacy
        # Async secure buffer (flotilla.secure.fedbuff.SecureFedBuff): devices seal their update to
        # the buffer's key; the server relays ciphertexts it cannot read; only sums of >= K leave.
        self.sealed = sealed
        if sealed and (settings.mode != "async" or not hasattr(aggregator, "secure")):
            raise ValueError(
                "secure_aggregation: the network server runs the secure buffer (a SecureFedBuff) in async mode only"
            )
        # Sync secure aggregation (flotilla.network.secagg.SecAggParams): devices run the 4-round
        # masking protocol through the relay; the server holds only the sum of masked vectors.
        self.masked = masked
        self.masked_release = masked_release  # user-level DP: (noise_fn, expected cohort) for the unmasked sum
        if masked is not None and (settings.mode != "sync" or sealed or (privacy is None) != (masked_release is None)):
            raise ValueError(
                "secure_aggregation: the masking protocol runs in sync mode, without the secure buffer; "
                "with DP the noise is added to the unmasked sum (masked_release)"
            )
        self.relay = None
        if masked is not None:
            from flotilla.network.secagg import SecAggRelay

            self.relay = SecAggRelay(self)
        self.device_index = device_index
        self.on_step = on_step
        self.clock = clock
        self.secret = store.secret()
        self.lock = asyncio.Lock()

        self.table = AssignmentTable(secrets.token_hex(8), uploads_per_device)
        self.selection = Selection(settings.seed)
        self.buffer: list[dict[str, Any]] = []  # ledger entries of updates in the aggregator
        self.contributors: set[str] = set()  # devices with an update in the buffer
        self.counters: Counter[str] = Counter()  # accepted, rejected.<reason>, dropped.<reason>, assigned
        self.round_started = clock()
        self._pruned_at = 0.0
        self._looked_up: dict[str, Answer | None] = {}  # old tickets already looked up in the ledger file
        self.next_seq = 0
        self.examples_seen_total = 0
        self.last_step_s = 0.0
        self.remote = None  # scale-out (flotilla.network.partials.Hub): partial sums held by aggregators
        self._recover()
        self._served = {self.version: self._serialize()}  # model bytes of versions still in flight
        self._backup: torch.Tensor | None = None  # the weights before a step (its roll-back), reused

    # -- the model, through core's server ----------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return self.algo.weights

    @property
    def version(self) -> int:
        return self.algo.version

    @property
    def live(self) -> AssignmentTable:
        return self.table

    @property
    def secagg(self):
        """The current sync secure round (flotilla.network.secagg.SecAggRound), if any."""
        return None if self.relay is None else self.relay.round

    @property
    def grace_s(self) -> float:
        """How long after its expiry an accepted assignment's answer stays in memory."""
        return self.settings.assignment_timeout_s

    # -- start-up ---------------------------------------------------------------------------
    def _recover(self) -> None:
        rec = self.store.recover(self.numel * self.rows, sealed=self.sealed)
        for line in rec.repairs:
            log.warning("recovery: %s", line)
        if rec.tensors is not None:
            w = rec.tensors["weights"]
            if w.shape != self.weights.shape:
                raise ValueError(f"{self.store.path}: saved model has {w.numel()} weights, this model has {self.numel}")
            self.weights.copy_(w)
            self.server_opt.load_state_dict(
                {k.removeprefix("server_opt."): v for k, v in rec.tensors.items() if k.startswith("server_opt.")}
            )
            self.algo.version = int(rec.meta["version"])
            if self.variates is not None:
                c = rec.tensors.get("scaffold.c")
                if c is None or c.shape != self.variates.c.shape:
                    raise ValueError(
                        f"{self.store.path}: the saved state has no SCAFFOLD control variate scaffold.c "
                        f"for this model; it was not written by a server with client.algorithm: scaffold"
                    )
                self.variates.c.copy_(c)
            self.counters.update(rec.meta.get("counters", {}))
            self.examples_seen_total = int(rec.meta.get("examples_seen", 0))
            if self.privacy is not None:
                self.privacy.load(rec.meta.get("dp", {}))
        self.next_seq = rec.next_seq
        self.aggregator.reset()
        if self.sealed and rec.pending:
            # The buffer's key pair lives only in memory (an enclave's sealed storage is out of scope):
            # ciphertexts accepted before the restart cannot be opened by the new buffer.
            entries = [e for e, _ in rec.pending]
            why = (
                f"{len(entries)} sealed updates buffered before the restart cannot be opened "
                "(the secure buffer's key does not survive a restart)"
            )
            log.warning("recovery: %s; dropped (ledger 'dropped' line, lost_on_restart)", why)
            self.store.drop(entries, "lost_on_restart", why, self.version)
            rec.dropped["lost_on_restart"] = rec.dropped.get("lost_on_restart", 0) + len(entries)
        for entry, payload in [] if self.sealed else rec.pending:
            if payload is None:  # scale-out: its vector is in an aggregator's partial sum
                self._add(None, entry)
            else:
                self._add(payload[: self.numel], entry, payload[self.numel :] if self.variates is not None else None)
            self.buffer.append(entry)
            self.contributors.add(entry["device"])
        # ``accepted`` and ``dropped.*`` are authoritative in the ledger: recount them (a crash may
        # have lost the in-memory increments made after the last snapshot).
        self.counters["accepted"] = self.next_seq
        for reason, n in rec.dropped.items():
            self.counters[f"dropped.{reason}"] = n
        now = self.clock()
        for e in rec.accepted:
            if float(e["expires"]) + self.grace_s > now:
                self.table.answer(e["assignment"], self._answer_of(e))
        if rec.tensors is not None or rec.pending:
            log.info(
                "resumed at version %d with %d buffered updates (next ledger seq %d)",
                self.version,
                len(self.buffer),
                self.next_seq,
            )

    def _answer_of(self, entry: dict[str, Any]) -> Answer:
        return Answer(
            int(entry["seq"]),
            int(entry.get("reply_version", entry["version"])),
            entry.get("digest"),
            float(entry["expires"]) + self.grace_s,
        )

    async def start(self) -> None:
        """On the serving loop, before the first request: finish a step a crash interrupted (the
        buffer was full when the server stopped)."""
        if self.remote is not None:
            return  # scale-out: the serving loop takes it once the aggregators are back (they send partial sums)
        async with self.lock:
            if not self.done and self.buffer and self.aggregator.count >= self.settings.step_size:
                await self._step()

    def _serialize(self) -> bytes:
        if self.variates is not None:  # SCAFFOLD: the server's c of this version rides with its weights
            return torch.cat([self.weights, self.variates.c]).numpy().tobytes()
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
            raise Refused(
                "FAILED_PRECONDITION",
                "version_gone",
                f"model version {version} is no longer served (current {self.version}); check in again",
            )
        return data

    def _prune(self, now: float, force: bool = False) -> None:
        """Drop expired assignments (freeing their slots), old cooldowns, old answers and unneeded
        versions; at most every 0.1 s unless forced, since every check-in calls it."""
        if not force and now - self._pruned_at < 0.1:
            return
        self._pruned_at = now
        for device, t in self.table.items():
            if t.expires <= now:
                self.table.drop(device)
                self._cancel(t)
                self.counters["timed_out"] += 1
                log.info("assignment %s of %s timed out; its slot is free for another device", t.id[:8], device)
            elif self.settings.mode == "sync" and t.version != self.version:
                self.table.drop(device)
        self.selection.prune(now)
        self.table.prune_answers(now)
        needed = {t.version for t in self.table.values()} | {self.version}
        for v in [v for v in self._served if v not in needed]:
            del self._served[v]

    def rest_s(self, device: str) -> float:
        """Seconds before ``device`` may be given new work (async: its retry_after_s after an
        upload), for the upload's reply (UploadReply.rest_s); 0 when it may check in at once."""
        return max(0.0, self.selection.resting(device, self.clock()))

    def check_in(self, device: str) -> Ticket | float | None:
        """A ticket to train, seconds to wait, or ``None`` when training is finished."""
        if self.done:
            return None
        now = self.clock()
        self._prune(now)
        s, sel = self.settings, self.selection
        self._revoke_spoiled(device, now)
        if s.mode == "sync":
            if device in self.contributors or device in sel.excluded:
                return s.retry_after_s  # already contributed to this round, or refused for good in it
            opens = self.round_started + s.selection_window_s
            if now < opens:
                sel.candidates.add(device)
                return opens - now + 0.05
            if sel.selected_round != self.version:
                self._select(now)
            if (held := self.table.get(device)) is not None:
                return held  # this round's assignment, asked for again: the same one
            if len(self.table) + len(self.buffer) >= s.slots:
                return s.retry_after_s
        else:
            # One live assignment per device: asking again revokes the previous one.
            given_up = self.table.drop(device)
            if given_up is not None:
                self._cancel(given_up)
            if self.one_per_device and device in self.contributors:
                return s.retry_after_s  # DP: already in this buffer; wait for the release
            rest = sel.resting(device, now)
            if rest > 0:
                return rest
            if len(self.table) >= s.slots:
                return s.retry_after_s
        return self._issue(device, now)

    def _issue(self, device: str, now: float) -> Ticket:
        s = self.settings
        # Sync: the simulator's seed for (round, client).  Async: a device may train several times
        # from one version, so each assignment gets its own seed (as each simulated trip does).
        nth = self.version if s.mode == "sync" else self.counters["assigned"]
        # Secure buffer: the buffer issues the single-use nonce, and it is the assignment id.
        nonce = (
            self.aggregator.secure.assign(device, self.version).nonce.hex() if self.sealed else secrets.token_hex(16)
        )
        ticket = Ticket(
            nonce,
            device,
            self.version,
            self.version,
            client_seed(s.seed, nth, self.device_index(device)),
            now + s.assignment_timeout_s,
            self.table.boot,
        )
        revoked = self.table.issue(ticket)
        if revoked is not None:
            self._cancel(revoked)
        self.counters["assigned"] += 1
        return ticket

    def _select(self, now: float) -> None:
        """Sync: draw the round's devices from this window's check-ins (flotilla.network.selection)."""
        free = self.settings.slots - len(self.table) - len(self.buffer)
        for device in self.selection.draw(self.version, self.contributors | set(self.table.live), free):
            self._issue(device, now)

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
    def refuse(self, err: Refused, device: str, ticket: Ticket | None = None) -> Refused:
        """Count a refusal.  One the device cannot fix by retrying revokes its assignment: its slot
        goes to another device, and it does not get the same work again at once."""
        self.counters[f"rejected.{err.reason}"] += 1
        log.warning("refused %s: %s", device, err)
        if (
            ticket is not None
            and ticket.device == device
            and err.retry == NEVER
            and err.reason in REVOKING
            and self.table.spoil(ticket)
        ):
            log.info(
                "assignment %s of %s: its update cannot be accepted; the next check-in revokes it",
                ticket.id[:8],
                device,
            )
        return err

    def _revoke_spoiled(self, device: str, now: float) -> bool:
        """A check-in of a device whose live assignment was refused for good: revoke it, and (sync)
        keep the device out of this round, since the same work would train to the same refused
        update.  (Async: the check-in revokes it anyway, and the new work has a new seed.)"""
        held = self.table.get(device)
        if held is None or held.id not in self.table.spoiled:
            return False
        self.table.drop(device)
        self._cancel(held)
        if self.settings.mode == "sync":
            self.selection.excluded.add(device)
        return True

    def answer_for(self, ticket: Ticket) -> Answer | None:
        """The acceptance answer of an assignment already in the ledger, if it is one."""
        found = self.table.answered(ticket.id)
        if found is None and ticket.expires + self.grace_s <= self.clock():
            # answered long ago (or before a long outage): the ledger on disk knows.  A scan per
            # distinct old ticket at most (signed, of the caller's own device, rate-limited).
            if ticket.id not in self._looked_up:
                entry = self.store.find_accepted(ticket.id)
                self._looked_up[ticket.id] = None if entry is None else self._answer_of(entry)
                while len(self._looked_up) > 4096:
                    self._looked_up.pop(next(iter(self._looked_up)))
            found = self._looked_up[ticket.id]
        return found

    def check_header(
        self,
        device: str,
        ticket_text: str,
        base_version: int,
        dtype: str,
        shape: list[int],
        num_examples: int,
        train_loss: float = 0.0,
        examples_seen: int = 0,
    ) -> tuple[Ticket, Answer | None]:
        """Everything that can be judged before the delta's bytes arrive.  Returns the ticket, and
        its acceptance answer if the assignment is already in the ledger (a retry)."""
        ticket = Ticket.decode(ticket_text, self.secret)
        if ticket.device != device:
            raise Refused(
                "PERMISSION_DENIED", "ticket", f"upload refused: assignment {ticket.id[:8]} belongs to another device"
            )
        answer = self.answer_for(ticket)
        if answer is not None:
            return ticket, answer
        self._check_fresh(ticket)
        self.table.check_live(ticket)
        if base_version != ticket.version:
            raise Refused(
                "INVALID_ARGUMENT",
                "version",
                f"upload refused: it names model version {base_version} but assignment {ticket.id[:8]} was for version {ticket.version}",
            )
        if self.masked is not None:
            raise Refused(
                "INVALID_ARGUMENT",
                "dtype",
                "upload refused: this server runs synchronous secure aggregation; "
                "devices send masked inputs through SecAggStep, never a plaintext delta",
            )
        expected = "sealed" if self.sealed else "float32"
        if dtype != expected:
            why = (
                " (this server runs the secure buffer: seal the update to the buffer key sent with the assignment)"
                if self.sealed
                else ""
            )
            raise Refused("INVALID_ARGUMENT", "dtype", f"upload refused: dtype {dtype!r}, expected {expected!r}{why}")
        expected_shape = [self.numel] if self.variates is None else [2, self.numel]
        if list(shape) != expected_shape:
            why = "" if self.variates is None else " (SCAFFOLD: the delta, then delta c_i)"
            raise Refused(
                "INVALID_ARGUMENT",
                "shape",
                f"upload refused: shape {tuple(shape)}, expected {tuple(expected_shape)}{why}",
            )
        self.check_numbers(num_examples, train_loss, examples_seen, "upload refused")
        return ticket, None

    def check_numbers(self, num_examples, train_loss, examples_seen, where: str) -> None:
        """Every number a device reports with an update (plaintext, sealed or masked)."""
        cap = self.settings.max_examples or MAX_EXAMPLES_SEEN
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or not 1 <= num_examples <= cap:
            raise Refused(
                "INVALID_ARGUMENT",
                "examples",
                f"{where}: num_examples={num_examples!r}, must be an integer between 1 and "
                f"{self.settings.max_examples or '2^53'}",
            )
        if isinstance(train_loss, bool) or not isinstance(train_loss, (int, float)) or not math.isfinite(train_loss):
            raise Refused("INVALID_ARGUMENT", "numbers", f"{where}: train_loss={train_loss!r}, must be a finite number")
        if (
            isinstance(examples_seen, bool)
            or not isinstance(examples_seen, int)
            or not 0 <= examples_seen <= MAX_EXAMPLES_SEEN
        ):
            raise Refused(
                "INVALID_ARGUMENT",
                "numbers",
                f"{where}: examples_seen={examples_seen!r}, must be an integer between 0 and 2^53",
            )

    def _check_fresh(self, ticket: Ticket) -> None:
        """Replay, expiry and staleness: checked on the header and again at commit time."""
        if (a := self.table.answered(ticket.id)) is not None:
            raise Refused(
                "ALREADY_EXISTS",
                "replay",
                f"upload refused: replayed nonce, assignment {ticket.id[:8]} was already accepted as update #{a.seq}",
            )
        if self.done:
            why = " (privacy budget spent)" if self.privacy is not None and self.version >= self.privacy.limit else ""
            raise Refused(
                "FAILED_PRECONDITION", "late", f"upload refused: training finished at version {self.version}{why}"
            )
        if ticket.expires <= self.clock():
            raise Refused(
                "FAILED_PRECONDITION", "expired", f"upload refused: assignment {ticket.id[:8]} expired; check in again"
            )
        staleness = self.version - ticket.version
        if staleness < 0:
            raise Refused(
                "INVALID_ARGUMENT",
                "version",
                f"upload refused: version {ticket.version} is ahead of the server ({self.version})",
            )
        if self.settings.mode == "sync":
            if staleness > 0:
                raise Refused(
                    "FAILED_PRECONDITION",
                    "late",
                    f"upload refused: late, round {ticket.round} closed (the server is at round {self.version})",
                )
            if ticket.device in self.contributors:
                raise Refused(
                    "ALREADY_EXISTS",
                    "replay",
                    f"upload refused: device {ticket.device} already contributed to round {self.version}",
                )
        elif self.one_per_device and ticket.device in self.contributors:
            raise Refused(
                "ALREADY_EXISTS",
                "duplicate",
                f"upload refused: device {ticket.device} already has an update in this buffer "
                f"(user-level DP: one update per device per release)",
            )
        elif self.settings.max_staleness is not None and staleness > self.settings.max_staleness:
            raise Refused(
                "FAILED_PRECONDITION",
                "stale",
                f"upload refused: stale, trained from version {ticket.version}, server is at {self.version} "
                f"(staleness {staleness} > max_staleness {self.settings.max_staleness})",
            )

    def check_delta(self, delta: torch.Tensor, device: str, squares: float | None = None) -> float:
        """The update's norm, or a refusal.  ``squares``: its :func:`squared_norm`, when the receiver
        computed it as the bytes arrived."""
        is_vector = delta.dtype == torch.float32 and delta.shape == (self.numel,)
        norm = math.sqrt(squared_norm(delta) if squares is None else squares) if is_vector else math.nan
        # A NaN or inf anywhere makes the norm non-finite, so the full element-wise check (the
        # core's check_update, 3x the cost of the norm) runs only when the norm is not finite.
        if not math.isfinite(norm):
            try:
                check_update(delta, self.numel, f"upload from {device}")
            except UpdateRejected as e:
                raise Refused(
                    "INVALID_ARGUMENT", "nonfinite" if "non-finite" in str(e) else "invalid", f"upload refused: {e}"
                ) from None
            # finite values whose norm overflows float32: over any value bound
            norm = float(torch.linalg.vector_norm(delta.double()))
        bound = self.settings.max_update_norm
        if bound is not None and norm > bound:
            raise Refused(
                "INVALID_ARGUMENT", "norm", f"upload refused: update norm {norm:.4g} exceeds the bound {bound:.4g}"
            )
        # max |x| <= norm, so the value bound needs its own pass only when the norm exceeds it
        cap = self.settings.max_update_abs
        if cap is not None and norm > cap and (top := float(delta.abs().max())) > cap:
            raise Refused(
                "INVALID_ARGUMENT",
                "value",
                f"upload refused: a value of magnitude {top:.4g} exceeds network.max_update_abs={cap:.4g}",
            )
        return norm

    def check_control(self, control: torch.Tensor, device: str) -> None:
        """SCAFFOLD's delta c_i: the same value checks as an update (finite, within max_update_abs).
        No norm bound: delta c_i is a gradient-sized quantity, max_update_norm bounds model deltas."""
        top = float(control.abs().max()) if control.numel() else 0.0
        if not math.isfinite(top):
            raise Refused(
                "INVALID_ARGUMENT",
                "nonfinite",
                f"upload refused: upload from {device}: delta c_i has non-finite values",
            )
        cap = self.settings.max_update_abs
        if cap is not None and top > cap:
            raise Refused(
                "INVALID_ARGUMENT",
                "value",
                f"upload refused: a delta c_i value of magnitude {top:.4g} exceeds network.max_update_abs={cap:.4g}",
            )

    # -- committing ---------------------------------------------------------------------------
    async def commit(self, up: Upload, raw: bytes | memoryview) -> tuple[int, int]:
        """Make an upload count: durable first, then into the aggregator; maybe a server step.
        Returns ``(seq, version)``.  Callers must not cancel it half-way (the server shields it)."""
        self._check_fresh(up.ticket)
        self.table.check_live(up.ticket)
        loop = asyncio.get_running_loop()
        # Stage the bytes (the slow, fsync'd part) outside the lock, so uploads stage in parallel;
        # their digest (to tell a retry from a replay) in the same trip to the worker thread.
        name, up.digest = await loop.run_in_executor(None, self._stage, raw, up.digest)
        attempted = False  # once the ledger write starts the file must stay (recovery decides)
        try:
            async with self.lock:
                if (
                    (a := self.table.answered(up.ticket.id)) is not None
                    and a.digest is not None
                    and a.digest == up.digest
                ):
                    return a.seq, a.version  # the same upload, committed meanwhile: its answer
                self._check_fresh(up.ticket)  # the version may have moved while the bytes streamed
                self.table.check_live(up.ticket)  # and a new check-in may have revoked the assignment
                s = self.settings
                weight = float(up.num_examples) if s.weighting == "examples" else 1.0
                seq = self.next_seq
                if self.sealed:
                    self._receive_sealed(up)  # the buffer opens, validates and adds, or refuses
                    closes = self.aggregator.count >= s.step_size
                else:
                    closes = self.aggregator.count + 1 >= s.step_size
                entry = {
                    "seq": seq,
                    "assignment": up.ticket.id,
                    "device": up.ticket.device,
                    "base_version": up.ticket.version,
                    "expires": up.ticket.expires,
                    "version": self.version,
                    "staleness": self.version - up.ticket.version,
                    "num_examples": up.num_examples,
                    "weight": weight,
                    "norm": None if self.sealed else round(up.norm, 6),  # the server cannot see a sealed one
                    "train_loss": up.train_loss,
                    "examples_seen": up.examples_seen,
                    "file": name,
                    "digest": up.digest,
                    "reply_version": self.version + int(closes),
                }
                attempted = True
                await loop.run_in_executor(None, self.store.accept, entry)
                self.next_seq += 1
                if not self.sealed:
                    self._add(up.delta, entry, up.control)
                self.buffer.append(entry)
                self.contributors.add(up.ticket.device)
                self.table.settle(up.ticket)
                if s.mode == "async":
                    self.selection.rest(up.ticket.device, self.clock() + s.retry_after_s)
                self.counters["accepted"] += 1
                if self.aggregator.count >= s.step_size:
                    await self._step()
                self.table.answer(up.ticket.id, Answer(seq, self.version, up.digest, up.ticket.expires + self.grace_s))
                return seq, self.version
        finally:
            if not attempted:
                self.store.discard(name)

    def _stage(self, raw, digest: str | None = None) -> tuple[str, str]:
        return self.store.stage(raw), digest or fingerprint(raw)

    def _add(self, delta: torch.Tensor, entry: dict[str, Any], control: torch.Tensor | None = None) -> None:
        """Into the aggregator, exactly as the simulator adds (also used to rebuild the buffer on restart);
        SCAFFOLD: the accepted update's delta c_i into the running sum."""
        if delta is None:  # scale-out: the vector is in an aggregator's partial sum (gathered at the step)
            self.aggregator.total_weight += float(entry["weight"])
            self.aggregator.count += 1
            return
        if self.settings.mode == "sync":
            self.aggregator.add(delta, float(entry["weight"]), entry["device"])
        elif self.aggregator.add(delta, float(entry["weight"]), int(entry["staleness"]), entry["device"]) == 0.0:
            raise RuntimeError(f"update #{entry['seq']} was dropped by the buffer as too stale after it was accepted")
        if self.variates is not None:
            self.variates.add(control)

    def _receive_sealed(self, up: Upload) -> None:
        """Relay a ciphertext into the secure buffer; its refusals leave the buffer unchanged."""
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
            raise Refused(
                "FAILED_PRECONDITION",
                "unknown_assignment",
                f"upload refused: {e} (the assignment was given up, timed out or issued before a server "
                f"restart); check in again",
            ) from None
        except DuplicateContribution as e:
            raise Refused("ALREADY_EXISTS", "duplicate", f"upload refused: {e}") from None
        except UpdateRejected as e:
            raise Refused(
                "INVALID_ARGUMENT", "norm" if "max_norm" in str(e) else "invalid", f"upload refused: {e}"
            ) from None

    # -- sync secure aggregation (the relay: flotilla.network.secagg.SecAggRelay) ---------------
    def continues_request(self, device: str) -> bool:
        """Whether ``device`` is midway through a SecAggStep request sent in parts."""
        return self.relay is not None and self.relay.continues_request(device)

    async def secagg_step(self, device: str, req: dict[str, Any]) -> dict[str, Any]:
        if self.relay is None:
            raise Refused(
                "FAILED_PRECONDITION", "invalid", "SecAggStep: this server does not run synchronous secure aggregation"
            )
        return await self.relay.step(device, req)

    async def close_round_if_due(self) -> None:
        """Sync mode: apply a round whose deadline has passed, if it has ``min_updates``."""
        s = self.settings
        if self.remote is not None:
            await self.remote.step_if_due()
            return
        if self.relay is not None and self.relay.round is not None and not self.done:
            async with self.lock:
                await self.relay.advance()
            return
        if s.mode != "sync" or s.round_deadline_s is None or self.done:
            return
        if self.clock() - self.round_started < s.round_deadline_s:
            return
        async with self.lock:
            if self.clock() - self.round_started < s.round_deadline_s or self.done:
                return
            if len(self.buffer) >= s.min_updates:
                log.info(
                    "round %d: deadline reached with %d of %d updates; closing it",
                    self.version,
                    len(self.buffer),
                    s.cohort,
                )
                await self._step()
            else:
                log.warning(
                    "round %d: deadline reached with %d updates (< min_updates=%d); extending it",
                    self.version,
                    len(self.buffer),
                    s.min_updates,
                )
                self.round_started = self.clock()
                self.selection.new_round()  # devices refused for good may try again

    async def _step(self) -> None:
        """Core's server step on the aggregate; rolled back if it makes the model non-finite."""
        started = time.perf_counter()
        entries = self.buffer
        if self._backup is None:  # one preallocated copy (a fresh 4 MB clone each step costs its page faults)
            self._backup = torch.empty_like(self.weights)
        saved = (
            self._backup.copy_(self.weights),
            self.server_opt.state_dict(),
            None if self.privacy is None else self.privacy.state(),
            None if self.variates is None else self.variates.c.clone(),
        )
        if self.remote is not None:
            await self.remote.gather(entries)  # scale-out: the aggregators' partial sums into the buffer
        self.algo.step()  # server_opt.step(weights, aggregator.result()); reset; version += 1
        if self.variates is not None:
            self.variates.release()  # SCAFFOLD: c += sum(accepted delta c_i) / N
        if not all_finite(self.weights) or (self.variates is not None and not all_finite(self.variates.c)):
            await self._roll_back(entries, saved)
            return
        meta_seen = sum(int(e["examples_seen"]) for e in entries)
        self.examples_seen_total += meta_seen
        meta = {"counters": dict(self.counters), "examples_seen": self.examples_seen_total}
        if self.privacy is not None:
            meta["dp"] = self.privacy.state()
        state = {"weights": self.weights}
        state.update({f"server_opt.{k}": v for k, v in self.server_opt.state.items()})
        if self.variates is not None:
            state["scaffold.c"] = self.variates.c
        self._served[self.version] = self._serialize()  # before any await: check-ins may hand it out
        await asyncio.get_running_loop().run_in_executor(None, self.store.step, self.version, entries, state, meta)
        self._new_round()
        record = step_record(self.version, entries)
        if self.privacy is not None:
            record.update(self.privacy.metrics(self.version))
        if self.sealed:
            record["lost_on_restart"] = self.counters["dropped.lost_on_restart"]
        if self.variates is not None:
            record["scaffold_c_norm"] = float(self.variates.c.norm())
        self.last_step_s = time.perf_counter() - started  # the step and its durable write (watchers' latency)
        log.info("step %d: %d updates, train_loss %.4f", self.version, len(entries), record["train_loss"])
        if self.on_step is not None:
            self.on_step(record)

    async def _roll_back(self, entries: list[dict[str, Any]], saved) -> None:
        weights, opt_state, dp_state, c = saved
        bad = self.version
        self.weights.copy_(weights)
        if c is not None:
            self.variates.c.copy_(c)
        self.server_opt.load_state_dict(opt_state)
        if dp_state is not None:
            self.privacy.load(dp_state)
        self.algo.version -= 1
        why = (
            f"step {bad} made the model non-finite (aggregate of {len(entries)} updates, then the "
            f"{self.server_opt.spec.name} step); rolled back, the model stays at version {self.version}"
        )
        log.error("%s; its updates are dropped (ledger 'dropped' line, nonfinite_step)", why)
        await asyncio.get_running_loop().run_in_executor(None, self.store.drop, entries, "nonfinite_step", why, bad)
        self.counters["dropped.nonfinite_step"] += len(entries)
        self.counters["rolled_back_steps"] += 1
        self._new_round()

    def _new_round(self) -> None:
        """After a step (or a rolled-back one): empty buffer, a new round and selection."""
        self.aggregator.reset()
        if self.variates is not None:
            self.variates.discard()
        self.buffer = []
        self.contributors = set()
        self.round_started = self.clock()
        self.selection.new_round()
        self._prune(self.clock(), force=True)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._prune(self.clock(), force=True)
        rejected = {k.removeprefix("rejected."): v for k, v in self.counters.items() if k.startswith("rejected.")}
        dropped = {k.removeprefix("dropped."): v for k, v in self.counters.items() if k.startswith("dropped.") and v}
        return {
            "mode": self.settings.mode,
            "version": self.version,
            "round": self.version,
            "total_steps": self.settings.total_steps,
            "step_limit": self.step_limit,
            "done": self.done,
            "in_flight": len(self.table),
            "uploading": len(self.table.in_flight),
            "buffered": len(self.buffer),
            "accepted": self.counters["accepted"],
            "rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "dropped_by_reason": dropped,
            "lost_on_restart": self.counters["dropped.lost_on_restart"],
            "rolled_back_steps": self.counters["rolled_back_steps"],
            "assigned": self.counters["assigned"],
            "timed_out": self.counters["timed_out"],
            "weights_sha256": hashlib.sha256(
                self._served[self.version] if self.variates is None else self._served[self.version][: 4 * self.numel]
            ).hexdigest(),
            **({} if self.privacy is None else {"privacy": self.privacy.report(self.version)}),
        }
