"""Scale-out, aggregator side: a process that receives, validates and sums uploads for a coordinator.

    flotilla serve CONFIG --port P --aggregators 2          # coordinator + 2 aggregators on this machine
    flotilla aggregator CONFIG --coordinator HOST:P --name a1 --key-file aggregator.key --port Q \\
        --advertise this-host:Q                              # one more, on another machine

An aggregator serves the device-facing ``Upload`` and ``Download`` RPCs (same TLS certificate, token table and limits
as the coordinator's config) and the same two on its own data plane (:mod:`flotilla.network.dataplane`,
``network.data_port``: auto / N / off; the port is reported at registration and handed to devices in
their assignment; no check-ins there: devices check in with the coordinator), and talks to its
coordinator over the control service of :mod:`flotilla.network.partials` (the coordinator's TLS
port, authenticated by the aggregator key).  Both transports go through one upload function
(:meth:`AggregatorServer.accept_upload`) and one download function.
Per upload: token, ticket signature and owner, dtype and shape are checked before the body is read;
then the body is streamed (``upload_slots`` at once), validated (finite, ``max_update_norm``,
``max_update_abs``: the coordinator's own ``check_delta``), staged to ``STATE/pending/`` and
fsync'd, and *claimed* at the coordinator (ticket, live assignment, freshness, staleness, numbers;
the ledger line).  Only when the claim is answered is ``alpha * delta`` added to the partial sum
and the device acked.  At a step the coordinator asks for the partial sum of exactly the seqs it
holds for this aggregator; their files are deleted once the coordinator's outstanding list no
longer names them (committed, or dropped with a ledger line).  A restart (or a new coordinator
boot) re-registers and rebuilds the partial sum from the files the coordinator still lists.
Downloads: each version's weights are fetched from the coordinator once and served from memory
(the newest four versions; an older one is fetched again, or refused as the coordinator refuses it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import torch

from flotilla.network import partials, wire
from flotilla.network.auth import RateLimiter, TokenTable
from flotilla.network.bodies import UploadBodies
from flotilla.network.coordinator import Coordinator, crc32, fingerprint_text
from flotilla.network.refusals import Refused
from flotilla.network.server import Limits, TLSFiles, _in_use, data_plane
from flotilla.network.store import StateStore
from flotilla.network.tickets import Ticket
from flotilla.network.wire import pb

log = logging.getLogger("flotilla.network.aggregator")

_CODES = {c.name: c for c in grpc.StatusCode}
CLAIM_TIMEOUT_S = 60.0


class AggregatorServer:
    def __init__(
        self,
        *,
        name: str,
        coordinator: str,
        key: bytes,
        tls: TLSFiles,
        tokens: TokenTable,
        state_dir: str | Path,
        ca: str | None = None,
        cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        advertise: str | None = None,
        limits: Limits = Limits(),
        fsync: bool = True,
        linger_s: float = 2.0,
        data_port: int | str | None = "auto",
    ):
        if not partials._NAME.match(name):
            raise ValueError(f"--name: {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if data_port not in (None, "auto", "off") and not (isinstance(data_port, int) and 0 <= data_port <= 65535):
            raise ValueError(f"network.data_port: must be between 0 and 65535, 'auto' or 'off', got {data_port!r}")
        self.name, self.coordinator, self.key = name, coordinator, key
        self.tls, self.tokens, self.limits = tls, tokens, limits
        self._credentials = tls.credentials()
        self._control_creds = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes() if ca else None,
            private_key=Path(client_key).read_bytes() if client_key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
        self.server_name = server_name
        self.advertise = advertise
        self.linger_s = linger_s
        self.store = StateStore(state_dir, fsync=fsync)
        self.store.lock()
        self.boot = secrets.token_hex(8)
        self.counters: Counter[str] = Counter()
        self.limiter = RateLimiter(limits.rate, limits.burst)  # per device, as the coordinator's
        self.numel = 0
        self.sum: torch.Tensor | None = None  # the partial sum of the seqs in `held`
        self.held: dict[int, str] = {}  # seq -> staged file, in the partial sum
        self.sent: dict[str, Any] | None = None  # the partial sum handed over, until its step is committed
        self.staging: set[str] = set()  # staged files whose claim is in flight (or just answered, not yet added)
        self.uncertain: dict[str, tuple[str, float]] = {}  # staged, claim outcome unknown -> (coordinator boot, when)
        self.uploading: set[str] = set()  # ticket ids with an upload streaming
        self.coord_boot: str | None = None
        self.models: dict[int, asyncio.Future] = {}  # version -> its weights' bytes (the newest few)
        self.done = False
        self.port: int | None = None
        self.data_port = data_port  # the setting: "auto" (any free port, the last one after a restart), N, "off"
        self.dataplane = None  # flotilla.network.dataplane.DataPlane while serving one
        self.data_bound = 0  # its port (0: none; devices use gRPC)

    # -- the control channel ------------------------------------------------------------------
    async def _call(self, method: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        md = ((partials.KEY_HEADER, self.key.decode()),)
        return json.loads(await self._ctl.unary_unary(method)(json.dumps(body).encode(), metadata=md, timeout=timeout))

    async def register(self) -> None:
        """(Re)join the coordinator and rebuild the partial sum from exactly its outstanding list."""
        r = await self._call(
            partials.REGISTER,
            {"name": self.name, "address": self.address, "boot": self.boot, "data_port": self.data_bound},
            timeout=10,
        )
        async with self._mutex:
            self.numel = int(r["numel"])
            self.ticket_key = bytes.fromhex(r["ticket_key"])
            self._checks = SimpleNamespace(
                numel=self.numel,
                settings=SimpleNamespace(max_update_norm=r["max_update_norm"], max_update_abs=r["max_update_abs"]),
            )
            total = torch.zeros(self.numel)
            held = {}
            loop = asyncio.get_running_loop()
            for e in sorted(r["outstanding"], key=lambda e: e["seq"]):
                f = self.store.pending_dir / e["file"]
                if not f.exists():  # fsync'd before the claim: only a lost disk gets here
                    raise RuntimeError(f"aggregator {self.name}: accepted update #{e['seq']} but {f} is missing")
                data = await loop.run_in_executor(None, f.read_bytes)
                total.add_(torch.frombuffer(bytearray(data), dtype=torch.float32), alpha=float(e["alpha"]))
                held[int(e["seq"])] = e["file"]
            # a claim whose answer was lost may still be booked after this registration by the same
            # coordinator process (it shields claims): its file stays until well past the claim's timeout.
            # A coordinator that has restarted since books nothing more: its outstanding list decides.
            now = time.monotonic()
            self.uncertain = {
                f: (b, t) for f, (b, t) in self.uncertain.items() if b == r["boot"] and now - t < 2 * CLAIM_TIMEOUT_S
            }
            keep = set(held.values()) | self.staging | set(self.uncertain)
            for f in self.store.pending_dir.iterdir():
                if f.name not in keep:
                    f.unlink(missing_ok=True)
            self.sum, self.held, self.sent = total, held, None
            self.coord_boot = r["boot"]
            self.version = int(r["version"])
        log.info(
            "aggregator %s registered with %s (coordinator boot %s): %d updates held",
            self.name,
            self.coordinator,
            self.coord_boot,
            len(held),
        )

    async def _watch(self) -> None:
        need = False
        while True:
            try:
                if need:
                    await self.register()
                    need = False
                r = await self._call(partials.WATCH, {"name": self.name, "wait_s": 1.0}, timeout=10)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise PermissionError(e.details()) from None
                need = True
                await asyncio.sleep(0.2)
                continue
            if r["boot"] != self.coord_boot or not r["registered"]:
                need = True
                continue
            self.version = r["version"]
            await self._settle(set(r["outstanding"]))
            if r["want"]:
                try:
                    await self._send_partial(r["want"])
                except (grpc.aio.AioRpcError, LookupError) as e:
                    log.warning("aggregator %s: partial sum not delivered (%s); resyncing", self.name, e)
                    need = True
            if r["done"]:  # Watch answers at once from now on: no busy loop while lingering
                if not self.done:
                    self.done = True
                    self._done.set()
                await asyncio.sleep(0.5)

    async def _settle(self, outstanding: set[int]) -> None:
        """Delete the files of a handed-over partial sum once its step is committed (or dropped)."""
        if self.sent is not None and not (set(self.sent["seqs"]) & outstanding):
            for f in self.sent["files"]:
                self.store.discard(f)
            self.sent = None

    async def _send_partial(self, want: dict[str, Any]) -> None:
        seqs = [int(s) for s in want["seqs"]]
        if self.sent is None or self.sent["version"] != want["version"] or self.sent["seqs"] != seqs:
            deadline = time.monotonic() + 3.0
            async with self._added:  # wait for the claims answered just before the step began
                while not set(seqs) <= set(self.held):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise LookupError(f"updates {sorted(set(seqs) - set(self.held))} not in the partial sum")
                    try:
                        await asyncio.wait_for(self._added.wait(), left)
                    except TimeoutError:
                        pass
            async with self._mutex:
                if set(self.held) != set(seqs):
                    raise LookupError(f"holds {sorted(self.held)}, asked for {seqs}")
                files = list(self.held.values())
                self.sent = {"version": want["version"], "seqs": seqs, "sum": self.sum, "files": files}
                self.sum, self.held = torch.zeros(self.numel), {}
        data = self.sent["sum"].numpy().tobytes()
        header = json.dumps({"name": self.name, "version": want["version"], "seqs": seqs}).encode()

        def parts():
            yield header
            yield from (bytes(p) for p in wire.chunks(data, self.limits.chunk_bytes))

        md = ((partials.KEY_HEADER, self.key.decode()),)
        await self._ctl.stream_unary(partials.PARTIAL)(parts(), metadata=md, timeout=30)

    async def _add(self, seq: int, file: str, alpha: float, delta: torch.Tensor) -> None:
        async with self._mutex:
            if seq in self.held or (self.sent is not None and seq in self.sent["seqs"]):
                return  # already there (a registration rebuilt it from disk meanwhile)
            self.sum.add_(delta, alpha=alpha)
            self.held[seq] = file
        async with self._added:
            self._added.notify_all()

    # -- the device-facing Download and Upload: gRPC and the data plane -----------------------------
    def _who(self, token: str | None) -> str:
        """The device that sends ``token``, refused if unknown or over its rate limit."""
        who = self.tokens.identify(token)
        if who is None or who.role != "device":
            raise Refused("UNAUTHENTICATED", "auth", "unknown client: send a device token issued for this server")
        if not self.limiter.allow(who.device):
            raise Refused(
                "RESOURCE_EXHAUSTED",
                "rate",
                f"rate limit: more than {self.limits.rate:g} requests/s from {who.device}; slow down",
                retry_after_s=max(1.0 / self.limits.rate, 0.05),
            )
        return who.device

    @staticmethod
    def _bearer(context) -> str | None:
        for k, v in context.invocation_metadata() or ():
            if k == wire.AUTH_HEADER and isinstance(v, str) and v.startswith("Bearer "):
                return v[7:]
        return None

    def _refused(self, e: Refused) -> Refused:
        self.counters[f"rejected.{e.reason}"] += 1
        return e

    async def _model(self, version: int) -> bytes:
        """The weights of ``version``, fetched from the coordinator once (concurrent asks share it)."""
        fut = self.models.get(version)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self.models[version] = asyncio.ensure_future(self._fetch(version))
            for v in sorted(self.models)[:-4]:  # keep the newest four versions
                self.models.pop(v)
        return await asyncio.shield(fut)

    async def _fetch(self, version: int) -> bytes:
        md = ((partials.KEY_HEADER, self.key.decode()),)
        call = self._ctl.unary_stream(partials.MODEL)(
            json.dumps({"name": self.name, "version": version}).encode(), metadata=md, timeout=60
        )
        return b"".join([part async for part in call])

    async def model_for(self, token: str | None, version: int) -> bytes:
        """One download, whatever carries it: the token checked, then the version's weights (refusals counted)."""
        try:
            self._who(token)
            try:
                return await self._model(int(version))
            except grpc.aio.AioRpcError as e:
                raise partials.refusal_of(e) from None
        except Refused as e:
            raise self._refused(e) from None

    async def download(self, request, context):
        try:
            data = await self.model_for(self._bearer(context), request.version)
        except Refused as e:
            await context.abort(_CODES[e.code], str(e), e.trailing_metadata())
        total, chunk = len(data), self.limits.chunk_bytes
        for off in range(0, total, chunk):
            yield pb.ModelChunk(version=request.version, offset=off, total_bytes=total, data=data[off : off + chunk])

    async def upload(self, request_iterator, context) -> pb.UploadReply:
        async def header() -> pb.UploadHeader:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("part") != "header":
                raise Refused("INVALID_ARGUMENT", "invalid", "upload refused: the first message must be the header")
            return first.header

        async def receive(size: int, what: str, into: memoryview | None = None, squares: bool = False):
            buf, pos, crc = (memoryview(bytearray(size)) if into is None else into), 0, 0
            async for part in request_iterator:
                n = len(part.data)
                if part.WhichOneof("part") != "data" or pos + n > size:
                    raise Refused("INVALID_ARGUMENT", "shape", f"upload refused: more than {size} bytes")
                buf[pos : pos + n] = part.data
                crc = crc32(part.data, crc)  # the fingerprint, while the chunk is in the cache
                pos += n
            if pos != size:
                raise Refused("INVALID_ARGUMENT", "truncated", f"upload refused: {pos} of {size} bytes")
            return buf, fingerprint_text(crc, size), None  # check_delta sums the squares

        try:
            return await self.accept_upload(self._bearer(context), header, receive)
        except Refused as e:  # counted by accept_upload
            await context.abort(_CODES[e.code], str(e), e.trailing_metadata())

    async def accept_upload(self, token: str | None, header, receive) -> pb.UploadReply:
        """One upload, whatever carries it (gRPC's Upload stream or the data plane): ``header()``
        gives its UploadHeader, ``receive(size, what)`` its ``size`` body bytes and their fingerprint.
        Returns the UploadReply (seq, version, and the device's rest as the coordinator's claim
        answer names it); a refusal is counted and raised."""
        try:
            device = self._who(token)
            if self.sum is None:
                raise Refused("UNAVAILABLE", "starting", "aggregator not registered yet; retry", retry_after_s=1.0)
            h = await header()
            ticket = Ticket.decode(h.ticket, self.ticket_key)
            if ticket.device != device:
                raise Refused(
                    "PERMISSION_DENIED",
                    "ticket",
                    f"upload refused: assignment {ticket.id[:8]} belongs to another device",
                )
            if h.dtype != "float32" or list(h.shape) != [self.numel]:
                raise Refused(
                    "INVALID_ARGUMENT",
                    "shape",
                    f"upload refused: dtype {h.dtype!r} shape {tuple(h.shape)}, expected 'float32' ({self.numel},)",
                )
            if ticket.id in self.uploading:
                raise Refused("RESOURCE_EXHAUSTED", "busy", "upload refused: already uploading", retry_after_s=1.0)
            self.uploading.add(ticket.id)
            try:
                return await self._upload(receive, h, device)
            finally:
                self.uploading.discard(ticket.id)
        except Refused as e:
            raise self._refused(e) from None

    async def _upload(self, receive, h, device: str) -> tuple[int, int]:
        size = 4 * self.numel
        try:
            async with asyncio.timeout(self.limits.upload_timeout_s), self._slots:
                buf, digest, squares = await receive(
                    size, f"shape ({self.numel},) float32", self.bodies.take(size), True
                )
        except TimeoutError:
            raise Refused(
                "DEADLINE_EXCEEDED", "stalled", "upload refused: stream too slow", retry_after_s=1.0
            ) from None
        # received: the buffer goes back once the upload is summed or refused (network/bodies.py); a
        # cancellation drops it instead (an executor thread may still be staging from it)
        try:
            result = await self._received(buf, digest, h, device, squares)
        except Refused:
            self.bodies.give(buf)
            raise
        self.bodies.give(buf)
        return result

    async def _received(self, buf: memoryview, digest: str, h, device: str, squares=None) -> tuple[int, int]:
        delta = torch.frombuffer(buf, dtype=torch.float32)
        norm = Coordinator.check_delta(self._checks, delta, device, squares)  # the coordinator's own value checks
        loop = asyncio.get_running_loop()
        # the name is taken (in `staging`) before the file exists, so a registration that cleans up
        # unknown files meanwhile cannot delete it
        name = secrets.token_hex(12) + ".bin"
        self.staging.add(name)
        try:
            await loop.run_in_executor(None, self.store.stage, buf, name)
        except BaseException:
            self.staging.discard(name)
            self.store.discard(name)
            raise
        claim = {
            "name": self.name,
            "boot": self.boot,
            "device": device,
            "ticket": h.ticket,
            "base_version": h.base_version,
            "shape": list(h.shape),
            "num_examples": h.num_examples,
            "train_loss": h.train_loss,
            "examples_seen": h.examples_seen,
            "norm": norm,
            "digest": digest,
            "file": name,
        }
        try:
            r = await self._call(partials.CLAIM, claim, timeout=CLAIM_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE or e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # outcome unknown: the file stays; a registration adds it if the ledger has it
                self.uncertain[name] = (self.coord_boot, time.monotonic())
                self.staging.discard(name)
                raise Refused(
                    "UNAVAILABLE", "coordinator", "coordinator unreachable; retry", retry_after_s=1.0
                ) from None
            self.staging.discard(name)
            self.store.discard(name)  # refused before any ledger line: never accepted
            raise partials.refusal_of(e) from None
        if r.get("repeat"):  # a retry of an update already accepted: its first answer
            self.store.discard(name)
        else:  # in `staging` until it is in `held`, so a registration meanwhile cannot delete its file
            await self._add(int(r["seq"]), name, float(r["alpha"]), delta)
        self.staging.discard(name)
        self.counters["accepted"] += 1
        rest = float(r.get("rest_s", 0.0))  # a coordinator before rest_s names none
        return pb.UploadReply(seq=int(r["seq"]), version=int(r["version"]), rest_s=rest if math.isfinite(rest) else 0.0)

    # -- the data plane's handlers (flotilla.network.dataplane; run on this loop; no data_check_in) --
    async def data_download(self, token: str, peer: str, request: pb.DownloadRequest) -> tuple[bytes, int]:
        return await self.model_for(token, request.version), request.version

    async def data_upload(self, token: str, peer: str, header: pb.UploadHeader, receive) -> pb.UploadReply:
        async def given() -> pb.UploadHeader:
            return header

        return await self.accept_upload(token, given, receive)

    def data_refused(self, err: Refused, peer: str) -> None:
        """A data-plane request refused before it named anyone (too long, not a DataRequest): counted."""
        self._refused(err)
        log.warning("aggregator %s: data plane refused a request from %s: %s", self.name, peer, err)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._mutex = asyncio.Lock()
        self._added = asyncio.Condition()
        self._slots = asyncio.Semaphore(self.limits.upload_slots)
        self.bodies = UploadBodies()  # receive buffers, reused (network/bodies.py)
        self._done = asyncio.Event()
        self._server = grpc.aio.server(
            options=[*wire.channel_options(self.limits.max_message_bytes), ("grpc.so_reuseport", 0)]
        )
        port_file = self.store.path / "port"  # a restart listens where devices were told to upload
        if port == 0 and port_file.exists() and not _in_use(host, int(port_file.read_text() or 0)):
            port = int(port_file.read_text())
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    wire.SERVICE,
                    {
                        "Download": grpc.unary_stream_rpc_method_handler(
                            self.download, pb.DownloadRequest.FromString, pb.ModelChunk.SerializeToString
                        ),
                        "Upload": grpc.stream_unary_rpc_method_handler(
                            self.upload, pb.UploadPart.FromString, pb.UploadReply.SerializeToString
                        ),
                    },
                ),
            )
        )
        try:
            self.port = self._server.add_secure_port(f"{host}:{port}", self._credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.store.close()
            raise ValueError(
                f"aggregator {self.name}: cannot listen on {host}:{port}" + (" (in use)" if _in_use(host, port) else "")
            )
        port_file.write_text(str(self.port))
        self._start_dataplane(host)
        self.address = self.advertise or f"{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{self.port}"
        options = wire.channel_options(self.limits.max_message_bytes)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        self._ctl = grpc.aio.secure_channel(self.coordinator, self._control_creds, options=options)
        await self._server.start()
        while True:  # first registration: wait for the coordinator; a wrong key is final
            try:
                await self.register()
                break
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    await self.stop()
                    raise PermissionError(e.details()) from None
                await asyncio.sleep(0.3)
        self._watcher = asyncio.ensure_future(self._watch())
        log.info(
            "aggregator %s serving uploads on %s:%d (TLS%s), coordinator %s",
            self.name,
            host,
            self.port,
            f"; data plane on port {self.data_bound}" if self.data_bound else "",
            self.coordinator,
        )
        return self.port

    def _start_dataplane(self, host: str) -> None:
        """Listen for downloads and uploads on the data port too (``network.data_port``), with the
        gRPC port's TLS files and the limits the coordinator's server gives its own data plane.
        "auto" takes the port of the last run when it is free (devices may still be told it)."""
        setting = self.data_port
        if setting in (None, "off"):
            return
        port_file = self.store.path / "data_port"
        port = 0 if setting == "auto" else int(setting)
        if setting == "auto" and port_file.exists():
            last = int(port_file.read_text() or 0)
            port = last if 0 < last <= 65535 and not _in_use(host, last) else 0
        plane = data_plane(self, self.tls, self.limits)
        try:
            try:
                self.data_bound = plane.start(host, port)
            except OSError:
                if setting != "auto" or port == 0:
                    raise
                self.data_bound = plane.start(host, 0)  # the last run's port was taken meanwhile
        except OSError as e:
            self._server = None
            self.store.close()
            why = " (in use; set network.data_port to another port, or auto)" if _in_use(host, port) else ""
            raise ValueError(
                f"aggregator {self.name}: cannot listen on {host}:{port} (the data plane){why}: {e.strerror or e}"
            ) from None
        port_file.write_text(str(self.data_bound))
        self.dataplane = plane

    async def run_until_done(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._done.wait()), self._watcher]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self._done.is_set() and not stop.is_set():
            await asyncio.sleep(self.linger_s)
        for w in waits:
            w.cancel()
        if self._watcher.done() and not self._watcher.cancelled() and self._watcher.exception() is not None:
            await self.stop()
            raise self._watcher.exception()
        await self.stop()

    async def stop(self) -> None:
        if self.dataplane is not None:  # off the loop: its threads may be waiting on handlers here
            plane, self.dataplane, self.data_bound = self.dataplane, None, 0
            await asyncio.to_thread(plane.stop)
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        await self._ctl.close() if getattr(self, "_ctl", None) is not None else None
        self.store.close()


