"""The device side of the data plane (flotilla.network.dataplane): blocking TLS, one request at a time.

:class:`flotilla.network.client.Connection` uses a :class:`DataClient` for check-ins, downloads
and uploads once the server's check-in names a data port, and gRPC otherwise.  The connection is kept between
requests; one the server closed meanwhile (it closes idle ones) is reopened once, before any body
byte is sent, so nothing is sent twice by accident (an upload sent again is a retry in any case:
the server answers it with the first one's seq).
"""

from __future__ import annotations

import select
import socket
import ssl

from flotilla.network.wire import DATA_SOCKET_BUFFER, frame, pb, read_exact, read_frame


class Unreachable(ConnectionError):
    """The data port could not be reached or closed the connection before answering anything
    (a firewall, or every server thread busy): the caller uses gRPC instead."""


class TLSFailure(ConnectionError):
    """The TLS handshake failed on a certificate (retrying cannot fix it)."""


class DataRefusal(Exception):
    """The server refused the request; ``reply`` is its DataReply (code, reason, retry, message)."""

    def __init__(self, reply):
        super().__init__(reply.message)
        self.reply = reply


def client_context(ca: bytes | None, cert=None, key=None) -> ssl.SSLContext:
    """A device's TLS settings: the server checked against ``ca`` (PEM bytes; else the system's
    roots), TLS 1.2 or later, and the client certificate when one is given (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(cadata=ca.decode())
    else:
        ctx.load_default_certs()
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class DataClient:
    def __init__(
        self,
        host: str,
        port: int,
        token: str | None,
        *,
        ca: bytes | None = None,
        cert=None,
        key=None,
        server_name: str | None = None,
        timeout_s: float = 120.0,
    ):
        self.host, self.port, self.token = host, port, token or ""
        self.server_name = server_name or host
        self.timeout_s = timeout_s
        self.context = client_context(ca, cert, key)
        self.sock: ssl.SSLSocket | None = None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _connect(self) -> None:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as e:
            raise Unreachable(f"cannot connect to the data port {self.host}:{self.port}: {e}") from None
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                raw.setsockopt(socket.SOL_SOCKET, opt, DATA_SOCKET_BUFFER)
            self.sock = self.context.wrap_socket(raw, server_hostname=self.server_name)
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise TLSFailure(e.verify_message or e.reason or str(e)) from None
        except ssl.SSLError as e:
            raw.close()
            if e.reason and any(w in e.reason.upper() for w in ("CERTIFICATE", "UNKNOWN_CA", "HANDSHAKE_FAILURE")):
                raise TLSFailure(e.reason) from None
            raise Unreachable(f"the data port {self.host}:{self.port} ended the TLS handshake: {e}") from None
        except OSError as e:
            raw.close()
            raise Unreachable(f"the data port {self.host}:{self.port} closed the connection: {e}") from None

    def _stale(self) -> bool:
        """A kept connection with something to read before we asked: the server closed it (idle)."""
        if self.sock.pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _read_reply(self):
        reply = pb.DataReply.FromString(read_frame(self.sock))
        if reply.code:
            raise DataRefusal(reply)
        return reply

    def _request(self, request):
        """Send ``request`` and read the first reply.  A kept connection that turns out closed is
        replaced once; a fresh one that fails is :class:`Unreachable` (nothing was answered)."""
        message = frame(request)
        for attempt in range(2):
            fresh = self.sock is None
            if not fresh and self._stale():
                self.close()
                fresh = True
            if fresh:
                self._connect()
            try:
                self.sock.sendall(message)
                return self._read_reply()
            except DataRefusal:
                raise
            except TimeoutError:  # the server is there but slow (timeout_s): not a stale connection
                self.close()
                raise
            except ssl.SSLError as e:
                self.close()
                if e.reason and "ALERT" in e.reason.upper():  # the server refused our certificate (TLS 1.3)
                    raise TLSFailure(e.reason) from None
                if fresh:
                    raise Unreachable(f"the data port {self.host}:{self.port} closed the connection: {e}") from None
            except OSError as e:
                self.close()
                if fresh:
                    raise Unreachable(f"the data port {self.host}:{self.port} closed the connection: {e}") from None
                if attempt:
                    raise
        raise ConnectionError("unreachable")  # pragma: no cover

    def _broken(self, e: Exception) -> OSError:
        self.close()
        kind = TimeoutError if isinstance(e, TimeoutError) else ConnectionError
        return kind(f"data plane {self.host}:{self.port}: {e}")

    def check_in(self, request) -> object:
        """A CheckInRequest answered by the server's CheckInReply."""
        return self._request(pb.DataRequest(token=self.token, check_in=request)).check_in

    def download(self, version: int, into) -> int:
        """Download ``version`` into ``into(total_bytes) -> writable memoryview`` (called once the
        size is known; it may raise to refuse the size); returns the byte count."""
        reply = self._request(pb.DataRequest(token=self.token, download=pb.DownloadRequest(version=version)))
        try:
            view = into(reply.total_bytes)
        except BaseException:
            self.close()  # the bytes are on their way: the connection is not reusable
            raise
        try:
            read_exact(self.sock, view)
        except OSError as e:
            raise self._broken(e) from None
        return reply.total_bytes

    def upload(self, header, data) -> pb.UploadReply:
        view = memoryview(data).cast("B")
        reply = self._request(pb.DataRequest(token=self.token, upload=header, body_bytes=len(view)))
        if reply.body_bytes != len(view):
            raise self._broken(ValueError(f"the server asked for {reply.body_bytes} body bytes, not {len(view)}"))
        try:
            self.sock.sendall(view)
            reply = self._read_reply()
        except DataRefusal:
            raise
        except OSError as e:
            raise self._broken(e) from None
        return reply.upload
