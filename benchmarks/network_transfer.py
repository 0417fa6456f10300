"""What moving a trip's bytes costs the server in CPython, before the server does anything else.

    .venv/bin/python benchmarks/network_transfer.py                    # 100 devices, 3 modes, 3 alternating repeats
    .venv/bin/python benchmarks/network_transfer.py --modes bare --clients 10

``network_load.py --floor`` times the irreducible parts of a trip single-threaded, with no sockets
between processes.  This measures the next layer up, between two processes over loopback TLS
(the load devices run in a second process, asyncio streams, one kept connection each): server CPU
milliseconds per trip (one upload of the model's bytes, then one download of as many), in these modes.

* ``bare``: the smallest server of this design: a thread per connection, blocking ``ssl``
  sockets, the body read record by record into a reused buffer with the fingerprint computed block
  by block (the data plane's own read loop), the download sent with one ``sendall``.  No framing
  beyond a 4-byte length, no event loop, no handlers: the cost of TLS, the kernel's copies and the
  thread hand-offs alone.
* ``dataplane``: flotilla/network/dataplane.py itself (frames, protobuf headers, the hops to an
  asyncio loop and back) with handlers that only hand over the bytes: no authentication, tickets,
  validation, ledger or fsync.
* ``bare-aes128``: ``bare`` with the server preferring TLS 1.3's AES-128-GCM over AES-256-GCM
  (an OpenSSL configuration file in ``OPENSSL_CONF`` for the benchmark's processes: Python 3.11's
  ``ssl`` cannot choose TLS 1.3 suites, so Flotilla does not).
* ``sealed``: ``bare`` without TLS records: plain TCP carrying AES-GCM-sealed 1 MiB chunks
  (``cryptography``'s ``decrypt_into``), the key assumed handed over on a TLS channel beforehand,
  the download sealed once and sent as it is: what Flotilla's sealed downloads and sealed uploads
  (network.sealed_uploads) do, without their handshake and handlers.
* ``tls-up-sealed-down``: ``bare``'s TLS upload (answered with one byte), and the download sealed
  once and sent on a second, plain TCP port: what ``network.sealed_download_port`` changes
  (docs/deployment.md, "Sealed downloads").

The full server's figure (``network_load.py``) minus ``dataplane`` is what the server's own work
costs; ``dataplane`` minus ``bare`` is the data plane's mechanics; ``bare`` is the transfer floor of
blocking sockets in threads.  Modes alternate, ``--repeats`` times, so load drifts hit both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from network_load import DataStream, cpu_seconds  # noqa: E402


def server_context(pki: Path) -> ssl.SSLContext:
    from flotilla.network.dataplane import server_context as data_context

    return data_context(str(pki / "server.pem"), str(pki / "server.key"))


def _listen(ready) -> socket.socket:
    """A loopback listener with the data plane's socket buffers; tells ``ready`` its port and our pid."""
    from flotilla.network.wire import DATA_SOCKET_BUFFER

    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        listener.setsockopt(socket.SOL_SOCKET, opt, DATA_SOCKET_BUFFER)
    ready.put((listener.getsockname()[1], os.getpid()))
    return listener


def _serve_forever(listener: socket.socket, connection) -> None:
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=connection, args=(raw,), daemon=True).start()


