"""Sealed uploads: a device's update over plain TCP, sealed under a key only it and the server hold
(network.sealed_uploads, on the port of network.sealed_download_port).

Why: a TLS upload costs the server about 3 ms of CPU per 4 MB on this machine.  Python's ``ssl``
runs the system's OpenSSL (AES-256-GCM at ~5 GB/s here), reads 16 KiB records with two system
calls each and copies every record out of OpenSSL's buffer.  ``cryptography`` opens AES-256-GCM at
~14 GB/s, and here a 256 KiB record is read whole and opened straight into its place in the
upload's buffer (docs/deployment.md, "Sealed uploads").

The protocol (flotilla.proto, message SealedUpload):

* The TLS check-in reply of a device given work carries an offer: the sealed port, a 16-byte
  ticket (it names the key; good for one connection until the assignment expires) and a 32-byte
  key drawn for this assignment alone.  Unlike a sealed download's key, no other device holds it.
* Device to port: ``"FLSU"`` + ticket + a fresh 16-byte salt, then sealed records.
* Port to device: one byte, 0 (the ticket is unknown, used or expired: the connection closes) or 1,
  then the server's fresh 16-byte salt, then sealed records.
* Keys, by HKDF-SHA256 from the offer's key: device to server with the device's salt, server to
  device with both salts (``info`` names the direction and binds the ticket).  Fresh salts make
  fresh keys for every connection, so a nonce never repeats under a key whatever a retry sends.
* A record: a 4-byte big-endian length n (17 to RECORD + 16), then n bytes: up to RECORD plaintext
  bytes sealed with AES-256-GCM, nonce = the record's index in its direction (12 bytes big-endian),
  associated data = the 4 length bytes.  Records cannot be altered, reordered, dropped or replayed
  unnoticed; a stream cut short shows as missing bytes (the frames inside say how many come).
* Inside the records: exactly the data plane's upload exchange (flotilla/network/dataplane.py): a
  DataRequest frame (token, UploadHeader, body_bytes), the server's "send body_bytes now" or its
  refusal, the body (in records of RECORD bytes, so each lands in its place in the upload's
  buffer), the DataReply.  The server runs the handler a TLS upload runs: the same checks,
  refusals, ledger and fsync.  Only uploads travel here: check-ins and downloads are refused.

The device falls back to a TLS upload on anything short of the server's reply (flotilla/network/
client.py); an upload that reached the ledger is then answered as a retry (the same seq), so the
worst a network attacker achieves is what dropping packets achieves: the slower path.
"""

from __future__ import annotations

import os
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flotilla.network.port_tickets import TICKET_BYTES, PortTickets
from flotilla.network.wire import frame, pb, read_exact, read_frame

MAGIC = b"FLSU"
KEY_BYTES = 32
SALT_BYTES = 16
RECORD = 256 << 10  # plaintext bytes per record: the data plane's read block (coordinator.FINGERPRINT_BLOCK)
TAG = 16
ACCEPTED, REFUSED = b"\x01", b"\x00"
_LENGTH = struct.Struct(">I")
_UP = b"flotilla sealed upload v1: device to server; ticket "
_DOWN = b"flotilla sealed upload v1: server to device; ticket "


class SealedChannelError(ConnectionError):
    """A sealed record that fails its tag or its length, or a stream cut inside a record."""


class SealedUploadRefused(ConnectionError):
    """The port refused the ticket (unknown, used or expired): upload over TLS instead."""


def _derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key)


def keys(key: bytes, ticket: bytes, device_salt: bytes, server_salt: bytes) -> tuple[bytes, bytes]:
    """``(device to server, server to device)`` keys of one connection."""
    return _derive(key, device_salt, _UP + ticket), _derive(key, device_salt + server_salt, _DOWN + ticket)


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")  # the key is fresh per connection and direction: indexes never repeat under it


