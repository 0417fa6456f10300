"""Shared pieces of the network tests: certificates, an in-process server, tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flotilla.network.auth import TokenTable
from flotilla.network.certs import make_deployment, read_tokens_txt
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, Limits, ServerThread, TLSFiles


class PKI:
    def __init__(self, root: Path, devices: int = 4):
        self.paths = make_deployment(root, devices=devices)
        self.root = root
        self.tokens = read_tokens_txt(self.paths["tokens_txt"])
        self.ca = str(self.paths["ca_pem"])

    def token(self, i: int) -> str:
        return self.tokens[f"device-{i:03d}"]

    def tls(self, require_client_cert: bool = False) -> TLSFiles:
        return TLSFiles(str(self.paths["server_pem"]), str(self.paths["server_key"]), self.ca, require_client_cert)


def tiny_model(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(5, out)


def start_server(
    pki: PKI,
    state_dir: Path,
    model: nn.Module | None = None,
    *,
    limits: Limits = Limits(),
    require_client_cert: bool = False,
    linger_s: float = 0.0,
    task: dict | None = None,
    server: dict | None = None,
    **settings,
) -> ServerThread:
    """A FlotillaServer on a free port: ``settings`` are CoordinatorSettings, ``server`` any further
    FlotillaServer arguments (privacy, secure_masking, secure_buffer, ...)."""
    settings.setdefault("selection_window_s", 0.0)
    built = FlotillaServer(
        model if model is not None else tiny_model(),
        tls=pki.tls(require_client_cert),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=state_dir,
        settings=CoordinatorSettings(**settings),
        limits=limits,
        fsync=False,
        linger_s=linger_s,
        task=task,
        **(server or {}),
    )
    return ServerThread(built)


def connect(pki: PKI, st, i: int = 0):
    """A device connection with device i's token, trusting the test CA."""
    from flotilla.client import Connection

    return Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca)


def status(st) -> dict:
    """The coordinator's status, read on the server's own thread."""
    return st.call(st.server.coord.status)


def train_assignment(conn):
    """Check in and return the assignment; the device must be told to train."""
    ci = conn.check_in(10)
    assert ci.action == "train", ci
    return ci.assignment


def run_devices(st, pki: PKI, data, n: int, model=lambda: nn.Linear(5, 3)) -> dict:
    """``n`` SDK devices (clients 0..n-1 of ``data``), each in a thread, until the server says done;
    returns ``{i: DeviceReport}``.  Fails if a device is still running after 60 s."""
    import threading

    from flotilla.network.client import Device

    reports = {}

    def device(i):
        torch.manual_seed(i)
        reports[i] = Device(f"localhost:{st.port}", pki.token(i), model(), data, client=i, ca=pki.ca).run()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a device was never told done"
    return reports
