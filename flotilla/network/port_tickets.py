"""One-use tickets of the sealed port (flotilla/network/sealed_downloads.py, sealed_uploads.py).

A ticket is 16 random bytes that the TLS check-in reply hands a device; it names a value (a sealed
version to fetch, an upload's key) until the assignment expires, and buys it once.  A device holds
one live ticket of each kind: a new one revokes its last.  Expired tickets are dropped at most once
a second, as tickets are issued.  Issued on the server's loop, redeemed on the port's threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

TICKET_BYTES = 16


class PortTickets:
    def __init__(self, clock=time.monotonic, used: str = "used", on_prune: Callable[[list], None] | None = None):
        self.clock = clock
        self.counts = {"offered": 0, used: 0, "refused": 0}  # ``used``: the count's name ("sent" for downloads)
        self._used = used
        self._on_prune = on_prune  # called with the values still named, after a prune (lock held)
        self._tickets: dict[bytes, tuple[Any, float]] = {}  # ticket -> (value, expires at)
        self._by_device: dict[str, bytes] = {}  # a device's one live ticket
        self._lock = threading.Lock()
        self._pruned_at = 0.0

    def issue(self, device: str, value, expires_in_s: float) -> bytes:
        """A ticket for ``value``, good once within ``expires_in_s`` seconds; revokes ``device``'s last."""
        now = self.clock()
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._tickets.pop(self._by_device.get(device, b""), None)
            self._tickets[ticket] = (value, now + expires_in_s)
            self._by_device[device] = ticket
            self.counts["offered"] += 1
            if now - self._pruned_at >= 1.0:
                self._prune(now)
        return ticket

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        for t in [t for t, (_, expires) in self._tickets.items() if expires <= now]:
            del self._tickets[t]
        for d in [d for d, t in self._by_device.items() if t not in self._tickets]:
            del self._by_device[d]
        if self._on_prune is not None:
            self._on_prune([value for value, _ in self._tickets.values()])

    def redeem(self, ticket: bytes):
        """The value a ticket names (once), or None."""
        with self._lock:
            value, expires = self._tickets.pop(ticket, (None, 0.0))
            if value is None or expires <= self.clock():
                self.counts["refused"] += 1
                return None
            self.counts[self._used] += 1
            return value

    def clear(self) -> None:
        """Forget every ticket (the port stopped: they buy nothing now)."""
        with self._lock:
            self._tickets.clear()
            self._by_device.clear()

    def __len__(self) -> int:
        return len(self._tickets)
