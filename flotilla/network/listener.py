"""A TCP listener whose connections are served by a bounded pool of threads, with deadlines.

What the data plane (flotilla/network/dataplane.py, TLS) and the sealed-download port
(flotilla/network/sealed_downloads.py, plain TCP) share: at most ``max_connections`` connections
are served at once (beyond that a connection is closed at once, so a hostile client cannot hold
the threads), and a watchdog shuts every connection that passes its ``deadline`` (each protocol
sets it from ``header_timeout_s``, ``idle_timeout_s`` and ``transfer_timeout_s`` as it goes).
A subclass serves one connection in ``_serve(conn)`` and releases it with ``_release(conn)``.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from flotilla.network.wire import DATA_SOCKET_BUFFER


def _shut(sock, how=socket.SHUT_RDWR) -> None:
    """Shut the socket's file descriptor down from any thread (a blocked recv returns at once).
    socket.socket's own method: SSLSocket.shutdown would drop the TLS object under the reader.
    A sealed upload's channel (flotilla.network.sealed_uploads) is shut through its plain socket."""
    try:
        socket.socket.shutdown(getattr(sock, "raw", sock), how)
    except OSError:
        pass


class _Gone(Exception):
    """The peer hung up (or the watchdog cut the connection) mid-frame; ``got`` bytes had arrived."""

    def __init__(self, got: int = 0):
        super().__init__(got)
        self.got = got


class _Conn:
    __slots__ = ("sock", "peer", "deadline")

    def __init__(self, sock, peer: str, deadline: float):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline


class ThreadedListener:
    """Accepts on ``start(host, port)``; each connection runs ``_serve`` on a pool thread."""

    def __init__(
        self,
        *,
        max_connections: int = 128,
        header_timeout_s: float = 10.0,
        idle_timeout_s: float = 10.0,
        transfer_timeout_s: float = 300.0,
        name: str = "listener",  # in errors; its threads are named flotilla-<name>
    ):
        if max_connections < 1:
            raise ValueError(f"{name}: max_connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.name = name
        self.port: int | None = None
        self.refused_busy = 0  # connections closed at once because every thread was busy
        self._free = threading.BoundedSemaphore(max_connections)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (exclusively; 0: any free port) and start serving; returns the port."""
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"; no REUSEPORT
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # accepted sockets inherit them
                sock.setsockopt(socket.SOL_SOCKET, opt, DATA_SOCKET_BUFFER)
            sock.bind((host.strip("[]"), port))
            sock.listen(256)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]
        prefix = "flotilla-" + self.name.replace(" ", "-")
        self._pool = ThreadPoolExecutor(self.max_connections, thread_name_prefix=prefix)
        for target, name in ((self._accept_loop, f"{prefix}-accept"), (self._watchdog, f"{prefix}-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut every connection, and wait for the threads (call off the loop, or
        with the loop still running: a thread may be waiting on a handler)."""
        self._stopping.set()
        if self._listener is not None:
            _shut(self._listener)
            self._listener.close()
        with self._lock:
            for c in self._conns:
                _shut(c.sock)
        self._cancel_pending()
        for t in self._threads:
            t.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _cancel_pending(self) -> None:
        """Cancel work the connections wait on (a subclass's handler calls), so stop can join them."""

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: do not spin
                continue
            if not self._free.acquire(blocking=False):
                # every thread busy: refuse fast (the device falls back to another path or retries)
                self.refused_busy += 1
                raw.close()
                continue
            conn = _Conn(raw, f"{addr[0]}:{addr[1]}", time.monotonic() + self.header_timeout_s)
            with self._lock:
                self._conns.add(conn)
            try:
                self._pool.submit(self._serve, conn)
            except RuntimeError:  # shutting down
                self._release(conn)

    def _watchdog(self) -> None:
        """Cut connections past their deadline (a stalled handshake, header, body, or idle)."""
        while not self._stopping.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns if c.deadline <= now]
            for c in late:
                _shut(c.sock)

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        try:
            conn.sock.close()
        finally:
            self._free.release()

    def _serve(self, conn: _Conn) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError
