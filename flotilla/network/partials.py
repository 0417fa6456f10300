"""Scale-out, coordinator side: the aggregators' control service and the ledger of partial sums.

``flotilla serve --aggregators N`` (async FedBuff only) keeps one coordinator -- check-ins,
tickets, selection, the ledger, the server step -- and moves the upload path (TLS, streaming,
validation, fsync, summing) to N aggregator processes (:mod:`flotilla.network.aggregator`).  Each
aggregator holds a *partial sum* ``sum_i s(tau_i) w_i d_i`` of the updates it accepted; at a step
the coordinator gathers the partial sums, adds them into its FedBuff buffer and takes core's step.

The control service (``flotilla.v1.Aggregation``, JSON / raw bytes over the coordinator's own TLS
port, gRPC generic handlers: no .proto) has four methods, every call authenticated by the
aggregator key (``STATE/aggregator.key``, 0600, compared in constant time; metadata
``x-flotilla-aggregator``):

``Register``  an aggregator (re)joins with its device-facing address and data port (0 or absent:
              none, gRPC only; a restart reports its possibly new one): it gets the ticket key, the validation settings and the
              list of its accepted updates not yet in a step (seq, file, alpha); it rebuilds its
              partial sum from exactly those files and deletes every other staged file.
``Claim``     after an aggregator has received, validated and fsync'd an upload: the
              coordinator runs every check it runs on a direct upload (ticket, live assignment,
              freshness, staleness, the numbers), writes the ledger's ``accepted`` line (fsync'd)
              naming the aggregator and its file, and answers seq, version and
              ``alpha = s(tau) * weight``; only then does the aggregator add ``alpha * delta`` to
              its partial sum and ack the device.  A retry with the same bytes gets the first answer.
``Watch``     long poll: the coordinator's boot id, version, the aggregator's outstanding seqs, and
              -- while a step is being gathered -- the seqs whose partial sum it wants.
``Partial``   the partial sum of exactly those seqs (a JSON header, then float32 bytes).
``Model``     the weights of a version (chunks), fetched once per version by each aggregator, which
              serves the devices' downloads (so the coordinator sends 4 bytes x numel per step and
              aggregator, not per trip).

Exactly-once across a kill -9 of any one process: the ledger (coordinator) says which seqs each
aggregator holds; an acked update is durable twice over before its ack (the aggregator's fsync'd
file and the coordinator's fsync'd ledger line); a step's ledger line names the seqs it applied.
A restarted aggregator rebuilds its partial sum from the coordinator's outstanding list; a
restarted coordinator rebuilds its buffer from the ledger (:class:`ScaleOutStore`) and the
aggregators re-register when its boot id changes.  A step waits until every aggregator holding one
of its updates has answered (a dead aggregator delays the step; nothing is lost or counted twice).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from flotilla.network.refusals import Refused
from flotilla.network.store import Recovered, StateStore
from flotilla.network.tickets import Answer

log = logging.getLogger("flotilla.network")

SERVICE = "flotilla.v1.Aggregation"
REGISTER = f"/{SERVICE}/Register"
CLAIM = f"/{SERVICE}/Claim"
WATCH = f"/{SERVICE}/Watch"
PARTIAL = f"/{SERVICE}/Partial"
MODEL = f"/{SERVICE}/Model"
KEY_HEADER = "x-flotilla-aggregator"
KEY_FILE = "aggregator.key"
_FILE = re.compile(r"^[0-9a-f]{24}\.bin$")  # StateStore.stage's names: nothing else is accepted
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CODES = {c.name: c for c in grpc.StatusCode}


def aggregator_key(state_dir: str | Path) -> bytes:
    """The key aggregators present, created on first use (mode 0600) in the coordinator's state dir."""
    f = Path(state_dir) / KEY_FILE
    if not f.exists():
        tmp = f.with_name(KEY_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        os.replace(tmp, f)
    return f.read_text().strip().encode()


def refusal_of(err: grpc.RpcError) -> Refused:
    """A coordinator's refusal, to pass on to the device unchanged (code, reason, retry hint)."""
    md = dict(err.trailing_metadata() or ())
    after = md.get("flotilla-retry-after-s")
    return Refused(
        err.code().name, md.get("flotilla-refusal", "invalid"), err.details(), float(after) if after else None
    )


class ScaleOutStore(StateStore):
    """The coordinator's store with remote updates: an ``accepted`` line with an ``aggregator`` key
    names a file on that aggregator's disk, so recovery keeps it in the buffer without reading it."""

    def recover(self, numel: int, sealed: bool = False) -> Recovered:
        records = self.read_ledger()
        settled = {s for r in records if r.get("event") in ("step", "dropped") for s in r["seqs"]}
        remote = {
            int(r["seq"])
            for r in records
            if r.get("event") == "accepted" and r.get("aggregator") and int(r["seq"]) not in settled
        }
        if not remote:
            return super().recover(numel, sealed)
        # the base recovery, with placeholders for remote files (it checks they exist, then reads them)
        made = []
        for r in records:
            if r.get("event") == "accepted" and int(r["seq"]) in remote and _FILE.match(r.get("file", "")):
                p = self.pending_dir / r["file"]
                if not p.exists():
                    p.write_bytes(b"\0" * 4 * numel) if not sealed else p.touch()
                    made.append(p)
        try:
            rec = super().recover(numel, sealed)
        finally:
            for p in made:
                p.unlink(missing_ok=True)
        rec.pending = [(e, None if int(e["seq"]) in remote else d) for e, d in rec.pending]
        return rec


@dataclass
class Aggregator:
    name: str
    address: str
    boot: str
    data_port: int = 0  # its data plane (flotilla.network.dataplane) on the address's host; 0: gRPC only
    seen: float = field(default_factory=time.monotonic)


class Hub:
    """The coordinator's side of scale-out, attached to a :class:`FlotillaServer` by
    :func:`flotilla.network.aggregator.attach`."""

    def __init__(self, server, expected: int, key: bytes):
        self.server = server
        self.coord = server.coord
        self.expected = expected
        self.key = key
        self.aggregators: dict[str, Aggregator] = {}
        self.wants: dict[str, dict[str, Any]] = {}  # aggregator -> {"version", "seqs"} while gathering
        self.partials: dict[str, torch.Tensor] = {}
        self.booking: list[dict[str, Any]] = []  # claims whose ledger line is being written (count as held)
        self._changed: asyncio.Condition | None = None  # made on the serving loop
        self._stepping: asyncio.Future | None = None

    # -- what devices are told -----------------------------------------------------------------
    def ready(self) -> bool:
        return len(self.aggregators) >= self.expected

    def client_json(self, base: str, device: str, data_plane: bool = True) -> str:
        """The assignment's settings plus ``aggregator``: where the device downloads and uploads, and
        ``aggregator_data_port`` when that aggregator has a data plane (absent: gRPC) and the device's
        SDK knows the key (``data_plane``)."""
        a = self.route(device)
        extra = {"aggregator_data_port": a.data_port} if a.data_port and data_plane else {}
        return json.dumps({**json.loads(base), "aggregator": a.address, **extra})

    def route(self, device: str) -> Aggregator:
        """The aggregator a device uploads to (a stable spread over the registered ones)."""
        names = sorted(self.aggregators)
        return self.aggregators[names[self.coord.device_index(device) % len(names)]]

    # -- the coordinator's buffer ----------------------------------------------------------------
    def outstanding(self, name: str) -> list[dict[str, Any]]:
        return [
            {"seq": e["seq"], "file": e["file"], "alpha": e["alpha"]}
            for e in [*self.coord.buffer, *self.booking]
            if e.get("aggregator") == name
        ]

    async def gather(self, entries: list[dict[str, Any]]) -> None:
        """Before a step (under the coordinator's lock): add every aggregator's partial sum of
        exactly its seqs in ``entries`` into the buffer, waiting for aggregators that are down."""
        by: dict[str, list[int]] = {}
        for e in entries:
            if e.get("aggregator"):
                by.setdefault(e["aggregator"], []).append(int(e["seq"]))
        if not by:
            return
        version = self.coord.version + 1
        self.wants = {name: {"version": version, "seqs": sorted(seqs)} for name, seqs in by.items()}
        self.partials = {}
        waited = time.monotonic()
        async with self._changed:
            self._changed.notify_all()
            while set(self.partials) != set(self.wants):
                try:
                    await asyncio.wait_for(self._changed.wait(), 5.0)
                except TimeoutError:
                    missing = sorted(set(self.wants) - set(self.partials))
                    log.warning(
                        "step %d: waiting %.0f s for the partial sums of aggregator(s) %s (down? they "
                        "resume from disk when restarted)",
                        version,
                        time.monotonic() - waited,
                        ", ".join(missing),
                    )
        for name in sorted(self.partials):  # a fixed order: the same sums give the same step
            self.coord.aggregator.sum.add_(self.partials[name])
        self.wants, self.partials = {}, {}

    def step_due(self) -> bool:
        c = self.coord
        return not c.done and c.aggregator.count >= c.settings.step_size

    async def step_if_due(self) -> None:
        if not self.step_due():
            return
        async with self.coord.lock:
            if self.step_due():
                await self.coord._step()

    # -- the control service ----------------------------------------------------------------
    async def _auth(self, context) -> None:
        got = dict(context.invocation_metadata() or ()).get(KEY_HEADER, "")
        if not (isinstance(got, str) and got and hmac.compare_digest(got.encode(), self.key)):
            self.coord.counters["rejected.aggregator_auth"] += 1
            log.warning("refused an aggregator call from %s: wrong or missing aggregator key", context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"aggregator refused: wrong or missing aggregator key (copy {KEY_FILE} from the coordinator's "
                "state directory and pass it with --key-file)",
            )

    async def _json(self, request: bytes, context) -> dict[str, Any]:
        await self._auth(context)
        try:
            req = json.loads(request)
            if not isinstance(req, dict) or not _NAME.match(str(req.get("name", ""))):
                raise ValueError("no valid 'name'")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"aggregator request refused: {e}")
        return req

    async def register(self, request: bytes, context) -> bytes:
        req = await self._json(request, context)
        name, c = req["name"], self.coord
        if name not in self.aggregators and len(self.aggregators) >= self.expected:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"aggregator refused: {name!r} would be aggregator {len(self.aggregators) + 1} of a coordinator "
                f"started with --aggregators {self.expected} ({', '.join(sorted(self.aggregators))} registered)",
            )
        data_port = req.get("data_port") or 0  # absent (an older aggregator): gRPC only
        if not (isinstance(data_port, int) and 0 <= data_port <= 65535):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"aggregator refused: data_port {data_port!r} is not a port number"
            )
        self.aggregators[name] = Aggregator(name, str(req.get("address", "")), str(req.get("boot", "")), data_port)
        log.info(
            "aggregator %s registered at %s%s",
            name,
            req.get("address"),
            f" (data plane on port {data_port})" if data_port else "",
        )
        s = c.settings
        return json.dumps(
            {
                "boot": c.table.boot,
                "version": c.version,
                "numel": c.numel,
                "ticket_key": c.secret.hex(),
                "max_update_norm": s.max_update_norm,
                "max_update_abs": s.max_update_abs,
                "outstanding": self.outstanding(name),
            }
        ).encode()

    async def watch(self, request: bytes, context) -> bytes:
        req = await self._json(request, context)
        name = req["name"]
        if name in self.aggregators:
            self.aggregators[name].seen = time.monotonic()
        async with self._changed:
            if name not in self.wants and not self.coord.done:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: name in self.wants), float(req.get("wait_s", 1))
                    )
                except TimeoutError:
                    pass
        return json.dumps(
            {
                "boot": self.coord.table.boot,
                "version": self.coord.version,
                # done once the last step is committed (its updates no longer outstanding): the
                # aggregator then deletes their files and may exit
                "done": self.coord.done and not self.outstanding(name),
                "registered": name in self.aggregators,
                "want": self.wants.get(name) if name not in self.partials else None,
                "outstanding": [e["seq"] for e in self.outstanding(name)],
            }
        ).encode()

    async def model(self, request: bytes, context):
        """The weights of a version, for an aggregator that serves the devices' downloads."""
        req = await self._json(request, context)
        try:
            data = self.coord.model_bytes(int(req.get("version", -1)))
        except Refused as e:
            await context.abort(_CODES[e.code], str(e), e.trailing_metadata())
        chunk = self.server.limits.chunk_bytes
        for off in range(0, len(data), chunk):
            yield data[off : off + chunk]

    async def partial(self, request_iterator, context) -> bytes:
        await self._auth(context)
        header = None
        buf = bytearray()
        async for part in request_iterator:
            if header is None:
                header = json.loads(part)
                continue
            buf += part
            if len(buf) > 4 * self.coord.numel:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "partial sum refused: too many bytes")
        name = (header or {}).get("name")
        want = self.wants.get(name)
        if want is None or header.get("version") != want["version"] or header.get("seqs") != want["seqs"]:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"partial sum refused: not the one wanted ({header and header.get('version')} vs {want})",
            )
        if len(buf) != 4 * self.coord.numel:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"partial sum refused: {len(buf)} bytes")
        p = torch.frombuffer(buf, dtype=torch.float32)
        if not math.isfinite(float(p.sum(dtype=torch.float64))):  # float64: finite iff every value is
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "partial sum refused: non-finite values")
        async with self._changed:
            self.partials[name] = p
            self._changed.notify_all()
        return b"{}"

    async def claim(self, request: bytes, context) -> bytes:
        req = await self._json(request, context)
        try:
            reply = await asyncio.shield(self._claim(req))
        except Refused as e:
            self.coord.refuse(e, str(req.get("device")))
            await context.abort(_CODES[e.code], str(e), e.trailing_metadata())
        # how long this device gets no new work, for the aggregator's UploadReply.rest_s
        reply["rest_s"] = self.coord.rest_s(str(req["device"]))
        return json.dumps(reply).encode()

    async def _claim(self, req: dict[str, Any]) -> dict[str, Any]:
        """Coordinator.commit for an update whose bytes are on an aggregator's disk."""
        c, s = self.coord, self.coord.settings
        name = req["name"]
        if name not in self.aggregators:
            raise Refused("UNAVAILABLE", "aggregator", "upload refused: aggregator not registered yet; retry", 1.0)
        if not _FILE.match(str(req.get("file", ""))):
            raise Refused("INVALID_ARGUMENT", "invalid", "claim refused: bad file name")
        ticket, answer = c.check_header(
            str(req["device"]),
            str(req["ticket"]),
            int(req["base_version"]),
            "float32",
            list(req["shape"]),
            req["num_examples"],
            req["train_loss"],
            req["examples_seen"],
        )

        def repeat(a: Answer) -> dict[str, Any]:
            if a.digest is not None and a.digest == req["digest"]:
                return {"seq": a.seq, "version": a.version, "repeat": True}
            raise Refused(
                "ALREADY_EXISTS",
                "replay",
                f"upload refused: replayed nonce, assignment {ticket.id[:8]} "
                f"was already accepted as update #{a.seq} (with other bytes)",
            )

        if answer is not None:
            return repeat(answer)
        async with c.lock:
            while self.step_due():  # at most K updates per step, as in one process
                await c._step()
            if (a := c.table.answered(ticket.id)) is not None:
                return repeat(a)
            c._check_fresh(ticket)
            c.table.check_live(ticket)
            if self.aggregators[name].boot != req.get("boot"):  # a claim of an aggregator that has restarted since
                raise Refused("UNAVAILABLE", "aggregator", "upload refused: the aggregator restarted; retry", 1.0)
            weight = float(req["num_examples"]) if s.weighting == "examples" else 1.0
            staleness = c.version - ticket.version
            closes = c.aggregator.count + 1 >= s.step_size
            entry = {
                "seq": c.next_seq,
                "assignment": ticket.id,
                "device": ticket.device,
                "base_version": ticket.version,
                "expires": ticket.expires,
                "version": c.version,
                "staleness": staleness,
                "num_examples": req["num_examples"],
                "weight": weight,
                "norm": round(float(req["norm"]), 6),
                "train_loss": req["train_loss"],
                "examples_seen": req["examples_seen"],
                "file": req["file"],
                "digest": req["digest"],
                "reply_version": c.version + int(closes),
                "aggregator": name,
                "alpha": c.aggregator.staleness(staleness) * weight,  # as FedBuff.add weighs it
            }
            # From the boot check to here nothing awaits, so a registration sees this claim either as
            # refused (another boot) or in `booking` (its file must be kept and added)
            self.booking.append(entry)
            try:
                await asyncio.get_running_loop().run_in_executor(None, c.store.accept, entry)
            finally:
                self.booking.remove(entry)
            c.next_seq += 1
            c._add(None, entry)
            c.buffer.append(entry)
            c.contributors.add(ticket.device)
            c.table.settle(ticket)
            c.selection.rest(ticket.device, c.clock() + s.retry_after_s)
            c.counters["accepted"] += 1
            c.table.answer(
                ticket.id, Answer(entry["seq"], entry["reply_version"], entry["digest"], ticket.expires + c.grace_s)
            )
        if closes:  # the step gathers this update too: after this reply has gone back
            self._stepping = asyncio.ensure_future(self.step_if_due())
            self.server._pending_records.append(self._stepping)  # the server awaits it before it stops
        return {"seq": entry["seq"], "version": entry["reply_version"], "alpha": entry["alpha"]}

    def handler(self) -> grpc.GenericRpcHandler:
        self._changed = asyncio.Condition()
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(self.register, None, None),
                "Claim": grpc.unary_unary_rpc_method_handler(self.claim, None, None),
                "Watch": grpc.unary_unary_rpc_method_handler(self.watch, None, None),
                "Partial": grpc.stream_unary_rpc_method_handler(self.partial, None, None),
                "Model": grpc.unary_stream_rpc_method_handler(self.model, None, None),
            },
        )


def attach(server, aggregators: int) -> Hub:
    """Make ``server`` a scale-out coordinator expecting ``aggregators`` aggregator processes;
    refused (one line) for what the aggregators do not run."""
    from flotilla.core.fedbuff import FedBuff

    c = server.coord
    why = None
    if c.settings.mode != "async":
        why = "network.aggregators: scale-out runs async FedBuff (mode: async); sync rounds run in one process"
    elif c.privacy is not None or c.sealed or c.masked is not None:
        why = "network.aggregators: user-level DP and secure aggregation run in one process; remove one"
    elif c.variates is not None or server.channels is not None:
        why = "network.aggregators: SCAFFOLD and compressed channels run in one process; remove one"
    elif type(c.aggregator) is not FedBuff:
        why = "network.aggregators: scale-out sums into the FedBuff buffer; a custom aggregator runs in one process"
    if why:
        raise ValueError(why)
    hub = Hub(server, aggregators, aggregator_key(server.store.path))
    server.hub = c.remote = hub
    return hub