def _exactly(sock, view) -> bool:
    """Fill ``view`` from ``sock``; False if the peer hung up first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def serve_bare(pki: Path, size: int, ready, sealed_download: bytes | None = None) -> None:
    """One thread per connection: read a 4-byte length and that many body bytes, send ``size`` back.
    With ``sealed_download``: answer the upload with one byte, and serve ``sealed_download`` on a
    second, plain TCP listener to each byte received there (mode ``tls-up-sealed-down``)."""
    from flotilla.network.bodies import UploadBodies
    from flotilla.network.coordinator import FINGERPRINT_BLOCK, crc32

    ctx = server_context(pki)
    model = os.urandom(size) if sealed_download is None else b"k"
    bodies, lock = UploadBodies(), threading.Lock()
    listener = _listen(ready)
    if sealed_download is not None:
        plain = _listen(ready)

        def download(sock) -> None:
            one = bytearray(1)
            while _exactly(sock, memoryview(one)):
                sock.sendall(sealed_download)

        threading.Thread(target=_serve_forever, args=(plain, download), daemon=True).start()

    def connection(raw) -> None:
        sock = ctx.wrap_socket(raw, server_side=True)
        read = sock._sslobj.read  # as dataplane._receive_body does
        head = bytearray(4)
        while _exactly(sock, memoryview(head)):
            (n,) = struct.unpack(">I", head)
            with lock:
                buf = bodies.take(n)
            pos = crc = 0
            while pos < n:
                end = min(pos + FINGERPRINT_BLOCK, n)
                start = pos
                while pos < end:
                    pos += read(end - pos, buf[pos:end])
                crc = crc32(buf[start:end], crc)
            with lock:
                bodies.give(buf)
            sock.sendall(model)

    _serve_forever(listener, connection)


SEAL_CHUNK = 1 << 20  # sealed mode: AES-GCM chunks of 1 MiB plaintext (+16 bytes of tag each)


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def _seal(aead, data: bytes) -> bytes:
    """``data`` as AES-GCM-sealed chunks of SEAL_CHUNK bytes (each +16 bytes of tag), nonce = chunk index."""
    return b"".join(
        aead.encrypt(_nonce(i), data[o : o + SEAL_CHUNK], None) for i, o in enumerate(range(0, len(data), SEAL_CHUNK))
    )


def sealed_model(size: int) -> bytes:
    """A random model of ``size`` bytes as the sealed-download port serves it (sealed_downloads.seal)."""
    from flotilla.network.sealed_downloads import seal

    return seal(0, os.urandom(size))[1]


def serve_sealed(size: int, key: bytes, ready) -> None:
    """``bare`` without TLS: plain TCP carrying AES-GCM-sealed 1 MiB chunks (the key is assumed
    handed over on a TLS channel beforehand); the download is sealed once and sent as it is."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from flotilla.network.bodies import UploadBodies
    from flotilla.network.coordinator import crc32

    aead = AESGCM(key)
    model = os.urandom(size)
    sealed_model = _seal(aead, model)
    bodies, lock = UploadBodies(), threading.Lock()
    listener = _listen(ready)

    def connection(sock) -> None:
        head = bytearray(4)
        chunk = memoryview(bytearray(SEAL_CHUNK + 16))
        while _exactly(sock, memoryview(head)):
            (n,) = struct.unpack(">I", head)
            with lock:
                buf = bodies.take(n)
            crc = 0
            for i, o in enumerate(range(0, n, SEAL_CHUNK)):
                m = min(SEAL_CHUNK, n - o)
                if not _exactly(sock, chunk[: m + 16]):
                    return
                aead.decrypt_into(_nonce(i), chunk[: m + 16], None, buf[o : o + m])
                crc = crc32(buf[o : o + m], crc)
            with lock:
                bodies.give(buf)
            sock.sendall(sealed_model)

    _serve_forever(listener, connection)


class PassThrough:
    """Data-plane handlers that only hand the bytes over (no auth, tickets, checks or ledger)."""

    def __init__(self, size: int):
        from flotilla.network.bodies import UploadBodies

        self.model = os.urandom(size)
        self.bodies = UploadBodies()

    async def data_download(self, token, peer, request):
        return self.model, 0

    async def data_upload(self, token, peer, header, receive):
        size = len(self.model)
        view, *_ = await receive(size, f"{size} bytes", self.bodies.take(size))
        self.bodies.give(view)
        from flotilla.network.wire import pb

        return pb.UploadReply()

    def data_refused(self, err, peer) -> None:
        pass


def serve_dataplane(pki: Path, size: int, clients: int, ready) -> None:
    from flotilla.network.dataplane import DataPlane

    async def main():
        plane = DataPlane(
            server_context(pki), PassThrough(size), asyncio.get_running_loop(), max_connections=clients + 16
        )
        ready.put((plane.start("127.0.0.1", 0), os.getpid()))
        await asyncio.Event().wait()

    asyncio.run(main())


