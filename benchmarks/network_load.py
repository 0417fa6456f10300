"""Load test of the network server: many concurrent devices uploading a ~1M-parameter model.

    .venv/bin/python benchmarks/network_load.py                       # 200 clients, 30 s, fsync on
    .venv/bin/python benchmarks/network_load.py --clients 400 --procs 4 --no-fsync
    .venv/bin/python benchmarks/network_load.py --clients 100 --procs 1 --transport grpc

One server process (``FlotillaServer``, async FedBuff mode, TLS, token auth, every upload
validated, written to the ledger and fsync'd, as in production) and ``--procs`` load processes
that run ``--clients`` devices as asyncio coroutines, each with its own TLS channel and token.
A device does no training: check in, download the model (4 MB), upload a fixed small delta
(4 MB), repeat.  ``--transport data`` (the default) checks in (after the first check-in),
downloads and uploads through the server's data plane (flotilla/network/dataplane.py, one kept
TLS connection per device, asyncio streams); ``--transport grpc`` turns the data plane off and
streams them in gRPC chunks.  Reported over the measurement window (after ``--warmup``):
accepted updates per second, upload latency p50/p99 (call start to the server's ack), download
latency, server CPU (cores, and milliseconds per accepted trip: the load processes share the
cores, so CPU per trip is the steadier figure), where the server's CPU went by thread (gRPC's
C-core pollers do TLS and HTTP/2; the event loop runs the handlers; the default executor stages
and fsyncs; "data" the data plane's threads: TLS, socket copies and the fingerprint), and the
server's own accepted/rejected counts, and the server's context switches per trip by thread
(each hand-off of the GIL or of work between threads costs one or two).

``--sealed-downloads`` has the server offer sealed downloads (network.sealed_download_port: the
model over plain TCP, sealed once per version); the devices fetch and check them as the SDK does.
``--sealed-uploads`` (with it) has the devices upload over the same port, sealed under a key per
assignment (network.sealed_uploads), through the data plane's upload handler.

``--profile PATH`` writes a cProfile (pstats) of the server's event-loop thread over the window.

``--floor`` runs no server: it times, alone and on one core, the parts of a trip no server can
skip (TLS both ways, the kernel's socket copies, the norm and the weighted sum, the checksum that
tells a retry from a replay, the fsync'd staging and ledger writes, a server step every K
uploads) and the copies gRPC's Python binding makes, and prints their sum per trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mlp(params: int):
    """784 -> h -> 200 MLP with about ``params`` parameters."""
    from torch import nn

    hidden = max(1, round((params - 200) / (784 + 1 + 200)))
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 200))


def serve(args, pki_dir: str, state_dir: str, ready, stop, profiling, profiled) -> None:
    import logging

    import torch

    logging.getLogger("flotilla.network").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from flotilla.network.auth import TokenTable
    from flotilla.network.coordinator import CoordinatorSettings
    from flotilla.network.server import FlotillaServer, Limits, ServerThread, TLSFiles

    torch.manual_seed(0)
    p = Path(pki_dir)
    server = FlotillaServer(
        mlp(args.params),
        tls=TLSFiles(str(p / "server.pem"), str(p / "server.key")),
        tokens=TokenTable.load(p / "tokens.json"),
        state_dir=state_dir,
        settings=CoordinatorSettings(
            mode="async",
            total_steps=10**9,
            concurrency=args.clients,
            buffer_size=args.buffer,
            assignment_timeout_s=600,
            max_update_norm=100.0,
            retry_after_s=args.retry_after_s,
        ),
        # a data-plane thread for every device (past the default 128 the SDK would use gRPC, which
        # the load devices do not: they would only retry)
        limits=Limits(
            rate=1000.0, burst=1000, chunk_bytes=args.chunk_kb * 1024, data_connections=max(128, args.clients + 16)
        ),
        fsync=not args.no_fsync,
        compression=args.compression,
        linger_s=0,
        data_port="auto" if args.transport == "data" else "off",
        sealed_download_port="auto" if args.sealed_downloads else "off",
        sealed_uploads=args.sealed_uploads,
    )
    st = ServerThread(server)
    st.call(name_threads)
    if server.dataplane is not None:  # its pool's threads start on demand: name them "data" as they do
        server.dataplane._pool._initializer, server.dataplane._pool._initargs = _name_thread, ("data",)
    if server.sealed_port is not None:
        server.sealed_port._pool._initializer, server.sealed_port._pool._initargs = _name_thread, ("sealed",)
    ready.put((st.port, server.flat.numel, os.getpid()))
    if args.profile:
        import cProfile

        prof = cProfile.Profile(time.thread_time)  # CPU, not wall (no GIL waits); the thread that enables it: the loop
        profiling.wait()
        st.call(prof.enable)
        profiled.wait()
        st.call(prof.disable)
        prof.dump_stats(args.profile)
    stop.wait()
    st.stop()


def _name_thread(name: str) -> None:
    """Name the calling OS thread (what /proc/PID/task/*/comm shows), for the CPU-by-thread figures."""
    import ctypes

    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def name_threads() -> None:
    """On the server's loop: name the loop's thread "loop" and the default executor's threads (disk
    writes, fsyncs) "io"; gRPC's own threads keep their names ("event_engine"), the rest are "python"."""
    from concurrent.futures import ThreadPoolExecutor

    _name_thread("loop")
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=_name_thread, initargs=("io",)))


class DataStream:
    """A load device's data-plane connection (asyncio streams over TLS; flotilla.proto DataRequest)."""

    def __init__(self, port: int, ca: bytes, token: str):
        import ssl

        self.port, self.token = port, token
        self.ctx = ssl.create_default_context(cadata=ca.decode())
        self.reader = self.writer = None

    async def _frame(self, request) -> object:

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "localhost", self.port, ssl=self.ctx, server_hostname="localhost"
            )
        from flotilla.network.wire import frame

        self.writer.write(frame(request))
        return await self.reply()

    async def reply(self):
        from flotilla.network.wire import FRAME_LEN, pb

        (size,) = FRAME_LEN.unpack(await self.reader.readexactly(4))
        r = pb.DataReply.FromString(await self.reader.readexactly(size))
        if r.code:
            raise RuntimeError(f"{r.code}: {r.message}")
        return r

    async def check_in(self, num_examples: int):
        from flotilla.network.wire import SDK_VERSION, pb

        r = await self._frame(
            pb.DataRequest(
                token=self.token, check_in=pb.CheckInRequest(num_examples=num_examples, sdk_version=SDK_VERSION)
            )
        )
        return r.check_in

    async def download(self, version: int) -> int:
        from flotilla.network.wire import pb

        r = await self._frame(pb.DataRequest(token=self.token, download=pb.DownloadRequest(version=version)))
        got = 0
        while got < r.total_bytes:
            got += len(await self.reader.read(min(1 << 20, r.total_bytes - got)))
        return got

    async def upload(self, header, body: bytes):
        from flotilla.network.wire import pb

        await self._frame(pb.DataRequest(token=self.token, upload=header, body_bytes=len(body)))
        self.writer.write(body)
        return (await self.reply()).upload

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def sealed_download(offer, version: int) -> int:
    """As the SDK: fetch a sealed download over plain TCP, then check every tag and the digest."""
    from flotilla.network import sealed_downloads as sd

    reader, writer = await asyncio.open_connection("127.0.0.1", offer.port)
    try:
        writer.write(sd.MAGIC + offer.ticket)
        size = int.from_bytes(await reader.readexactly(8), "big")
        if size == 0:
            raise RuntimeError("sealed download refused")
        sealed = await reader.readexactly(size)
    finally:
        writer.close()
    out = bytearray(offer.total_bytes)
    sd.unseal(offer, version, sealed, memoryview(out))
    return len(out)


class _Pipe:
    """The plain socket under a SealedChannel, as asyncio streams feed it: what the channel sends
    is collected, what it reads was put in ``inbox``."""

    def __init__(self):
        self.out: list[bytes] = []
        self.inbox = bytearray()

    def sendall(self, data) -> None:
        self.out.append(bytes(data))

    def recv_into(self, view) -> int:
        n = min(len(view), len(self.inbox))
        view[:n] = self.inbox[:n]
        del self.inbox[:n]
        return n


async def sealed_upload(offer, token: str, header, body: bytes):
    """As the SDK (flotilla.network.sealed_uploads.upload), on asyncio streams: the upload sealed
    under the assignment's key over plain TCP; returns the server's UploadReply."""
    from flotilla.network import sealed_uploads as su
    from flotilla.network.wire import frame, pb, read_frame

    keys, pipe = su.DeviceKeys(offer), _Pipe()
    channel = su.SealedChannel(pipe, send_key=keys.up)
    reader, writer = await asyncio.open_connection("127.0.0.1", offer.port)

    async def send() -> None:
        writer.writelines(pipe.out)
        pipe.out.clear()
        await writer.drain()

    async def reply():
        head = await reader.readexactly(4)
        pipe.inbox += head + await reader.readexactly(int.from_bytes(head, "big"))
        r = pb.DataReply.FromString(read_frame(channel))
        if r.code:
            raise RuntimeError(f"{r.code}: {r.message}")
        return r

    try:
        pipe.sendall(keys.hello())
        channel.sendall(frame(pb.DataRequest(token=token, upload=header, body_bytes=len(body))))
        await send()
        status = await reader.readexactly(1 + su.SALT_BYTES)
        if status[:1] != su.ACCEPTED:
            raise RuntimeError("sealed upload refused")
        channel.receive_with(keys.down(status[1:]))
        await reply()
        channel.sendall(body)
        await send()
        return (await reply()).upload
    finally:
        writer.close()


async def rest(reply) -> None:
    """As the SDK (Device.run): an accepted upload's reply may say how long the server gives this
    device no work (UploadReply.rest_s); checking in sooner would only be told WAIT."""
    import random

    if reply.rest_s > 0:
        await asyncio.sleep(reply.rest_s * random.uniform(1.0, 1.2))


async def device(
    i: int,
    token: str,
    port: int,
    ca: bytes,
    deadline: float,
    delta_parts,
    records: list,
    compression: str,
    body: bytes = b"",
):
    import grpc

    from flotilla.network import wire
    from flotilla.network.wire import pb

    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = wire.channel_options(wire.DEFAULT_MAX_MESSAGE_BYTES)
    meta = ((wire.AUTH_HEADER, f"Bearer {token}"),)
    ser = lambda m: m.SerializeToString()  # noqa: E731
    async with grpc.aio.secure_channel(
        f"localhost:{port}", creds, options=options, compression=wire.compression(compression)
    ) as ch:
        check_in = ch.unary_unary(wire.CHECK_IN, ser, pb.CheckInReply.FromString)
        download = ch.unary_stream(wire.DOWNLOAD, ser, pb.ModelChunk.FromString)
        upload = ch.stream_unary(wire.UPLOAD, ser, pb.UploadReply.FromString)
        stream = None
        while time.time() < deadline:
            try:
                if stream is not None:  # the data plane named by an earlier check-in (as the SDK does)
                    r = await stream.check_in(10)
                else:
                    r = await check_in(pb.CheckInRequest(num_examples=10, sdk_version=wire.SDK_VERSION), metadata=meta)
                if r.action != pb.CheckInReply.TRAIN:
                    await asyncio.sleep(r.retry_after_s or 0.1)
                    continue
                a = r.assignment
                t0 = time.time()
                h = pb.UploadHeader(
                    ticket=a.ticket, base_version=a.version, dtype="float32", shape=[a.numel], num_examples=10
                )
                if r.data_port:  # the data plane
                    stream = stream or DataStream(r.data_port, ca, token)
                    if a.HasField("sealed_download"):
                        await sealed_download(a.sealed_download, a.version)
                    else:
                        await stream.download(a.version)
                    t1 = time.time()
                    if a.HasField("sealed_upload"):
                        up = await sealed_upload(a.sealed_upload, token, h, body)
                    else:
                        up = await stream.upload(h, body)
                    t2 = time.time()
                    records.append((t2, t2 - t1, t1 - t0, True))
                    await rest(up)
                    continue
                n = 0
                async for chunk in download(pb.DownloadRequest(version=a.version), metadata=meta):
                    n += len(chunk.data)
                t1 = time.time()
                header = pb.UploadPart(header=h)

                async def parts():
                    yield header
                    for p in delta_parts:
                        yield p

                up = await upload(parts(), metadata=meta)
                t2 = time.time()
                records.append((t2, t2 - t1, t1 - t0, True))
                await rest(up)
            except grpc.aio.AioRpcError as e:
                records.append((time.time(), 0.0, 0.0, False))
                if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                    await asyncio.sleep(0.5)
            except (RuntimeError, OSError, asyncio.IncompleteReadError):  # the data plane refused or broke
                records.append((time.time(), 0.0, 0.0, False))
                if stream is not None:
                    stream.close()
                    stream = None
                await asyncio.sleep(0.5)
        if stream is not None:
            stream.close()


def load(args, pki_dir: str, port: int, numel: int, devices: list[tuple[str, str]], deadline: float, out) -> None:
    import torch

    from flotilla.network.wire import chunks, pb

    torch.manual_seed(1)
    data = (torch.randn(numel) * 1e-3).numpy().tobytes()
    delta_parts = [pb.UploadPart(data=bytes(c)) for c in chunks(data, args.chunk_kb * 1024)]
    ca = (Path(pki_dir) / "ca.pem").read_bytes()
    records: list = []

    async def main():
        await asyncio.gather(
            *(
                device(i, tok, port, ca, deadline, delta_parts, records, args.compression, data)
                for i, (name, tok) in enumerate(devices)
            )
        )

    asyncio.run(main())
    out.put(records)


def _cpu(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def floor(args) -> dict:
    """CPU milliseconds of each irreducible part of one trip (the median of ``--floor-repeats``)."""
    import socket
    import threading

    import torch
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from flotilla.network.coordinator import crc32
    from flotilla.network.store import StateStore

    torch.set_num_threads(1)
    numel = sum(p.numel() for p in mlp(args.params).parameters())
    nbytes = 4 * numel
    torch.manual_seed(1)
    delta = torch.randn(numel) * 1e-3
    data = delta.numpy().tobytes()
    acc = torch.zeros(numel)
    record = 16384  # a TLS record's payload
    # grpc's BoringSSL negotiates an AES-GCM suite (AES-128 with AES hardware, AES-256 with OpenSSL
    # clients); AES-256 is the dearer of the two
    key, nonce = AESGCM(AESGCM.generate_key(256)), os.urandom(12)
    sealed = [key.encrypt(nonce, data[i : i + record], None) for i in range(0, nbytes, record)]
    tmp = Path(tempfile.mkdtemp(prefix="flotilla-floor-"))
    store = StateStore(tmp, fsync=True)
    entry = {"seq": 0, "assignment": "a" * 32, "device": "device-000", "norm": 0.1, "digest": "crc32:0:0"}
    weights = torch.zeros(numel)

    def tls():
        for c in sealed:  # upload: decrypt
            key.decrypt(nonce, c, None)
        for i in range(0, nbytes, record):  # download: encrypt
            key.encrypt(nonce, data[i : i + record], None)

    a, b = socket.socket(), socket.socket()
    srv = socket.create_server(("127.0.0.1", 0))
    a.connect(srv.getsockname())
    b, _ = srv.accept()
    sink = bytearray(nbytes)

    def socket_copies():  # one send and one receive of 3.8 MB: the server's side of both transfers
        t = threading.Thread(target=a.sendall, args=(data,))
        t.start()
        view, got = memoryview(sink), 0
        while got < nbytes:
            got += b.recv_into(view[got:])
        t.join()

    def sum_and_norm():
        float(torch.linalg.vector_norm(delta))
        acc.add_(delta, alpha=0.5)

    def write_and_fsync():  # stage (file + folder fsync'd), the ledger line (fsync'd), the file's removal
        name = store.stage(data)
        store.accept(entry)
        store.discard(name)

    def step_share():  # a snapshot of the weights (temp + fsync + rename) every K uploads
        store.step(1, [], {"weights": weights}, {})

    view = memoryview(data)

    def grpc_copies():  # gRPC's Python binding, per 1 MiB message: received slices -> bytes -> joined
        for m in range(0, nbytes, 1 << 20):  # message; sent: its bytes copied into a slice
            b"".join(
                [view[i : min(i + record, m + (1 << 20), nbytes)].tobytes() for i in range(m, m + (1 << 20), record)]
            )
            bytearray(view[m : m + (1 << 20)])

    parts = {
        "tls_aes_gcm_7.6MB": (tls, 1),
        "socket_send_recv_3.8MB_each": (socket_copies, 1),
        "sum_and_norm": (sum_and_norm, 1),
        "crc32_fingerprint": (lambda: crc32(data), 1),
        "stage_ledger_fsync": (write_and_fsync, 1),
        f"snapshot_fsync_per_{args.buffer}": (step_share, 1 / args.buffer),
    }
    out = {}
    for name, (fn, share) in {**parts, "grpc_python_copies_3x3.8MB_in_1MiB_messages": (grpc_copies, 1)}.items():
        fn()  # warm
        times = []
        for _ in range(args.floor_repeats):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        out[name] = round(1000 * share * statistics.median(times), 3)
    a.close(), b.close(), srv.close()
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    out["floor_ms_per_trip"] = round(sum(out[k] for k in parts), 2)
    out["floor_with_grpc_copies_ms"] = round(
        out["floor_ms_per_trip"] + out["grpc_python_copies_3x3.8MB_in_1MiB_messages"], 2
    )
    out["load_avg"] = os.getloadavg()
    return out


def cpu_seconds(pid: int) -> float:
    return _cpu(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of ``pid``, summed by thread name (grpc pollers, the loop...).
    From ``schedstat`` (the scheduler's nanoseconds on a CPU), not ``stat``'s clock ticks: ticks
    miss threads that run in bursts shorter than a tick (with sealed downloads the tick-based
    figures summed to 0.6 ms per trip less than the process's CPU; schedstat's sum to it)."""
    out: dict[str, float] = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            seconds = int((t / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile (or no schedstat)
            continue
        out[name] = out.get(name, 0.0) + seconds
    return out


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + involuntary) of each live thread of ``pid``, summed by name:
    every hand-off of the GIL or of work between threads is one or two of them."""
    out: dict[str, int] = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            status = (t / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        n = sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
        out[name] = out.get(name, 0) + n
    return out


def main() -> int:
    from flotilla.network import wire

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes (clients split among them)")
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--buffer", type=int, default=10, help="FedBuff K")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load after the warm-up")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument(
        "--retry-after-s",
        type=float,
        default=0.5,
        help="the server's retry_after_s (0.5, its default: a device that just uploaded is told WAIT once "
        "before its next assignment; 0: one check-in per trip)",
    )
    ap.add_argument("--compression", default="none", choices=["none", "gzip"])
    ap.add_argument(
        "--sealed-downloads",
        action="store_true",
        help="the server offers sealed downloads (network.sealed_download_port: auto): the model over plain "
        "TCP, sealed once per version; the devices check tags and digest as the SDK does",
    )
    ap.add_argument(
        "--sealed-uploads",
        action="store_true",
        help="with --sealed-downloads: the devices upload over the sealed port too (network.sealed_uploads), "
        "sealed under a key per assignment, as the SDK does",
    )
    ap.add_argument(
        "--transport",
        default="data",
        choices=["data", "grpc"],
        help="downloads and uploads through the data plane (default) or gRPC's chunked streams",
    )
    ap.add_argument(
        "--chunk-kb",
        type=int,
        default=wire.DEFAULT_CHUNK_BYTES // 1024,
        help="chunk size of downloads and uploads (default: the client's, wire.DEFAULT_CHUNK_BYTES)",
    )
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--floor", action="store_true", help="time the irreducible parts of a trip alone; no server")
    ap.add_argument("--floor-repeats", type=int, default=21)
    ap.add_argument("--profile", help="write a cProfile of the server's event loop over the window to this file")
    args = ap.parse_args()
    if args.floor:
        report(floor(args), args.json)
        return 0

    from flotilla.network.certs import make_deployment, read_tokens_txt

    tmp = Path(tempfile.mkdtemp(prefix="flotilla-load-"))
    paths = make_deployment(tmp / "pki", devices=args.clients)
    tokens = [(k, v) for k, v in read_tokens_txt(paths["tokens_txt"]).items() if k != "admin"]
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    profiling, profiled = ctx.Event(), ctx.Event()
    server = ctx.Process(
        target=serve, args=(args, str(tmp / "pki"), str(tmp / "state"), ready, stop, profiling, profiled)
    )
    server.start()
    try:
        return _run(args, tmp, paths, tokens, ctx, server, ready, stop, out, profiling, profiled)
    finally:  # whatever failed, no server process is left running (it waits for `stop` otherwise)
        stop.set()
        server.join(60)
        if server.is_alive():
            server.kill()


def _run(args, tmp, paths, tokens, ctx, server, ready, stop, out, profiling, profiled) -> int:
    from flotilla.network.certs import read_tokens_txt

    port, numel, server_pid = ready.get(timeout=120)
    print(f"server pid {server_pid} (e.g. perf record -g -p {server_pid})", file=sys.stderr, flush=True)
    start = time.time()
    deadline = start + args.warmup + args.duration
    shares = [tokens[i :: args.procs] for i in range(args.procs)]
    workers = [ctx.Process(target=load, args=(args, str(tmp / "pki"), port, numel, s, deadline, out)) for s in shares]
    for w in workers:
        w.daemon = True  # ended with this process if it fails
        w.start()
    time.sleep(max(0.0, start + args.warmup - time.time()))
    profiling.set()
    cpu0, threads0, t0 = cpu_seconds(server_pid), thread_cpu(server_pid), time.time()
    switches0 = thread_switches(server_pid)
    time.sleep(max(0.0, deadline - time.time()))
    cpu1, threads1, t1 = cpu_seconds(server_pid), thread_cpu(server_pid), time.time()
    switches1 = thread_switches(server_pid)
    profiled.set()
    records = [r for _ in workers for r in out.get(timeout=args.warmup + args.duration + 300)]
    for w in workers:
        w.join()
    from flotilla.network.client import Connection

    with Connection(f"localhost:{port}", read_tokens_txt(paths["tokens_txt"])["admin"], ca=paths["ca_pem"]) as c:
        status = c.status()
    stop.set()
    server.join(60)

    window = [r for r in records if start + args.warmup <= r[0] <= deadline]
    ok = [r for r in window if r[3]]
    up = sorted(r[1] for r in ok)
    down = sorted(r[2] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    res = {
        "clients": args.clients,
        "params": numel,
        "model_mb": round(4 * numel / 2**20, 2),
        "buffer_k": args.buffer,
        "fsync": not args.no_fsync,
        "compression": args.compression,
        "transport": args.transport,
        "chunk_kb": args.chunk_kb,
        "window_s": round(args.duration, 1),
        "accepted_per_s": round(len(ok) / args.duration, 1),
        "upload_p50_s": round(pct(up, 0.5), 3),
        "upload_p99_s": round(pct(up, 0.99), 3),
        "upload_mean_s": round(statistics.fmean(up), 3) if up else None,
        "download_p50_s": round(pct(down, 0.5), 3),
        "download_p99_s": round(pct(down, 0.99), 3),
        "failed_calls_in_window": len(window) - len(ok),
        "server_cpu_cores": round((cpu1 - cpu0) / max(t1 - t0, 1e-9), 2),
        # CPU seconds over the window / trips accepted in it (the server's figure, not the devices')
        "server_cpu_ms_per_trip": round(1000 * (cpu1 - cpu0) / max(len(ok), 1), 2),
        "server_cpu_ms_per_trip_by_thread": {
            k: round(1000 * (v - threads0.get(k, 0.0)) / max(len(ok), 1), 2)
            for k, v in sorted(threads1.items(), key=lambda kv: -(kv[1] - threads0.get(kv[0], 0.0)))
            if v - threads0.get(k, 0.0) > 0
        },
        # context switches per accepted trip, by thread (threads that ended in the window are missed)
        "server_switches_per_trip_by_thread": {
            k: round((v - switches0.get(k, 0)) / max(len(ok), 1), 1)
            for k, v in sorted(switches1.items(), key=lambda kv: -(kv[1] - switches0.get(kv[0], 0)))
            if v - switches0.get(k, 0) > 0
        },
        "server_version": status["version"],
        "server_accepted": status["accepted"],
        "server_rejected": status["rejected"],
        "server_upload_buffers_made": status.get("upload_buffers", {}).get("made"),
        # --sealed-downloads: offers made, fetches sent and refused, versions sealed (None: off)
        "sealed_downloads": status.get("sealed_downloads"),
        # --sealed-uploads: offers made, tickets used and refused (None: off)
        "sealed_uploads": status.get("sealed_uploads"),
        # check-ins per accepted update over the whole run (the first of each device went over gRPC)
        "data_plane_check_ins_per_accepted": round(
            (status.get("data_plane_served") or {}).get("check_in", 0) / max(status["accepted"], 1), 2
        ),
        "load_avg": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    report(res, args.json)
    return 0


def report(res: dict, json_path: str | None) -> None:
    """Print the results, and write them to ``json_path`` if given."""
    print(json.dumps(res, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
