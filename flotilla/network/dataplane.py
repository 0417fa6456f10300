"""The data plane: a second TLS port that carries the trip's check-ins, model downloads and uploads.

gRPC's Python binding costs about 11 ms of server CPU per 1M-parameter trip above the floor
(copies of bytes objects, wake-ups between the asyncio loop and gRPC's threads, per-message
Python work; benchmarks/network_load.py).  Here the bulk bytes take the shortest path instead:
blocking ``ssl`` sockets in a bounded pool of threads (the GIL is released while the kernel copies
and OpenSSL decrypts), ``recv_into`` straight into the upload's buffer with its fingerprint
computed block by block, and ``sendall`` of the cached download bytes.  Everything that decides
(authentication, rate limits, tickets, validation, commit) stays on the server's asyncio loop: a
:class:`DataPlane` hands each request to the ``handlers`` (coroutines run with
``asyncio.run_coroutine_threadsafe``) and only moves bytes itself.

Framing (flotilla.proto, DataRequest / DataReply): every frame is a 4-byte big-endian length and a
protobuf message (wire.frame / wire.read_frame); a request longer than ``wire.MAX_FRAME_BYTES`` or not a DataRequest ends the
connection with an ``invalid`` refusal.  An upload is answered "send ``body_bytes`` now" before
its body travels, so a refused header costs no body bytes and the connection stays usable.

A hostile client cannot hold the threads: at most ``max_connections`` connections are served at
once (beyond that a connection is closed at once, before the TLS handshake; the SDK then uses
gRPC); a watchdog shuts every connection that passes its deadline (TLS handshake and request
header ``header_timeout_s``, between requests ``idle_timeout_s``, an upload body or download
``transfer_timeout_s``), and the handler's own ``upload_timeout_s`` frees the upload slot.

The handlers object (the server's, or any process that mounts a data plane, e.g. an aggregator)::

    async data_download(token, peer, request: pb.DownloadRequest) -> (bytes-like, version)
    async data_upload(token, peer, header: pb.UploadHeader, receive) -> pb.UploadReply
        # await receive(size, what, into=None, squares=False) -> (memoryview, digest, squares): the
        # body (what: "shape (n,) float32"), read into ``into`` (``size`` writable bytes) when given;
        # squares: with squares=True (a float32 vector) its coordinator.squared_norm, else None
    async data_check_in(token, peer, request: pb.CheckInRequest) -> pb.CheckInReply
        # optional (an aggregator has none: devices check in with the coordinator)
    data_refused(err: Refused, peer)       # a framing-level refusal (to count; called on the loop)

Each raises :class:`~flotilla.network.refusals.Refused`, which travels back as a DataReply
carrying the same code, reason, retry and retry_after_s as a gRPC refusal.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import ssl
import time
from concurrent.futures import CancelledError, Future

import numpy as np

from flotilla.network.coordinator import FINGERPRINT_BLOCK, block_squares, crc32, fingerprint_text
from flotilla.network.listener import ThreadedListener, _Conn, _Gone, _shut
from flotilla.network.refusals import Refused
from flotilla.network.wire import FrameTooLong, frame, pb, read_frame

log = logging.getLogger("flotilla.network")

_POLL_S = 0.25  # a stalled upload body is looked at this often


def refusal_reply(err: Refused) -> pb.DataReply:
    return pb.DataReply(
        code=err.code,
        reason=err.reason,
        retry=err.retry,
        message=str(err),
        retry_after_s=-1.0 if err.retry_after_s is None else float(err.retry_after_s),
    )


class DataPlane(ThreadedListener):
    """A TLS listener whose connections are served by at most ``max_connections`` threads."""

    def __init__(
        self,
        context: ssl.SSLContext,
        handlers,
        loop: asyncio.AbstractEventLoop,
        **limits,  # ThreadedListener's: max_connections and the three timeouts
    ):
        super().__init__(name="data plane", **limits)
        self.context = context
        self.handlers = handlers
        self.loop = loop
        self.served = {"check_in": 0, "download": 0, "upload": 0}  # requests handed to the handlers
        self._pending: set[Future] = set()  # handler calls in flight (cancelled at stop)

    def _cancel_pending(self) -> None:
        with self._lock:
            pending = list(self._pending)
        for f in pending:  # e.g. an upload waiting for a slot (outside the lock: cancel runs _settled)
            f.cancel()

    # -- one connection --------------------------------------------------------------------------
    def _serve(self, conn: _Conn) -> None:
        try:
            conn.sock.settimeout(self.transfer_timeout_s)  # a backstop: the watchdog keeps the deadlines
            # the TLS socket first, then the handshake: the watchdog can cut a stalled handshake
            conn.sock = self.context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            conn.sock.do_handshake()
            self._requests(conn)
        except (OSError, _Gone, ValueError):  # TLS handshake failed or cut, peer gone, socket closed
            return
        except Exception:  # noqa: BLE001 - never let a thread die silently
            log.exception("data plane: connection from %s failed", conn.peer)
        finally:
            self._release(conn)

    def serve_sealed(self, conn: _Conn, device: str) -> None:
        """One upload on a connection the sealed port accepted (``conn.sock``: its
        flotilla.network.sealed_uploads.SealedChannel) for ``device`` (whom its ticket was offered
        to), through the same handler as over TLS.  Called on the sealed port's thread, which
        releases the connection."""
        self._requests(conn, device)

    def _requests(self, conn: _Conn, device: str | None = None) -> None:
        """Serve ``conn``'s requests until it closes; with ``device`` (a sealed connection's, which
        the token must name) one upload and nothing else."""
        while not self._stopping.is_set():
            conn.deadline = time.monotonic() + self.idle_timeout_s
            try:
                head = bytearray(1)
                if conn.sock.recv_into(head) == 0:
                    return  # the device closed the connection between requests
                conn.deadline = time.monotonic() + self.header_timeout_s
                raw = read_frame(conn.sock, head[0])
                request = pb.DataRequest.FromString(raw)
                kind = request.WhichOneof("op")
                if kind is None:
                    raise ValueError("neither a download nor an upload")
            except FrameTooLong as e:
                self._framing(conn, f"data plane: {e}")
                return
            except (_Gone, OSError):
                return
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                self._framing(conn, f"data plane: the request is not a valid DataRequest ({type(e).__name__})")
                return
            if device is not None and kind != "upload":
                self._framing(
                    conn, f"data plane: a sealed connection carries one upload, not a {kind.replace('_', '-')}"
                )
                return
            # from here the handler's own limits apply (an upload may wait for a slot up to
            # upload_timeout_s); the watchdog only backs them up
            conn.deadline = time.monotonic() + self.transfer_timeout_s
            with self._lock:
                self.served[kind] += 1
            if device is not None:
                keep = self._upload(conn, request, device)
            else:
                serve = {"download": self._download, "upload": self._upload, "check_in": self._check_in}[kind]
                keep = serve(conn, request)
            if not keep or device is not None:
                return

    def _framing(self, conn: _Conn, message: str) -> None:
        err = Refused("INVALID_ARGUMENT", "invalid", message)
        self.loop.call_soon_threadsafe(self.handlers.data_refused, err, conn.peer)
        self._reply(conn, refusal_reply(err))

    def _reply(self, conn: _Conn, reply) -> bool:
        try:
            conn.sock.sendall(frame(reply))
            return True
        except OSError:
            return False

    def _run(self, coro) -> Future:
        done = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._pending.add(done)
        done.add_done_callback(self._settled)
        return done

    def _settled(self, done: Future) -> None:
        with self._lock:
            self._pending.discard(done)

    def _check_in(self, conn: _Conn, request) -> bool:
        handler = getattr(self.handlers, "data_check_in", None)
        if handler is None:  # e.g. an aggregator: devices check in with the coordinator
            return self._reply(
                conn, refusal_reply(Refused("UNIMPLEMENTED", "invalid", "check in with the coordinator"))
            )
        try:
            reply = self._run(handler(request.token, conn.peer, request.check_in)).result()
        except Refused as e:
            return self._reply(conn, refusal_reply(e))
        except CancelledError:  # stopping
            return False
        return self._reply(conn, pb.DataReply(check_in=reply))

    def _download(self, conn: _Conn, request) -> bool:
        try:
            data, version = self._run(self.handlers.data_download(request.token, conn.peer, request.download)).result()
        except Refused as e:
            return self._reply(conn, refusal_reply(e))
        except CancelledError:  # stopping
            return False
        conn.deadline = time.monotonic() + self.transfer_timeout_s  # the send, from now
        conn.sock.sendall(frame(pb.DataReply(total_bytes=len(data), version=version)))
        conn.sock.sendall(data)
        return True

    def _upload(self, conn: _Conn, request, device: str | None = None) -> bool:
        started = time.monotonic()
        sealed = device is not None
        handoff: queue.SimpleQueue = queue.SimpleQueue()
        loop = self.loop

        async def receive(size: int, what: str, into: memoryview | None = None, squares: bool = False):
            got = loop.create_future()
            handoff.put((size, what, into, squares, got))
            return await got

        extra = {"device": device} if sealed else {}  # the sealed connection's device: the token must name it
        done = self._run(self.handlers.data_upload(request.token, conn.peer, request.upload, receive, **extra))
        done.add_done_callback(lambda _: handoff.put(None))
        item = handoff.get()
        whole = True  # the stream is at a frame boundary (no body bytes left unread)
        if item is not None:
            size, what, into, squares, got = item
            result: tuple | BaseException
            if request.body_bytes != size:
                more = request.body_bytes > size
                result = Refused(
                    "INVALID_ARGUMENT",
                    "shape" if more else "truncated",
                    f"upload refused: more than the {size} bytes of {what}"
                    if more
                    else f"upload refused: the stream ended after {request.body_bytes} of the {size} bytes that {what} needs",
                )
            else:
                conn.deadline = started + self.transfer_timeout_s
                result, whole = self._receive_body(conn, size, what, done.done, into, squares)
                if sealed and not whole:
                    # the body did not all arrive (a cut, even at a record boundary, or a record failing
                    # its tag): end the connection without a reply, as a broken TLS stream does, so the
                    # device sends again over TLS rather than take a refusal for work an attacker spoiled
                    _shut(conn.sock)
            loop.call_soon_threadsafe(_settle, got, result)
            if handoff.get() is not None:  # pragma: no cover - one receive per upload
                raise RuntimeError("data plane: the handler asked for the body twice")
        try:
            reply = pb.DataReply(upload=done.result())
        except Refused as e:
            reply = refusal_reply(e)
        except CancelledError:  # stopping
            return False
        return self._reply(conn, reply) and whole

    def _receive_body(
        self, conn: _Conn, size: int, what: str, gave_up, into: memoryview | None = None, squares: bool = False
    ) -> tuple[tuple | BaseException, bool]:
        """Read exactly ``size`` body bytes into ``into`` (else a fresh buffer), the fingerprint block by block
        (== coordinator.fingerprint of the bytes) and with ``squares`` the float32 sum of squares
        (== coordinator.squared_norm), each block while it is in the cache.
        Returns ((buffer, digest, squares or None) or the refusal, whole).
        A stream that stalls is given up when the handler has (``gave_up()``: its upload_timeout_s)."""
        if not self._reply(conn, pb.DataReply(body_bytes=size)):
            return Refused("INVALID_ARGUMENT", "truncated", "upload refused: the device hung up"), False
        # not zeroed: every byte is written below, or the upload is refused
        buf = memoryview(np.empty(size, np.uint8)) if into is None else into
        pos = crc = 0
        sq = 0.0
        sock = conn.sock
        # waits for data wake up every _POLL_S to look whether the handler gave up (a shutdown of the
        # socket instead would put the TLS session in error, and the refusal could not be sent)
        sock.settimeout(_POLL_S)
        # the C object's read, not SSLSocket.recv_into's three Python frames around it: it runs once
        # per 16 KiB record (256 times per 4 MB; ~0.4 ms of server CPU per trip, 3 alternating runs)
        read = getattr(getattr(sock, "_sslobj", None), "read", None)
        try:
            while pos < size:
                end = min(pos + FINGERPRINT_BLOCK, size)
                start = pos
                while pos < end:
                    try:
                        n = read(end - pos, buf[pos:end]) if read else sock.recv_into(buf[pos:end])
                    except TimeoutError:
                        if gave_up() or time.monotonic() >= conn.deadline:
                            raise _Gone(pos) from None
                        continue
                    if not n:
                        raise _Gone(pos)
                    pos += n
                crc = crc32(buf[start:end], crc)
                if squares:
                    sq += block_squares(buf[start:end])
        except (OSError, _Gone):
            return (
                Refused(
                    "INVALID_ARGUMENT",
                    "truncated",
                    f"upload refused: the stream ended after {pos} of the {size} bytes that {what} needs",
                ),
                False,
            )
        finally:
            sock.settimeout(self.transfer_timeout_s)
        return (buf, fingerprint_text(crc, size), sq if squares else None), True


def _settle(fut: asyncio.Future, result) -> None:
    if fut.done():  # the handler was cancelled (upload_timeout_s) meanwhile
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def server_context(cert: str, key: str, ca: str | None = None, require_client_cert: bool = False) -> ssl.SSLContext:
    """The data plane's TLS settings: the gRPC port's certificate and key, TLS 1.2+, and with
    ``require_client_cert`` the client certificate checked against ``ca`` (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if require_client_cert:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
