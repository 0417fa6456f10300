"""Sealed downloads: the model over plain TCP, encrypted once per version (network.sealed_download_port).

Why: every device that trains from a version downloads the same bytes, yet TLS encrypts them again
for each connection; for a 1M-parameter model that is most of a trip's transfer cost on the server
(docs/deployment.md, "Sealed downloads").  Here the server seals each version's download once, with
AES-256-GCM under a fresh random key, in 1 MiB chunks whose associated data binds the version, the
chunk's position and the end (so chunks cannot be reordered, spliced across versions or cut
short), and hands each device an offer inside its TLS check-in reply (pb.SealedDownload):

* the version's key, so what crosses the plain connection is unreadable to anyone the server did
  not give work;
* the BLAKE3 digest of the plaintext: every trained device holds the key, so the tag alone would
  let one device that can tamper with another's traffic forge a model that decrypts; the digest,
  which only TLS carries, cannot be forged (BLAKE3: 0.7 ms per 4 MB here against SHA-256's 2.5,
  once per version on the server's loop and once per download on the device);
* a random 16-byte ticket, good for one fetch until the assignment expires, so the port sends
  nothing to a connection the server did not invite (no bandwidth for strangers) and nothing twice.

The wire format is in flotilla.proto (message SealedDownload).  The device checks tags and digest
(:func:`receive`) and on any failure downloads over TLS instead (flotilla/network/client.py), so
the worst a network attacker achieves is what dropping packets achieves: the slower path.

With network.sealed_uploads the same port takes uploads too (flotilla/network/sealed_uploads.py:
a key per assignment, and the data plane's own upload handler); without it uploads travel over TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import struct
import time
import weakref

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flotilla.network import sealed_uploads
from flotilla.network.listener import ThreadedListener, _Conn, _Gone
from flotilla.network.port_tickets import TICKET_BYTES, PortTickets
from flotilla.network.wire import pb, read_exact

log = logging.getLogger("flotilla.network")

MAGIC = b"FLSD"
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
    bytes); returns ``(key, BLAKE3 digest of data)``."""
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    aead, view, n = AESGCM(key), memoryview(data).cast("B"), chunks(len(data))
    for i in range(n):
        part = view[i * CHUNK : (i + 1) * CHUNK]
        at = i * (CHUNK + TAG)
        aead.encrypt_into(_nonce(i), part, _aad(version, i, i == n - 1), out[at : at + len(part) + TAG])
    return key, blake3.blake3(view).digest()


def seal(version: int, data) -> tuple[bytes, bytes, bytes]:
    """``(key, sealed bytes, BLAKE3 digest of data)``: :func:`seal_into` a new buffer."""
    out = bytearray(sealed_size(len(data)))
    key, digest = seal_into(version, data, memoryview(out))
    return key, bytes(out), digest


