"""Run the dashboard with uvicorn: blocking (``flotilla dashboard``) or beside a server (``serve --dashboard``)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading

import uvicorn

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """A dashboard reachable from other machines shows configs and live state: it needs a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"--dashboard-host {host}: a dashboard reachable beyond this machine needs a token "
            "(--dashboard-token T, or --dashboard-token auto for a random one)"
        )


def resolve_token(token: str | None) -> str | None:
    return secrets.token_urlsafe(24) if token == "auto" else token


def bind(host: str, port: int, what: str = "dashboard") -> socket.socket:
    """The listening socket, bound now, so a port in use is one clear error before anything runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"{what}: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(64)
    return sock


def address(host: str, sock: socket.socket, token: str | None) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


class DashboardThread:
    """uvicorn on its own loop in a daemon thread; ``stop()`` ends it."""

    def __init__(self, app, sock: socket.socket):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self._run, daemon=True, name="flotilla-dashboard")
        self.thread.start()

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def run_blocking(app, sock: socket.socket) -> None:
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)).run(
        sockets=[sock]
    )