def aggregator_from_config(cfg, *, name: str, coordinator: str, key: bytes, state_dir, **kw) -> AggregatorServer:
    """An aggregator for the coordinator run from the same experiment config (its network section)."""
    net = cfg.network
    ca = kw.pop("ca", None) or net.tls.ca or _ca_beside(net.tls.cert)
    return AggregatorServer(
        name=name,
        coordinator=coordinator,
        key=key,
        tls=TLSFiles(net.tls.cert, net.tls.key, net.tls.ca, net.tls.require_client_cert),
        tokens=TokenTable.load(net.tokens),
        state_dir=state_dir,
        ca=ca,
        limits=Limits.of(net),
        fsync=net.fsync,
        # as long as the coordinator: a device in back-off when training ends must still find its
        # aggregator up to be told DONE (it was 2 s, shorter than the SDK's 5 s back-off cap)
        linger_s=net.linger_s,
        **{"data_port": net.data_port, **kw},
    )


def _ca_beside(cert: str) -> str | None:
    """``flotilla certs`` writes ca.pem beside server.pem: the CA the coordinator's certificate chains to."""
    p = Path(cert).with_name("ca.pem")
    return str(p) if p.exists() else None


class AggregatorThread:
    """An :class:`AggregatorServer` on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, agg: AggregatorServer, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.agg = agg
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = self._stop = None
        self._thread = threading.Thread(
            target=self._main, args=(host, port), daemon=True, name=f"aggregator-{agg.name}"
        )
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        self.port = agg.port

    def _main(self, host: str, port: int) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.agg.start(host, port)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.agg.run_until_done(self._stop)

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # its loop closed meanwhile: it had finished by itself (training done)
                pass
        self._thread.join(30)