def usable(offer) -> bool:
    """Whether a check-in's pb.SealedUpload is well formed (else the device ignores it)."""
    return 0 < offer.port <= 65535 and len(offer.ticket) == TICKET_BYTES and len(offer.key) == KEY_BYTES


class SealedChannel:
    """One direction's sealing and the other's opening over a plain blocking socket, used as the
    socket itself: ``sendall`` seals, ``recv_into`` opens.  A read that times out keeps its place
    (the next call resumes the record), as the data plane's polling reads need."""

    def __init__(self, raw, send_key: bytes, recv_key: bytes | None = None):
        self.raw = raw  # the plain socket (listener._shut cuts it from the watchdog)
        self._seal = AESGCM(send_key)
        self._open = None if recv_key is None else AESGCM(recv_key)
        self._sent = self._received = 0
        # buffers grow to the largest record seen, so a server's channel (small replies) stays small
        self._head, self._head_got = bytearray(_LENGTH.size), 0
        self._cipher, self._cipher_got = bytearray(), 0
        self._plain, self._plain_at, self._plain_end = bytearray(), 0, 0  # an opened record's unread rest
        self._out = bytearray()

    def receive_with(self, recv_key: bytes) -> None:
        self._open = AESGCM(recv_key)

    # -- the socket's face ---------------------------------------------------------------------
    def settimeout(self, seconds: float | None) -> None:
        self.raw.settimeout(seconds)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        if len(self._out) < _LENGTH.size + min(len(view), RECORD) + TAG:
            self._out = bytearray(_LENGTH.size + min(len(view), RECORD) + TAG)
        out = memoryview(self._out)
        for at in range(0, len(view), RECORD):
            part = view[at : at + RECORD]
            n = len(part) + TAG
            _LENGTH.pack_into(self._out, 0, n)
            self._seal.encrypt_into(
                _nonce(self._sent), part, bytes(out[: _LENGTH.size]), out[_LENGTH.size : _LENGTH.size + n]
            )
            self._sent += 1
            self.raw.sendall(out[: _LENGTH.size + n])

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Up to ``nbytes`` (else ``len(buffer)``) plaintext bytes into ``buffer``; 0 only when the
        peer closed between records.  A whole record that fits is opened straight into place."""
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        want = len(view) if nbytes <= 0 else min(nbytes, len(view))
        if want == 0:
            return 0
        if self._plain_at < self._plain_end:
            n = min(want, self._plain_end - self._plain_at)
            view[:n] = memoryview(self._plain)[self._plain_at : self._plain_at + n]
            self._plain_at += n
            return n
        size = self._next_record()
        if size == 0:
            return 0
        plain = size - TAG
        if plain > want and len(self._plain) < plain:
            self._plain = bytearray(plain)
        into = view[:plain] if plain <= want else memoryview(self._plain)[:plain]
        try:
            self._open.decrypt_into(_nonce(self._received), memoryview(self._cipher)[:size], bytes(self._head), into)
        except InvalidTag:
            raise SealedChannelError(
                f"sealed record {self._received} fails its tag (tampered, reordered or replayed)"
            ) from None
        self._received += 1
        self._head_got = self._cipher_got = 0
        if plain <= want:
            return plain
        view[:want] = into[:want]
        self._plain_at, self._plain_end = want, plain
        return want

    def _next_record(self) -> int:
        """Read the next record whole into ``_cipher`` (resuming a read a timeout interrupted);
        its sealed length, or 0 when the peer closed between records."""
        if self._open is None:
            raise SealedChannelError("no key to open records with yet")
        head = memoryview(self._head)
        while self._head_got < len(head):
            n = self.raw.recv_into(head[self._head_got :])
            if not n:
                if self._head_got == 0:
                    return 0
                raise SealedChannelError("the stream ended inside a sealed record's length")
            self._head_got += n
        (size,) = _LENGTH.unpack(self._head)
        if not TAG < size <= RECORD + TAG:
            raise SealedChannelError(f"a sealed record of {size} bytes (17 to {RECORD + TAG})")
        if len(self._cipher) < size:
            self._cipher = bytearray(size)
        cipher = memoryview(self._cipher)
        while self._cipher_got < size:
            n = self.raw.recv_into(cipher[self._cipher_got : size])
            if not n:
                raise SealedChannelError(f"the stream ended inside sealed record {self._received}")
            self._cipher_got += n
        return size


# -- the server's side -------------------------------------------------------------------------
class UploadTickets(PortTickets):
    """The server's live upload offers: each ticket names a key drawn for one assignment, and the
    device it was offered to (a sealed upload under another device's token is refused)."""

    def offer(self, device: str, port: int, expires_in_s: float) -> pb.SealedUpload:
        key = secrets.token_bytes(KEY_BYTES)
        return pb.SealedUpload(port=port, ticket=self.issue(device, (key, device), expires_in_s), key=key)


def accept(raw, ticket: bytes, device_salt: bytes, tickets: UploadTickets) -> tuple[SealedChannel, str] | None:
    """The port's answer to ``"FLSU"`` + ticket + salt on ``raw``: the connection's channel and the
    device the ticket was offered to, or None (refused; the caller closes)."""
    named = tickets.redeem(ticket)
    if named is None:
        raw.sendall(REFUSED)
        return None
    key, device = named
    server_salt = os.urandom(SALT_BYTES)
    raw.sendall(ACCEPTED + server_salt)
    up, down = keys(key, ticket, device_salt, server_salt)
    return SealedChannel(raw, send_key=down, recv_key=up), device


# -- the device's side -------------------------------------------------------------------------
class DeviceKeys:
    """A device's side of one connection's handshake for ``offer`` (a pb.SealedUpload), apart from
    any I/O: :meth:`hello` opens the connection, then :attr:`up` seals, and :meth:`down` of the
    server's salt opens what the server sends."""

    def __init__(self, offer):
        self.ticket, self.key, self.salt = bytes(offer.ticket), bytes(offer.key), os.urandom(SALT_BYTES)
        self.up = _derive(self.key, self.salt, _UP + self.ticket)

    def hello(self) -> bytes:
        return MAGIC + self.ticket + self.salt

    def down(self, server_salt: bytes) -> bytes:
        return _derive(self.key, self.salt + server_salt, _DOWN + self.ticket)


def upload(raw, offer, token: str, header, data) -> pb.UploadReply:
    """Upload ``data`` with ``header`` over the connected plain socket ``raw`` as ``offer`` (a
    pb.SealedUpload) allows.  Raises :class:`SealedUploadRefused` (the ticket), the data plane's
    ``DataRefusal`` (the server refused the upload: final, as over TLS), or OSError (the connection
    broke or a record failed: the caller uploads over TLS, which the server answers as a retry)."""
    from flotilla.network.dataplane_client import DataRefusal

    view = memoryview(data).cast("B")
    keys = DeviceKeys(offer)
    channel = SealedChannel(raw, send_key=keys.up)
    raw.sendall(keys.hello())
    channel.sendall(frame(pb.DataRequest(token=token or "", upload=header, body_bytes=len(view))))
    status = bytearray(1 + SALT_BYTES)
    read_exact(raw, memoryview(status)[:1])
    if status[:1] != ACCEPTED:
        raise SealedUploadRefused("the sealed port refused the upload ticket (unknown, used or expired)")
    read_exact(raw, memoryview(status)[1:])
    channel.receive_with(keys.down(bytes(status[1:])))

    def reply():
        r = pb.DataReply.FromString(read_frame(channel))
        if r.code:
            raise DataRefusal(r)
        return r

    asked = reply()
    if asked.body_bytes != len(view):
        raise SealedChannelError(f"the server asked for {asked.body_bytes} body bytes, not {len(view)}")
    channel.sendall(view)
    return reply().upload
