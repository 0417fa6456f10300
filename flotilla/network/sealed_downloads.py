"""Sealed downloads: the model over plain TCP, encrypted once per version (network.sealed_download_port).

Why: every device that trains from a version downloads the same bytes, yet TLS encrypts them again
for each connection; for a 1M-parameter model that is most of a trip's transfer cost on the server
(docs/deployment.md, "Sealed downloads").  Here the server seals each version's download once, with
AES-256-GCM under a fresh random key, in 1 MiB chunks whose associated data binds the version, the
chunk's position and the end (so chunks cannot be reordered, spliced across versions or cut
short), and hands each device an offer inside its TLS check-in reply (pb.SealedDownload):

* the version's key, so what crosses the plain connection is unreadable to anyone the server did
  not give work;
* the SHA-256 of the plaintext: every trained device holds the key, so the tag alone would let one
  device that can tamper with another's traffic forge a model that decrypts; the digest, which
  only TLS carries, cannot be forged;
* a random 16-byte ticket, good for one fetch until the assignment expires, so the port sends
  nothing to a connection the server did not invite (no bandwidth for strangers) and nothing twice.

The wire format is in flotilla.proto (message SealedDownload).  The device checks tags and digest
(:func:`receive`) and on any failure downloads over TLS instead (flotilla/network/client.py), so
the worst a network attacker achieves is what dropping packets achieves: the slower path.

With network.sealed_uploads the same port takes uploads too (flotilla/network/sealed_uploads.py:
a key per assignment, and the data plane's own upload handler); without it uploads travel over TLS.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import mmap
import os
import secrets
import struct
import time
import weakref

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flotilla.network import sealed_uploads
from flotilla.network.listener import ThreadedListener, _Conn, _Gone
from flotilla.network.wire import pb, read_exact

log = logging.getLogger("flotilla.network")

MAGIC = b"FLSD"
TICKET_BYTES = 16
KEY_BYTES = 32
CHUNK = 1 << 20  # plaintext bytes per sealed chunk
TAG = 16
_LENGTH = struct.Struct(">Q")
_AAD = struct.Struct(">8sqQ?")


class SealedDownloadError(Exception):
    """A sealed download that must not be used (refused, cut short, or failing its tag or digest)."""


def chunks(total: int) -> int:
    """Sealed chunks of a ``total``-byte download (at least one: an empty download's tag marks its end)."""
    return max(1, -(-total // CHUNK))


def sealed_size(total: int) -> int:
    return total + TAG * chunks(total)


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")  # the key is fresh per version, so chunk indexes never repeat under it


def _aad(version: int, i: int, last: bool) -> bytes:
    return _AAD.pack(b"flotilla", version, i, last)


def seal_into(version: int, data, out: memoryview) -> tuple[bytes, bytes]:
    """Seal ``version``'s download bytes ``data`` into ``out`` (``sealed_size(len(data))`` writable
    bytes); returns ``(key, sha256 of data)``."""
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    aead, view, n = AESGCM(key), memoryview(data).cast("B"), chunks(len(data))
    for i in range(n):
        part = view[i * CHUNK : (i + 1) * CHUNK]
        at = i * (CHUNK + TAG)
        aead.encrypt_into(_nonce(i), part, _aad(version, i, i == n - 1), out[at : at + len(part) + TAG])
    return key, hashlib.sha256(view).digest()


def seal(version: int, data) -> tuple[bytes, bytes, bytes]:
    """``(key, sealed bytes, sha256 of data)``: :func:`seal_into` a new buffer."""
    out = bytearray(sealed_size(len(data)))
    key, digest = seal_into(version, data, memoryview(out))
    return key, bytes(out), digest


def usable(offer) -> bool:
    """Whether a check-in's pb.SealedDownload is well formed (else the device ignores it)."""
    return (
        0 < offer.port <= 65535
        and len(offer.ticket) == TICKET_BYTES
        and len(offer.key) == KEY_BYTES
        and len(offer.sha256) == 32
        and offer.total_bytes >= 0
    )


def _read_exact(sock, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise SealedDownloadError(f"the connection closed after {got} of {len(view)} bytes")
        got += n


def receive(sock, offer, version: int, into) -> int:
    """Fetch ``offer`` (a pb.SealedDownload for ``version``) over the connected plain socket ``sock``
    into ``into(total_bytes) -> writable memoryview``; returns the byte count.  Raises
    :class:`SealedDownloadError` (or OSError) unless every tag and the digest check out; the
    view may then hold garbage, to be overwritten by a TLS download."""
    sock.sendall(MAGIC + bytes(offer.ticket))
    head = bytearray(_LENGTH.size)
    _read_exact(sock, memoryview(head))
    (size,) = _LENGTH.unpack(head)
    total = offer.total_bytes
    if size == 0:
        raise SealedDownloadError("the port refused the ticket (unknown, used or expired)")
    if size != sealed_size(total):
        raise SealedDownloadError(f"the port sends {size} bytes; {total} bytes sealed are {sealed_size(total)}")
    view = into(total)
    opener = _Opener(offer, version)
    chunk = memoryview(bytearray(min(CHUNK, total) + TAG))
    for i in range(opener.n):
        part = view[i * CHUNK : min((i + 1) * CHUNK, total)]
        sealed = chunk[: len(part) + TAG]
        _read_exact(sock, sealed)
        opener.open(i, sealed, part)
    opener.check()
    return total


def unseal(offer, version: int, sealed, out: memoryview) -> None:
    """:func:`receive`'s checks on sealed bytes already in memory (``out``: total_bytes writable)."""
    if len(sealed) != sealed_size(offer.total_bytes) or len(out) != offer.total_bytes:
        raise SealedDownloadError(f"{len(sealed)} sealed bytes for a {offer.total_bytes}-byte download")
    opener, sealed = _Opener(offer, version), memoryview(sealed)
    for i in range(opener.n):
        part = out[i * CHUNK : (i + 1) * CHUNK]
        opener.open(i, sealed[i * (CHUNK + TAG) : i * (CHUNK + TAG) + len(part) + TAG], part)
    opener.check()


class _Opener:
    """Opens an offer's chunks in order into their place, hashing the plaintext as it goes."""

    def __init__(self, offer, version: int):
        self.aead, self.version, self.offer = AESGCM(bytes(offer.key)), version, offer
        self.digest, self.n = hashlib.sha256(), chunks(offer.total_bytes)

    def open(self, i: int, sealed, part: memoryview) -> None:
        try:
            self.aead.decrypt_into(_nonce(i), sealed, _aad(self.version, i, i == self.n - 1), part)
        except InvalidTag:
            raise SealedDownloadError(f"chunk {i} of version {self.version} fails its tag (tampered?)") from None
        self.digest.update(part)

    def check(self) -> None:
        if not hmac.compare_digest(self.digest.digest(), bytes(self.offer.sha256)):
            raise SealedDownloadError(
                f"version {self.version}'s bytes do not match the digest the server gave over TLS"
            )


class _Files:
    """Anonymous in-memory files (memfd) for sealed versions, each mapped into memory, and kept
    for the next version once no ticket or send holds theirs: a version is sealed straight into a
    file's pages that already exist (a fresh file's pages cost their allocation and zeroing, ~1.2 ms
    per 4 MB written into them; sealing into a fresh file's mapping measured no better).  At most
    ``keep`` idle files are kept; ``close`` closes them and every one given back later."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._idle: collections.deque = collections.deque()  # (fd, mapping); appended from any thread
        self._closed = False

    def take(self, size: int) -> tuple[int, mmap.mmap]:
        while self._idle:
            try:
                fd, mapping = self._idle.pop()
            except IndexError:  # taken meanwhile: never, offers run on one thread
                break
            if len(mapping) == size:
                return fd, mapping
            self._discard(fd, mapping)
        fd = os.memfd_create("flotilla-sealed", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return fd, mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def give(self, fd: int, mapping: mmap.mmap) -> None:
        """Back from an entry no ticket or send holds any more (its finalizer, on any thread)."""
        if self._closed or len(self._idle) >= self.keep:
            self._discard(fd, mapping)
        else:
            self._idle.append((fd, mapping))

    @staticmethod
    def _discard(fd: int, mapping: mmap.mmap) -> None:
        mapping.close()
        os.close(fd)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._discard(*self._idle.pop())


class _Sealed:
    """A version's download, sealed once.  On Linux it is kept in an anonymous in-memory file
    (memfd, from the port's :class:`_Files`) and sent with sendfile: the kernel takes the file's
    pages without a copy into the socket (the port's threads: 1.1 -> 0.45 ms of server CPU per 4 MB
    sent, by schedstat).  Elsewhere it is sealed into ``scratch`` (the port's buffer) and kept as bytes."""

    def __init__(self, version: int, data, files: _Files | None, scratch: bytearray):
        self.version = version
        self.data = data  # the bytes object sealed (an entry counts only while the server serves that very object)
        self.size = sealed_size(len(data))
        self.fd, self.sealed = -1, None
        if files is not None:
            self.fd, mapping = files.take(self.size)
            weakref.finalize(self, files.give, self.fd, mapping)  # once no ticket or send holds the entry
            with memoryview(mapping) as out:
                self.key, self.sha256 = seal_into(version, data, out)
        else:
            with memoryview(scratch) as out:  # at least ``size`` bytes (the port grows it)
                self.key, self.sha256 = seal_into(version, data, out[: self.size])
                self.sealed = bytes(out[: self.size])

    def send(self, sock) -> None:
        if self.fd < 0:
            sock.sendall(self.sealed)
            return
        sent = 0
        while sent < self.size:
            sent += os.sendfile(sock.fileno(), self.fd, sent, self.size - sent)


class SealedDownloadPort(ThreadedListener):
    """The server's side: :meth:`offer` (on the server's loop, for a TRAIN check-in) seals a
    version on its first offer and issues a ticket; the port's threads answer tickets."""

    def __init__(
        self,
        *,
        on_sent=None,
        uploads=None,
        clock=time.monotonic,
        **limits,  # ThreadedListener's: max_connections and the three timeouts
    ):
        super().__init__(name="sealed downloads", **limits)
        self.clock = clock
        self.on_sent = on_sent  # called with the plaintext bytes of each fetch sent (from the port's thread)
        # sealed uploads (flotilla.network.sealed_uploads): (its UploadTickets, serve(conn) that runs
        # the upload on the accepted channel: the data plane's serve_sealed); None: refused
        self.uploads = uploads
        self.counts = {"offered": 0, "sent": 0, "refused": 0, "sealed_versions": 0}
        self._versions: dict[int, _Sealed] = {}
        self._tickets: dict[bytes, tuple[_Sealed, float]] = {}  # ticket -> (what it buys, expires at)
        self._by_device: dict[str, bytes] = {}  # a device's one live ticket (a new offer replaces it)
        self._pruned_at = 0.0
        self._scratch = bytearray()  # without memfd: sealing's buffer, reused (offers run on one thread: the loop)
        self._files = _Files() if hasattr(os, "memfd_create") else None

    def offer(self, device: str, version: int, data, expires_in_s: float) -> pb.SealedDownload:
        """An offer of ``version``'s download bytes ``data`` to ``device``, good for one fetch
        within ``expires_in_s`` seconds (the assignment's life)."""
        now = self.clock()
        with self._lock:
            entry = self._versions.get(version)
        if entry is None or entry.data is not data:  # sealed outside the lock: the port keeps serving
            if self._files is None and len(self._scratch) < sealed_size(len(data)):
                self._scratch = bytearray(sealed_size(len(data)))
            entry = _Sealed(version, data, self._files, self._scratch)
            self.counts["sealed_versions"] += 1
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            self._versions[version] = entry
            self._tickets.pop(self._by_device.get(device, b""), None)
            self._tickets[ticket] = (entry, now + expires_in_s)
            self._by_device[device] = ticket
            self.counts["offered"] += 1
            if now - self._pruned_at >= 1.0:
                self._prune(now)
        return pb.SealedDownload(
            port=self.port or 0, ticket=ticket, key=entry.key, sha256=entry.sha256, total_bytes=len(data)
        )

    def _prune(self, now: float) -> None:
        """Drop expired tickets, and sealed versions no live ticket names (called with the lock held)."""
        self._pruned_at = now
        for t in [t for t, (_, expires) in self._tickets.items() if expires <= now]:
            del self._tickets[t]
        live = set(self._tickets)
        for d in [d for d, t in self._by_device.items() if t not in live]:
            del self._by_device[d]
        wanted = {e.version for e, _ in self._tickets.values()}
        for v in [v for v in self._versions if v not in wanted]:
            del self._versions[v]

    def _redeem(self, ticket: bytes) -> _Sealed | None:
        """What a ticket buys (once), or None."""
        with self._lock:
            entry, expires = self._tickets.pop(ticket, (None, 0.0))
            if entry is None or expires <= self.clock():
                self.counts["refused"] += 1
                return None
            self.counts["sent"] += 1
            return entry

    def stop(self) -> None:
        super().stop()
        if self._files is not None:
            self._files.close()  # the idle files now; the rest as their entries go

    @property
    def tickets(self) -> int:
        return len(self._tickets)

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        request = bytearray(len(MAGIC) + TICKET_BYTES)
        try:
            sock.settimeout(self.transfer_timeout_s)  # a backstop: the watchdog keeps the deadlines
            while not self._stopping.is_set():
                conn.deadline = time.monotonic() + self.idle_timeout_s
                got = 0
                while got < len(request):
                    n = sock.recv_into(memoryview(request)[got:])
                    if not n:
                        raise _Gone(got)
                    got += n
                    conn.deadline = time.monotonic() + self.header_timeout_s
                magic, ticket = bytes(request[: len(MAGIC)]), bytes(request[len(MAGIC) :])
                if magic == sealed_uploads.MAGIC and self.uploads is not None:
                    self._upload(conn, ticket)
                    return
                if magic != MAGIC:
                    return  # not this protocol: close without a word
                entry = self._redeem(ticket)
                if entry is None:
                    sock.sendall(_LENGTH.pack(0))
                    return
                conn.deadline = time.monotonic() + self.transfer_timeout_s
                sock.sendall(_LENGTH.pack(entry.size))
                entry.send(sock)
                if self.on_sent is not None:
                    self.on_sent(len(entry.data))
        except (OSError, _Gone):
            return
        except Exception:  # noqa: BLE001 - never let a thread die silently
            log.exception("sealed downloads: connection from %s failed", conn.peer)
        finally:
            self._release(conn)

    def _upload(self, conn: _Conn, ticket: bytes) -> None:
        """A sealed upload (flotilla.network.sealed_uploads): the device's salt, then the ticket's
        channel; the upload itself runs through the data plane's handler on this thread."""
        tickets, serve = self.uploads
        salt = bytearray(sealed_uploads.SALT_BYTES)
        read_exact(conn.sock, memoryview(salt))
        channel = sealed_uploads.accept(conn.sock, ticket, bytes(salt), tickets)
        if channel is None:
            return
        conn.sock = channel
        serve(conn)
