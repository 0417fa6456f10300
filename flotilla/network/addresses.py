"""Command-line types of network addresses: a port to listen on, a server to reach."""

from __future__ import annotations

import argparse


def port_number(text: str) -> int:
    """argparse type of a TCP port: 0 (any free port) to 65535; refused, not wrapped, outside it."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def server_address(text: str) -> str:
    """argparse type of HOST:PORT (a device's --server): the port must be 1-65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {port!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: {number} is not a port number (1-65535)")
    return text