async def load(port: int, mode: str, clients: int, size: int, ca: bytes, trips, key: bytes, plain_port: int) -> None:
    from flotilla.network.wire import pb

    body = os.urandom(size)
    header = pb.UploadHeader(ticket="t", base_version=0, dtype="float32", shape=[size // 4], num_examples=1)

    async def bare_device():
        ctx = ssl.create_default_context(cadata=ca.decode())
        reader, writer = await asyncio.open_connection("localhost", port, ssl=ctx, server_hostname="localhost")
        while True:
            writer.write(struct.pack(">I", size))
            writer.write(body)
            await reader.readexactly(size)
            trips.value += 1

    async def dataplane_device():
        stream = DataStream(port, ca, "token")
        while True:
            await stream.upload(header, body)
            await stream.download(0)
            trips.value += 1

    async def sealed_device():
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = AESGCM(key)
        sealed = _seal(aead, body)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            writer.write(struct.pack(">I", size))
            writer.write(sealed)
            await reader.readexactly(len(sealed))
            trips.value += 1

    async def tls_up_sealed_down_device():
        ctx = ssl.create_default_context(cadata=ca.decode())
        reader, writer = await asyncio.open_connection("localhost", port, ssl=ctx, server_hostname="localhost")
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", plain_port)
        from flotilla.network.sealed_downloads import sealed_size

        while True:
            writer.write(struct.pack(">I", size))
            writer.write(body)
            await reader.readexactly(1)
            plain_writer.write(b"d")
            await plain_reader.readexactly(sealed_size(size))
            trips.value += 1

    device = {
        "tls-up-sealed-down": tls_up_sealed_down_device,
        "bare": bare_device,
        "bare-aes128": bare_device,
        "dataplane": dataplane_device,
        "sealed": sealed_device,
    }[mode]
    await asyncio.gather(*(device() for _ in range(clients)))


def run_load(port, mode, clients, size, ca, trips, key, plain_port) -> None:
    asyncio.run(load(port, mode, clients, size, ca, trips, key, plain_port))


AES128_FIRST = """openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
"""


def negotiated(port: int, pki: Path) -> str:
    """The TLS suite the server picks for a default client (one probe connection, then closed)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return s.cipher()[0]


def measure(mode: str, args, pki: Path) -> dict:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    size = 4 * args.params
    key = os.urandom(16)
    if mode == "bare-aes128":  # read by OpenSSL when each spawned process starts
        conf = pki.parent / "aes128.cnf"
        conf.write_text(AES128_FIRST)
        os.environ["OPENSSL_CONF"] = str(conf)
    target, targs = {
        "bare": (serve_bare, (pki, size, ready)),
        "bare-aes128": (serve_bare, (pki, size, ready)),
        "dataplane": (serve_dataplane, (pki, size, args.clients, ready)),
        "sealed": (serve_sealed, (size, key, ready)),
        "tls-up-sealed-down": (serve_bare, (pki, size, ready, sealed_model(size))),
    }[mode]
    server = ctx.Process(target=target, args=targs, daemon=True)
    server.start()
    port, pid = ready.get(timeout=60)
    plain_port = ready.get(timeout=60)[0] if mode == "tls-up-sealed-down" else 0
    cipher = None if mode == "sealed" else negotiated(port, pki)
    trips = ctx.Value("q", 0, lock=False)
    loader = ctx.Process(
        target=run_load,
        args=(port, mode, args.clients, size, (pki / "ca.pem").read_bytes(), trips, key, plain_port),
        daemon=True,
    )
    loader.start()
    os.environ.pop("OPENSSL_CONF", None)
    try:
        time.sleep(args.warmup)
        c0, t0, k0 = cpu_seconds(pid), time.monotonic(), trips.value
        time.sleep(args.duration)
        c1, t1, k1 = cpu_seconds(pid), time.monotonic(), trips.value
    finally:
        loader.kill()
        server.kill()
        loader.join()
        server.join()
    done = k1 - k0
    return {
        "mode": mode,
        "cipher": cipher,
        "trips_per_s": round(done / (t1 - t0), 1),
        "server_cpu_cores": round((c1 - c0) / (t1 - t0), 2),
        "server_cpu_ms_per_trip": round(1000 * (c1 - c0) / max(done, 1), 2),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--params", type=int, default=1_000_000, help="float32 parameters: 4x this many bytes each way")
    ap.add_argument("--modes", default="bare,dataplane,sealed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    from flotilla.network.certs import make_deployment

    pki = Path(tempfile.mkdtemp(prefix="flotilla-transfer-")) / "pki"
    make_deployment(pki, devices=0)
    modes = args.modes.split(",")
    runs = []
    for _ in range(args.repeats):
        for mode in modes:
            runs.append(measure(mode, args, pki))
            print(json.dumps(runs[-1]), flush=True)
    res = {
        "clients": args.clients,
        "params": args.params,
        "tls": ssl.OPENSSL_VERSION,
        "median_server_cpu_ms_per_trip": {
            m: round(statistics.median(x["server_cpu_ms_per_trip"] for x in runs if x["mode"] == m), 2) for m in modes
        },
        "runs": runs,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