def usable(offer) -> bool:
    """Whether a check-in's pb.SealedDownload is well formed (else the device ignores it)."""
    return (
        0 < offer.port <= 65535
        and len(offer.ticket) == TICKET_BYTES
        and len(offer.key) == KEY_BYTES
        and (len(offer.blake3) == 32 or len(offer.sha256) == 32)  # a server before BLAKE3: SHA-256
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
        self.expected = bytes(offer.blake3) or bytes(offer.sha256)
        self.digest = blake3.blake3() if offer.blake3 else hashlib.sha256()
        self.n = chunks(offer.total_bytes)

    def open(self, i: int, sealed, part: memoryview) -> None:
        try:
            self.aead.decrypt_into(_nonce(i), sealed, _aad(self.version, i, i == self.n - 1), part)
        except InvalidTag:
            raise SealedDownloadError(f"chunk {i} of version {self.version} fails its tag (tampered?)") from None
        self.digest.update(part)

    def check(self) -> None:
        if not hmac.compare_digest(self.digest.digest(), self.expected):
            raise SealedDownloadError(
                f"version {self.version}'s bytes do not match the digest the server gave over TLS"
            )


class _Sealed:
    """A version's download, sealed once.  On Linux it is kept in an anonymous in-memory file
    (memfd) and sent with sendfile: the kernel takes the file's pages without a copy into the
    socket (the port's threads: 1.1 -> 0.45 ms of server CPU per 4 MB sent, by schedstat).  It is
    sealed into ``scratch`` (the port's buffer, reused: no fresh 4 MB per version) and written to
    the file in one call; sealing into an mmap of the file measured no better.  A file is never
    reused for a later version: after sendfile returns, a socket may still hold its pages (until the
    peer has read them, on loopback), and sealing into them would change bytes in flight."""

    def __init__(self, version: int, data, scratch: bytearray):
        self.version = version
        self.data = data  # the bytes object sealed (an entry counts only while the server serves that very object)
        self.size = sealed_size(len(data))
        with memoryview(scratch) as out:  # at least ``size`` bytes (the port grows it)
            self.key, self.digest = seal_into(version, data, out[: self.size])
            self.fd, self.sealed = -1, None
            if hasattr(os, "memfd_create"):
                self.fd = os.memfd_create("flotilla-sealed", os.MFD_CLOEXEC)
                weakref.finalize(self, os.close, self.fd)  # once no ticket or send holds the entry
                written = 0
                while written < self.size:
                    written += os.write(self.fd, out[written : self.size])
            else:
                self.sealed = bytes(out[: self.size])

    def send(self, sock) -> None:
        if self.fd < 0:
            sock.sendall(self.sealed)
            return
        # with a timeout the socket is non-blocking underneath: once its buffer is full, wait for room
        # (up to the timeout; the watchdog's deadline cuts a stalled reader) and go on
        out, sent, waiting = sock.fileno(), 0, None
        while sent < self.size:
            try:
                sent += os.sendfile(out, self.fd, sent, self.size - sent)
            except BlockingIOError:
                if waiting is None:
                    waiting = select.poll()
                    waiting.register(out, select.POLLOUT)
                timeout = sock.gettimeout()
                if not waiting.poll(None if timeout is None else 1000 * timeout):
                    raise TimeoutError(f"sealed download: no room to send for {timeout} s") from None


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
        self.sealed_versions = 0
        self._versions: dict[int, _Sealed] = {}  # sealed versions some live ticket names (pruned with them)
        self._tickets = PortTickets(clock, used="sent", on_prune=self._keep_named)
        self._scratch = bytearray()  # sealing's buffer, reused (offers run on one thread: the server's loop)

    def offer(self, device: str, version: int, data, expires_in_s: float) -> pb.SealedDownload:
        """An offer of ``version``'s download bytes ``data`` to ``device``, good for one fetch
        within ``expires_in_s`` seconds (the assignment's life)."""
        entry = self._versions.get(version)
        if entry is None or entry.data is not data:  # sealed before any lock: the port keeps serving
            if len(self._scratch) < sealed_size(len(data)):
                self._scratch = bytearray(sealed_size(len(data)))
            entry = _Sealed(version, data, self._scratch)
            self.sealed_versions += 1
            self._versions[version] = entry
        ticket = self._tickets.issue(device, entry, expires_in_s)
        return pb.SealedDownload(
            port=self.port or 0, ticket=ticket, key=entry.key, blake3=entry.digest, total_bytes=len(data)
        )

    def _keep_named(self, named: list) -> None:
        """After the tickets' prune: drop sealed versions no live ticket names."""
        wanted = {e.version for e in named}
        for v in [v for v in self._versions if v not in wanted]:
            del self._versions[v]

    @property
    def counts(self) -> dict[str, int]:
        """Offers made, fetches sent, tickets refused, versions sealed."""
        return {**self._tickets.counts, "sealed_versions": self.sealed_versions}

    @property
    def tickets(self) -> int:
        return len(self._tickets)

    def stop(self) -> None:
        super().stop()
        self._tickets.clear()  # they buy nothing now; the sealed versions go with them
        self._versions.clear()

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
                    if not got:  # one deadline from the first byte for the whole request (and an upload's salt)
                        conn.deadline = time.monotonic() + self.header_timeout_s
                    got += n
                magic, ticket = bytes(request[: len(MAGIC)]), bytes(request[len(MAGIC) :])
                if magic == sealed_uploads.MAGIC and self.uploads is not None:
                    self._upload(conn, ticket)
                    return
                if magic != MAGIC:
                    return  # not this protocol: close without a word
                entry = self._tickets.redeem(ticket)
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
        accepted = sealed_uploads.accept(conn.sock, ticket, bytes(salt), tickets)
        if accepted is None:
            return
        conn.sock, device = accepted
        serve(conn, device)
