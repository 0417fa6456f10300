"""Starting Ray, one way for every caller (the Ray runtime's actors and ``flotilla tune --ray``).

Without an address: a private local Ray sized for the work, even if a cluster runs here, with its
workers at niceness 0 (Ray's default +15 keeps drivers responsive, but here the workers ARE the work
and the driver waits; at +15 they lost to every other process on a busy machine).  With an address:
that cluster, after a TCP connect to it answers (Ray's own connect to a dead address waits for
minutes: measured over 10 min for 127.0.0.1:1).  Errors are one line naming ``key``, the setting
the address came from.
"""

from __future__ import annotations

import socket


def check_reachable(address: str, key: str, timeout: float = 5.0) -> None:
    """A host:port address must answer a TCP connect within ``timeout`` seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise ValueError(
            f"{key}: no Ray cluster at {address!r} ({why}); start one with `ray start --head`, "
            "or leave the address out for a private local Ray"
        ) from None


def start_local(ray, **options) -> None:
    """``ray.init(address="local", **options)``, started a second time if the first start's raylet
    never registers: a fresh-clone CI run saw that once, a second after the previous private Ray
    had shut down (the raylet left no log at all; Ray gives up after 30 s)."""
    try:
        ray.init(address="local", **options)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(address="local", **options)


def init_ray(ray, address: str | None, num_cpus: int, key: str) -> None:
    """``ray.init`` for a private local Ray of ``num_cpus`` CPUs (address None) or the cluster at ``address``."""
    if address is None:
        start_local(
            ray,
            num_cpus=max(1, num_cpus),
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"worker_niceness": 0},
        )
        return
    if address != "auto":
        check_reachable(address, key)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise ValueError(
            f"{key}: no Ray cluster at {address!r} ({str(e).splitlines()[0]}); start one with `ray start --head`"
        ) from None
