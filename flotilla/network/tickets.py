"""Assignments: signed tickets, and the per-device assignment table that decides which tickets are live.

Ticket
------
An assignment travels as a stateless signed *ticket*: HMAC-SHA256 (key ``secret.key`` in the state
directory) over its id (a nonce), device, model version, round, seed, expiry and the *boot* id of
the server process that issued it.  The signature proves the server issued it; whether it still
counts is the table's decision.

The assignment table
--------------------
One live assignment per device (``AssignmentTable.live``):

* a check-in either returns the device's live assignment (sync: the same round's work) or
  revokes it and issues a new one (async); a revoked ticket is refused afterwards
  (FAILED_PRECONDITION ``revoked``), so checking in six times yields one usable ticket, not six;
* an assignment whose update was refused for good (``never``: norm or value over the bound,
  non-finite, bad numbers) is *spoiled*: the device may still upload a good update under it, but
  its next check-in revokes it and (sync) keeps the device out of the round, instead of handing
  back the same work, which would train to the same refused update;
* an upload must name the device's live assignment.  Tickets of an earlier server process
  (another ``boot``) have no table entry after a restart: a device's first such ticket is adopted
  as its live assignment, but only if the device has had no assignment since the restart;
* at most one upload per assignment is in flight, and at most ``uploads_per_device`` per device
  (:meth:`begin_upload`), so one device cannot hold the server's upload slots;
* answers: the reply given to every accepted assignment (ledger seq, version, checksum of the bytes)
  is kept until ``expires + grace`` (then the ledger on disk answers), so a retry of an
  assignment that is in the ledger gets the same acceptance answer whatever round the server is
  in now, and a different payload under the same ticket is refused as a replay.

Memory: live and in-flight entries are bounded by the devices working now; answers by the
assignments of the last ``grace`` seconds; ``renewed`` by the enrolled devices (token table).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from flotilla.network.refusals import Refused


@dataclass(frozen=True)
class Ticket:
    id: str  # the per-assignment nonce
    device: str
    version: int
    round: int
    seed: int
    expires: float  # unix time
    boot: str = ""  # the issuing server process (tickets survive a restart; the table does not)

    def encode(self, secret: bytes) -> str:
        # vars(): the fields in order, as asdict gives them for these flat values, at a tenth of its cost
        payload = base64.urlsafe_b64encode(json.dumps(vars(self), separators=(",", ":")).encode()).decode()
        return payload + "." + hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def decode(text: str, secret: bytes) -> Ticket:
        payload, _, sig = text.rpartition(".")
        good = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
        if not payload or not hmac.compare_digest(sig, good):
            raise Refused(
                "PERMISSION_DENIED", "ticket", "upload refused: the assignment ticket is not one this server signed"
            )
        try:
            return Ticket(**json.loads(base64.urlsafe_b64decode(payload)))
        except (ValueError, TypeError) as e:  # signed but unreadable: a server bug, not an attack
            raise Refused("INVALID_ARGUMENT", "ticket", f"upload refused: unreadable ticket ({e})") from None


@dataclass(frozen=True)
class Answer:
    """What an accepted assignment was told, kept to answer its retries the same way."""

    seq: int
    version: int
    digest: str | None  # checksum of the uploaded bytes (None: not recorded, e.g. a secure round)
    keep_until: float


class AssignmentTable:
    def __init__(self, boot: str, uploads_per_device: int = 2):
        self.boot = boot
        self.uploads_per_device = uploads_per_device
        self.live: dict[str, Ticket] = {}  # device -> its one live assignment
        self.spoiled: set[str] = set()  # live assignment ids whose update was refused for good
        self.renewed: set[str] = set()  # devices given (or adopting) an assignment since this boot
        self.answers: OrderedDict[str, Answer] = OrderedDict()  # assignment id -> its acceptance answer, oldest first
        self.in_flight: set[str] = set()  # assignment ids with an upload streaming
        self.per_device: Counter[str] = Counter()  # device -> uploads streaming

    # -- live assignments ---------------------------------------------------------------------------
    def get(self, device: str) -> Ticket | None:
        return self.live.get(device)

    def issue(self, ticket: Ticket) -> Ticket | None:
        """Make ``ticket`` the device's live assignment; returns the one it revokes, if any."""
        old = self.live.get(ticket.device)
        self.live[ticket.device] = ticket
        self.renewed.add(ticket.device)
        return old

    def drop(self, device: str) -> Ticket | None:
        """Revoke the device's live assignment (given up, timed out, refused, round over)."""
        t = self.live.pop(device, None)
        if t is not None:
            self.spoiled.discard(t.id)
        return t

    def spoil(self, ticket: Ticket) -> bool:
        """Mark the device's live assignment as refused for good (its next check-in revokes it)."""
        held = self.live.get(ticket.device)
        if held is None or held.id != ticket.id:
            return False
        self.spoiled.add(ticket.id)
        return True

    def settle(self, ticket: Ticket) -> None:
        """The assignment's update was accepted: it is no longer live (its answer is kept)."""
        if (held := self.live.get(ticket.device)) is not None and held.id == ticket.id:
            self.drop(ticket.device)

    def check_live(self, ticket: Ticket) -> None:
        """Refuse a ticket that is not the device's live assignment (adopting a pre-restart one)."""
        held = self.live.get(ticket.device)
        if held is not None and held.id == ticket.id:
            return
        if ticket.boot != self.boot and held is None and ticket.device not in self.renewed:
            self.live[ticket.device] = ticket  # issued before the restart: the device's first one counts
            self.renewed.add(ticket.device)
            return
        raise Refused(
            "FAILED_PRECONDITION",
            "revoked",
            f"upload refused: assignment {ticket.id[:8]} is not this device's live assignment "
            "(a later check-in replaced it, it was given up or it timed out); check in again",
        )

    def __len__(self) -> int:
        return len(self.live)

    def __contains__(self, device: str) -> bool:
        return device in self.live

    def items(self):
        return list(self.live.items())

    def values(self):
        return list(self.live.values())

    # -- uploads in flight ---------------------------------------------------------------------------
    def begin_upload(self, ticket: Ticket) -> None:
        if ticket.id in self.in_flight:
            raise Refused(
                "RESOURCE_EXHAUSTED",
                "busy",
                f"upload refused: an upload of assignment {ticket.id[:8]} "
                "is already in progress; retry when it has ended",
                retry_after_s=1.0,
            )
        if self.per_device[ticket.device] >= self.uploads_per_device:
            raise Refused(
                "RESOURCE_EXHAUSTED",
                "busy",
                f"upload refused: {ticket.device} already has {self.uploads_per_device} uploads in progress",
                retry_after_s=1.0,
            )
        self.in_flight.add(ticket.id)
        self.per_device[ticket.device] += 1

    def end_upload(self, ticket: Ticket) -> None:
        self.in_flight.discard(ticket.id)
        self.per_device[ticket.device] -= 1
        if self.per_device[ticket.device] <= 0:
            del self.per_device[ticket.device]

    # -- answers ------------------------------------------------------------------------------------
    def answer(self, assignment: str, answer: Answer) -> None:
        self.answers[assignment] = answer

    def answered(self, assignment: str) -> Answer | None:
        return self.answers.get(assignment)

    def prune_answers(self, now: float) -> None:
        """Drop answers past ``keep_until``, oldest first, stopping at the first one still kept.
        Answers come roughly in ``keep_until`` order (a ticket's expiry + grace), so one kept
        behind a later one stays a little longer, which changes nothing: past ``keep_until`` the
        ledger gives the same answer.  O(dropped) per call: rebuilding the whole table 10 times a
        second grew with the answers held (75 trips/s, a 600 s timeout + 600 s grace: ~90,000)."""
        answers = self.answers
        while answers:
            first = next(iter(answers))
            if answers[first].keep_until > now:
                return
            answers.popitem(last=False)

    def state(self) -> dict[str, Any]:
        return {"live": len(self.live), "uploading": len(self.in_flight), "answers": len(self.answers)}
