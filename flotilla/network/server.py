"""The gRPC server: TLS, authentication, rate limits and streaming around the :class:`Coordinator`.

    server = FlotillaServer(model, tls=TLSFiles(...), tokens=TokenTable.load(...), state_dir=...,
                            settings=CoordinatorSettings(mode="sync", cohort=10, total_steps=20))
    server.serve(port=50051)            # blocks until training is done (and linger_s has passed)

``flotilla serve CONFIG.yaml --port P`` builds one from an experiment config (see
:func:`flotilla.experiment.serve.server_from_config`).  Everything runs on one asyncio loop
(grpc.aio); disk writes and evaluation run on worker threads so that check-ins and streams keep
flowing meanwhile.

What a hostile or broken device cannot do (each held by a test, see tests/test_network_hostile.py):

* hold the upload slots: one upload in flight per assignment, ``uploads_per_device`` per device,
  and every upload stream must finish within ``upload_timeout_s`` (header included), else it is
  cut (DEADLINE_EXCEEDED, ``stalled``) and its slot freed;
* fill a buffer alone: one live assignment per device (:mod:`flotilla.network.tickets`);
* crash or confuse the server with undecodable messages: they are answered INVALID_ARGUMENT
  (``invalid``) and counted, like every other refusal;
* share a port or a state directory with another server: ``flotilla serve`` binds its port
  exclusively (no SO_REUSEPORT) and locks the state directory; either refusal is one line.

Every refusal carries trailing metadata saying what the device should do next (retry the
request, check in again, or give up): see :mod:`flotilla.network.refusals`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn

from flotilla.core.client import ClientSpec
from flotilla.core.fedbuff import FedBuff
from flotilla.core.flat import FlatModel
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec
from flotilla.network import wire
from flotilla.network.auth import Identity, RateLimiter, TokenTable
from flotilla.network.bodies import UploadBodies
from flotilla.network.coordinator import (
    FINGERPRINT_BLOCK,
    Coordinator,
    CoordinatorSettings,
    Upload,
    crc32,
    fingerprint_text,
    step_record,
)
from flotilla.network.observe import Observations, ledger_tail
from flotilla.network.refusals import InUse, Refused
from flotilla.network.store import StateStore
from flotilla.network.tickets import Ticket
from flotilla.network.wire import AGGREGATOR_DATA_PORT_SDK, pb

log = logging.getLogger("flotilla.network")

EvalFn = Callable[[torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class TLSFiles:
    cert: str  # server certificate chain (PEM)
    key: str  # its private key (PEM)
    ca: str | None = None  # CA that signs client certificates (mutual TLS)
    require_client_cert: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        def read(path: str, what: str) -> bytes:
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(
                    f"network.tls.{what}: {p} not found (make test certificates with `flotilla certs DIR`)"
                )
            return p.read_bytes()

        pair = [(read(self.key, "key"), read(self.cert, "cert"))]
        if self.require_client_cert:
            if not self.ca:
                raise ValueError("network.tls.ca: required when require_client_cert is true")
            return grpc.ssl_server_credentials(pair, root_certificates=read(self.ca, "ca"), require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    def ssl_context(self):
        """The same certificate, key and client-certificate rule for the data plane (stdlib ssl)."""
        from flotilla.network.dataplane import server_context

        return server_context(self.cert, self.key, self.ca, self.require_client_cert)


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    rate: float = 20.0  # requests per second per device, on average
    burst: int = 40
    upload_slots: int = 64  # uploads whose bytes are received at once; others wait (flow control)
    uploads_per_device: int = 2  # upload streams one device may have open at once (one per assignment)
    upload_timeout_s: float = 300.0  # an upload stream (header and body) must finish within this
    data_connections: int = 128  # data plane: connections served at once (more are closed at once)
    data_header_timeout_s: float = 10.0  # data plane: TLS handshake, then each request's header, within this
    data_idle_timeout_s: float = 10.0  # data plane: a connection with no request for this long is closed

    def __post_init__(self):
        if self.chunk_bytes + 1024 > self.max_message_bytes:
            raise ValueError(
                f"network: chunk size {self.chunk_bytes} B must be at least 1 KiB below the message limit {self.max_message_bytes} B"
            )
        if self.uploads_per_device < 1 or not (math.isfinite(self.upload_timeout_s) and self.upload_timeout_s > 0):
            raise ValueError(
                f"network: uploads_per_device must be >= 1 and upload_timeout_s positive, got "
                f"{self.uploads_per_device} and {self.upload_timeout_s}"
            )

    @classmethod
    def of(cls, net) -> Limits:
        """The limits a config's ``network:`` section sets (serve and its aggregators use the same)."""
        return cls(
            int(net.max_message_mb * 2**20),
            net.chunk_kb * 1024,
            net.rate_limit,
            net.rate_burst,
            uploads_per_device=net.uploads_per_device,
            upload_timeout_s=net.upload_timeout_s,
        )


def _sdk(request: pb.CheckInRequest) -> int:
    """The device SDK's version (wire.SDK_VERSION; 0 when it sent none or garbage)."""
    try:
        return int(request.sdk_version)
    except ValueError:
        return 0


def finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class _Undecodable:
    """A request gRPC could not parse as its message: answered INVALID_ARGUMENT and counted."""

    def __init__(self, what: str, error: Exception):
        self.what = what
        self.error = error

    def WhichOneof(self, _name):  # so an upload stream's parts can be inspected uniformly
        return None


def _parser(cls, parse_fn=None):
    parse_fn = parse_fn or cls.FromString

    def parse(data: bytes):
        try:
            return parse_fn(data)
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
            return _Undecodable(cls.__name__, e)

    return parse


_CODES = {c.name: c for c in grpc.StatusCode}


class FlotillaServer:
    def __init__(
        self,
        model: nn.Module,
        *,
        tls: TLSFiles,
        tokens: TokenTable,
        state_dir: str | Path,
        settings: CoordinatorSettings = CoordinatorSettings(),
        client: ClientSpec = ClientSpec(),
        server: ServerOptimizerSpec = ServerOptimizerSpec(),
        aggregator=None,
        evaluate: Callable[[FlatModel, torch.Tensor], dict[str, float]] | None = None,
        eval_every: int = 1,
        limits: Limits = Limits(),
        compression: str | None = None,
        task: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        fsync: bool = True,
        linger_s: float = 5.0,
        privacy=None,
        accountant: str = "rdp",
        secure_buffer: bool = False,
        secure_max_norm: float | None = None,
        secure_masking=None,
        dp_sgd=None,
        client_algorithm=None,
        channels=None,
        aggregators: int | None = None,
        data_port: int | str | None = "auto",
        sealed_download_port: int | str | None = "off",
        sealed_uploads: bool = False,
    ):
        if dp_sgd is not None:
            # sample-level DP runs on the devices (flotilla.client.Device); both sides make the model
            # Opacus-compatible (nn.LSTM -> DPLSTM reorders parameters) so their flat vectors agree
            from flotilla.privacy.sample import make_dp_compatible

            make_dp_compatible(model)
        self.flat = FlatModel(model)
        self.tls = tls
        # the data plane's port (flotilla.network.dataplane): "auto" (any free one), a number, or "off"
        self.data_port: int | str | None = data_port
        # sealed downloads (flotilla.network.sealed_downloads): "auto", a number, or "off"
        self.sealed_download_port: int | str | None = sealed_download_port
        # sealed uploads (flotilla.network.sealed_uploads) on that port, through the data plane's handler
        self.sealed_uploads = sealed_uploads
        self._credentials = tls.credentials()  # read the certificate before touching the state directory
        self.tokens = tokens
        self.limits = limits
        self.compression = wire.compression(compression)
        self.task_json = json.dumps(task or {})
        # what every assignment carries: the local training settings, and DP-SGD's (SampleLevelSpec) if on
        algorithm = self._client_algorithm(
            client_algorithm, settings, privacy, dp_sgd, secure_buffer or secure_masking is not None
        )
        self.client_json = json.dumps(
            {
                **asdict(client),
                **({"dp_sgd": asdict(dp_sgd)} if dp_sgd is not None else {}),
                **({"algorithm": algorithm} if algorithm is not None else {}),
            }
        )
        self.scaffold = algorithm is not None and algorithm["name"] == "scaffold"
        # compressed downloads and uploads (flotilla.channels): the assignment carries the chain
        from flotilla.channels.wire import ServerChannels

        self.channels = ServerChannels.build(
            channels,
            self.flat.shapes,
            user_level=privacy,
            secure=secure_buffer or secure_masking is not None,
            scaffold=self.scaffold,
            masked=secure_masking,  # sync masking: an upload quantize runs in the ring (flotilla/channels/ring.py)
        )
        if self.channels is not None:
            self.client_json = json.dumps({**json.loads(self.client_json), "channels": self.channels.assignment})
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.linger_s = linger_s
        self.observed = Observations()  # for the dashboard and the Prometheus exporter (network/observe.py)
        self.watched = False  # set by a watcher: only then does the loop build snapshots
        # scale-out (serve --aggregators N, network.aggregators): N aggregator processes take the uploads
        self.aggregators = int(((config or {}).get("network") or {}).get("aggregators") or 0)
        self.aggregators = self.aggregators if aggregators is None else aggregators
        self.hub = None  # flotilla.network.partials.Hub when self.aggregators
        store = StateStore
        if self.aggregators:
            from flotilla.network.partials import ScaleOutStore as store
        self.store = store(state_dir, fsync=fsync)
        self.store.lock()
        try:
            self._build(
                tokens,
                settings,
                server,
                aggregator,
                config,
                privacy,
                accountant,
                secure_buffer,
                secure_max_norm,
                secure_masking,
                limits,
            )
            if self.aggregators:
                from flotilla.network.partials import attach

                attach(self, self.aggregators)
        except BaseException:
            self.store.close()  # let go of the state directory's lock at once, not at garbage collection
            raise

    @staticmethod
    def _client_algorithm(cfg, settings, privacy, dp_sgd, secure) -> dict[str, Any] | None:
        """The ``client.algorithm`` section the assignments carry (None: FedAvg, nothing sent, so
        a plain run's assignments are unchanged); refused here as the simulator refuses it."""
        if cfg is None:
            return None
        from flotilla.algorithms.registry import Setting, as_config, refusal

        cfg = as_config(cfg)
        if cfg.name == "fedavg":
            return None
        why = refusal(
            cfg,
            Setting(
                "round" if settings.mode == "sync" else "buffer",
                True,
                "",
                dp_sgd is not None,
                privacy is not None,
                secure,
            ),
        )
        if why:
            raise ValueError(why)
        return cfg.model_dump(mode="json")

    def _build(
        self,
        tokens,
        settings,
        server,
        aggregator,
        config,
        privacy,
        accountant,
        secure_buffer,
        secure_max_norm,
        secure_masking,
        limits,
    ) -> None:
        if config is not None and not (self.store.path / "config.yaml").exists():
            self.store.run_dir.write_config(config)
        weights = self.flat.flat.clone()
        dp = masked_release = None
        if privacy is not None:
            # User-level DP (flotilla.privacy.UserLevelSpec): DPFedAvg per round / DPFedBuff per buffer.
            from flotilla.network.dp import NetworkPrivacy

            if aggregator is not None:
                raise ValueError("privacy: the DP aggregator replaces the aggregator; give one or the other")
            if settings.weighting != "uniform":
                raise ValueError(
                    "weighting: user-level DP needs weighting: uniform (example-count weights break the "
                    "per-device sensitivity bound clip_norm)"
                )
            dp = NetworkPrivacy(
                privacy,
                population=tokens.devices,
                mode=settings.mode,
                cohort=settings.cohort,
                buffer_size=settings.buffer_size,
                total_steps=settings.total_steps,
                accountant=accountant,
                seed=settings.seed,
            )
            if secure_masking is not None:
                masked_release = dp.masked_release()  # the aggregator stays the plain mean of the one released step
            elif secure_buffer and settings.mode == "async":
                aggregator = dp.secure_aggregator(
                    self.flat.numel, settings, lambda: self.coord.version, secure_max_norm
                )
            else:
                fedbuff = (
                    None
                    if settings.mode == "sync"
                    else FedBuff(
                        self.flat.numel,
                        settings.buffer_size,
                        settings.staleness,
                        normalize=settings.normalize,
                        max_staleness=settings.max_staleness,
                        validate=False,
                    )
                )
                aggregator = dp.aggregator(self.flat.numel, fedbuff)
        if secure_masking is not None and (secure_buffer or aggregator is not None):
            raise ValueError(
                "secure_aggregation: sync masking in flotilla serve runs without the secure buffer or "
                "a custom aggregator"
            )
        if secure_buffer:
            # Async only: devices seal updates to the buffer; sync SecAgg (the 4-round masking
            # protocol) is not run over the network.
            from flotilla.secure.fedbuff import SecureFedBuff

            if settings.mode != "async":
                raise ValueError(
                    "secure_aggregation: flotilla serve runs the async secure buffer only; synchronous "
                    "secure aggregation (the 4-round masking protocol) is not available over the network; "
                    "use mode: async, or the simulator"
                )
            if dp is None and aggregator is not None:
                raise ValueError("secure_aggregation: the secure buffer replaces the aggregator; give one or the other")
            aggregator = (
                aggregator
                if dp is not None
                else SecureFedBuff(
                    self.flat.numel,
                    settings.buffer_size,
                    settings.staleness,
                    version_fn=lambda: self.coord.version,
                    normalize=settings.normalize,
                    max_staleness=settings.max_staleness,
                    # the server cannot see norms of sealed updates: the buffer checks them
                    max_norm=secure_max_norm if secure_max_norm is not None else settings.max_update_norm,
                )
            )
        self.coord = Coordinator(
            weights,
            ServerOptimizer(server, self.flat.numel),
            settings,
            self.store,
            aggregator=aggregator,
            device_index=tokens.index,
            on_step=self._on_step,
            privacy=dp,
            sealed=secure_buffer,
            masked=secure_masking,
            masked_release=masked_release,
            uploads_per_device=limits.uploads_per_device,
            scaffold_population=tokens.devices if self.scaffold else None,
        )
        # metrics written after the snapshot we resumed from are dropped (those steps are redone);
        # steps committed whose record a crash lost are written back from the ledger
        history = (
            self.store.run_dir.truncate_metrics(self.coord.version) if self.store.run_dir.metrics_file.exists() else []
        )
        history += self._restore_metrics(history)
        self.limiter = RateLimiter(limits.rate, limits.burst)
        self.latest_metrics: dict[str, Any] = history[-1] if history else {}
        self.started = time.time()
        self._wall = float(history[-1].get("wall_time_s", 0.0)) if history else 0.0
        self._seen = float(history[-1].get("examples_seen", 0.0)) if history else 0.0
        self._last_step_t = time.perf_counter()
        self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="flotilla-eval")
        self._pending_records: list[asyncio.Future] = []
        self._server: grpc.aio.Server | None = None
        self._upload_slots: asyncio.Semaphore | None = None  # made on the serving loop
        self.bodies = UploadBodies()  # upload receive buffers, reused (network/bodies.py)
        self._downloads: dict[int, tuple[bytes, list[bytes]]] = {}  # version -> (its bytes, ModelChunks)
        self.port: int | None = None
        self.dataplane = None  # flotilla.network.dataplane.DataPlane while serving one
        self.data_bound: int = 0  # its port (0: none; devices use gRPC's Download and Upload)
        self.sealed_port = None  # flotilla.network.sealed_downloads.SealedDownloadPort while serving one

    # -- metrics (on the evaluation thread, in version order) --------------------------------
    def _restore_metrics(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records of committed steps missing from metrics.jsonl (a crash between a step's snapshot
        and its record), rebuilt from the ledger: training figures exact, evaluation null."""
        last = history[-1] if history else {}
        if int(last.get("round", 0)) >= self.coord.version:
            return []
        out = []
        seen = float(last.get("examples_seen", 0.0))
        for version, entries in self.store.steps():
            if version <= int(last.get("round", 0)) or version > self.coord.version:
                continue
            record = step_record(version, entries)
            seen += record.pop("examples_seen")
            record.update(
                wall_time_s=last.get("wall_time_s"),
                examples_seen=seen,
                accepted=max((int(e["seq"]) for e in entries), default=-1) + 1,
                rejected=None,
                loss=None,
                accuracy=None,
                recovered=True,
            )
            if self.coord.privacy is not None:
                record.update(self.coord.privacy.metrics(version))
            record = finite_or_none(record)
            self.store.run_dir.append_metrics(record)
            out.append(record)
        if out:
            log.warning(
                "recovery: wrote back the metrics records of steps %s (lost in a crash; evaluation not redone)",
                ", ".join(str(r["round"]) for r in out),
            )
        return out

    def _on_step(self, record: dict[str, Any]) -> None:
        self.observed.saw_step(self.coord.last_step_s)
        now = time.perf_counter()
        self._wall += now - self._last_step_t
        self._last_step_t = now
        self._seen += record.pop("examples_seen")
        c = self.coord
        record.update(
            wall_time_s=round(self._wall, 4),
            examples_seen=self._seen,
            accepted=c.counters["accepted"],
            rejected=sum(v for k, v in c.counters.items() if k.startswith("rejected.")),
        )
        evaluate = self.evaluate is not None and (record["round"] % self.eval_every == 0 or c.done)
        weights = c.weights.clone() if evaluate or c.done else None
        fut = asyncio.get_running_loop().run_in_executor(
            self._evaluator, self._write_record, record, weights, evaluate, c.done
        )
        self._pending_records = [f for f in self._pending_records if not f.done()] + [fut]

    def _write_record(self, record: dict[str, Any], weights: torch.Tensor | None, evaluate: bool, final: bool) -> None:
        if evaluate:
            record.update(self.evaluate(self.flat, weights))
        else:
            record.setdefault("loss", None)
            record.setdefault("accuracy", None)
        record = finite_or_none(record)
        self.store.run_dir.append_metrics(record)
        self.latest_metrics = record
        if final:
            self.flat.load(weights)
            self.store.run_dir.save_model(self.flat.named_views())
            log.info(
                "training finished at version %d; final model in %s",
                record["round"],
                self.store.path / "model.safetensors",
            )

    # -- authentication ------------------------------------------------------------------------
    async def _identify(
        self, context: grpc.aio.ServicerContext, roles=("device",), rate_limited: bool = True
    ) -> Identity:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == wire.AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
                token = value[7:]
        try:
            return self._who(token, context.peer(), roles, rate_limited)
        except Refused as err:
            await context.abort(_CODES[err.code], str(err), err.trailing_metadata())

    def _who(self, token: str | None, peer: str, roles=("device",), rate_limited: bool = True) -> Identity:
        """Who sends ``token`` (gRPC's bearer token or the data plane's), refused (and counted) if
        unknown, not allowed this call, or over its rate limit."""
        who = self.tokens.identify(token)
        if who is None:
            self.coord.counters["rejected.auth"] += 1
            log.warning("refused an unauthenticated call from %s", peer)
            raise Refused(
                "UNAUTHENTICATED",
                "auth",
                "unknown client: send a device token issued for this server (authorization: Bearer <token>)",
            )
        if who.role not in roles:
            self.coord.counters["rejected.auth"] += 1
            raise Refused("PERMISSION_DENIED", "auth", f"{who.device} ({who.role}) may not call this method")
        if rate_limited:
            self._check_rate(who)
        if who.role == "device":
            self.observed.devices_seen.add(who.device)
        return who

    def _check_rate(self, who: Identity) -> None:
        if not self.limiter.allow(who.device):
            self.coord.counters["rejected.rate"] += 1
            log.warning("rate limit: refused a call from %s", who.device)
            raise Refused(
                "RESOURCE_EXHAUSTED",
                "rate",
                f"rate limit: more than {self.limits.rate:g} requests/s from {who.device}; slow down",
                retry_after_s=max(1.0 / self.limits.rate, 0.05),
            )

    async def _rate_limit(self, context: grpc.aio.ServicerContext, who: Identity) -> None:
        try:
            self._check_rate(who)
        except Refused as err:
            await context.abort(_CODES[err.code], str(err), err.trailing_metadata())

    async def _refuse(self, context, err: Refused, device: str, ticket: Ticket | None = None):
        self.coord.refuse(err, device, ticket)
        await context.abort(_CODES[err.code], str(err), err.trailing_metadata())

    async def _decoded(self, request, context, who: Identity):
        """Refuse a request gRPC could not parse (INVALID_ARGUMENT, counted under ``invalid``)."""
        if isinstance(request, _Undecodable):
            await self._refuse(
                context,
                Refused("INVALID_ARGUMENT", "invalid", f"the request is not a valid {request.what} message"),
                who.device,
            )

    # -- RPCs ------------------------------------------------------------------------------------
    async def check_in(self, request: pb.CheckInRequest, context) -> pb.CheckInReply:
        who = await self._identify(context)
        await self._decoded(request, context, who)
        return self._check_in(who, request)

    def _check_in(self, who: Identity, request: pb.CheckInRequest) -> pb.CheckInReply:
        """What a check-in answers, whichever transport carried it (gRPC's CheckIn, the data plane)."""
        if self.hub is not None and not self.hub.ready() and not self.coord.done:  # aggregators not all up
            return pb.CheckInReply(task_json=self.task_json, device_id=who.device, action=0, retry_after_s=0.5)
        result = self.coord.check_in(who.device)
        reply = pb.CheckInReply(task_json=self.task_json, device_id=who.device)
        if self.data_bound:
            reply.data_port = self.data_bound  # check in (download and upload) through the data plane
        if result is None:
            reply.action = pb.CheckInReply.DONE
            reply.message = f"training finished at version {self.coord.version}"
            if self.coord.privacy is not None and self.coord.version < self.coord.settings.total_steps:
                reply.message += " (privacy budget spent)"
        elif isinstance(result, Ticket):
            reply.action = pb.CheckInReply.TRAIN
            a = reply.assignment
            a.assignment_id, a.ticket, a.version, a.round = (
                result.id,
                self.coord.ticket_text(result),
                result.version,
                result.round,
            )
            a.seed, a.client_json, a.numel = result.seed, self.client_json, self.coord.numel
            if self.hub is not None:  # scale-out: the aggregator this device uploads to
                a.client_json = self.hub.client_json(
                    self.client_json, who.device, _sdk(request) >= AGGREGATOR_DATA_PORT_SDK
                )
            a.expires_in_s, a.model_bytes = (
                max(0.0, result.expires - time.time()),
                4 * self.coord.numel * self.coord.rows,
            )
            if self.channels is not None:
                a.model_bytes = self.channels.download_bytes
            if self.sealed_port is not None:
                a.sealed_download.CopyFrom(
                    self.sealed_port.offer(
                        who.device, result.version, self._download_bytes(result.version, count=False), a.expires_in_s
                    )
                )
                if self.sealed_port.uploads is not None:
                    tickets, _ = self.sealed_port.uploads
                    a.sealed_upload.CopyFrom(tickets.offer(who.device, self.sealed_port.port, a.expires_in_s))
            if self.coord.sealed:
                a.buffer_key, a.buffer_nonce = self.coord.seal_info(result)
                a.seal_weight = 1.0 if self.coord.settings.weighting == "uniform" else 0.0  # 0: num_examples
                if self.coord.privacy is not None:
                    a.clip_norm = self.coord.privacy.user.clip_norm  # the buffer refuses larger norms
            if self.coord.masked is not None:
                from flotilla.network.secagg import SECAGG_FLAG

                reply.message = SECAGG_FLAG  # run the masking protocol (SecAggStep) instead of uploading
        else:
            reply.action = pb.CheckInReply.WAIT
            reply.retry_after_s = float(result)
        return reply

    async def secagg_step(self, request: bytes, context) -> bytes:
        """Sync secure aggregation: one protocol step (a SecAggBody, or older SDKs' JSON; flotilla.network.secagg)."""
        from flotilla.network.secagg import decode_body, encode_reply

        who = await self._identify(context, rate_limited=False)
        legacy = True
        try:
            req, legacy = decode_body(request)
            # a request sent in parts counts once against the rate limit (its first part); the parts
            # that follow are bounded by the round's largest message, and a refused one ends the request
            # (flotilla.network.secagg.RequestParts), so only the next part 0 can start another
            if not (
                isinstance(req, dict)
                and req.get("op") == "part"
                and req.get("index") not in (0, None)
                and self.coord.continues_request(who.device)
            ):
                await self._rate_limit(context, who)
            if req is None:
                raise Refused("INVALID_ARGUMENT", "invalid", "SecAggStep: the request is not a SecAggBody or JSON")
            reply = await asyncio.shield(self.coord.secagg_step(who.device, req))
        except Refused as e:
            await self._refuse(context, e, who.device)
        return encode_reply(reply, legacy)

    async def download(self, request: pb.DownloadRequest, context):
        who = await self._identify(context)
        await self._decoded(request, context, who)
        try:
            total, messages = self._download_chunks(request.version)
        except Refused as e:
            await self._refuse(context, e, who.device)
        self.observed.bytes_out += total
        for m in messages:  # serialised ModelChunk messages (the Download handler sends bytes as they are)
            yield m

    def _download_bytes(self, version: int, count: bool = True) -> bytes:
        """What a download of ``version`` carries: its float32 weights, or their channel encoding
        (``count``: as served to the channels' byte count; a sealed offer is counted when sent)."""
        data = self.coord.model_bytes(version)
        if self.channels is None:
            return data
        return self.channels.download(version, data) if count else self.channels.encoded(version, data)

    def _sealed_sent(self, nbytes: int) -> None:
        """A sealed download left the port (called on the loop): count it as a TLS download is."""
        self.observed.bytes_out += nbytes
        if self.channels is not None:
            self.channels.bytes_down += nbytes

    def _download_chunks(self, version: int) -> tuple[int, list[bytes]]:
        """The bytes of ``version``'s download and its ModelChunk messages, serialised on the first
        download of each version and shared by every device after it (no copy per device).  An entry
        is used only while the coordinator (or the channels) still serve that very bytes object, so a
        version's bytes replaced for any reason are serialised again; versions no longer served go."""
        data = self._download_bytes(version)
        hit = self._downloads.get(version)
        if hit is not None and hit[0] is data:
            return len(data), hit[1]
        for v in list(self._downloads):
            try:
                self.coord.model_bytes(v)
            except Refused:
                del self._downloads[v]
        self._downloads[version] = (data, wire.model_chunks(version, data, self.limits.chunk_bytes))
        return len(data), self._downloads[version][1]

    async def upload(self, request_iterator, context) -> pb.UploadReply:
        who = await self._identify(context)

        async def header() -> pb.UploadHeader:
            try:
                first = await anext(aiter(request_iterator))
            except StopAsyncIteration:
                raise Refused(
                    "INVALID_ARGUMENT", "invalid", "upload refused: empty stream (send the header first)"
                ) from None
            if isinstance(first, _Undecodable):
                raise Refused(
                    "INVALID_ARGUMENT", "invalid", "upload refused: the first message is not a valid UploadPart"
                )
            if first.WhichOneof("part") != "header":
                raise Refused("INVALID_ARGUMENT", "invalid", "upload refused: the first message must be the header")
            return first.header

        async def receive(size: int, what: str, into: memoryview | None = None, squares: bool = False):
            return *(await self._receive_body(request_iterator, size, what, into)), None  # check_delta sums the squares

        try:
            seq, version = await self.accept_upload(who, header, receive)
        except Refused as e:  # counted by accept_upload
            await context.abort(_CODES[e.code], str(e), e.trailing_metadata())
        return self._upload_reply(who, seq, version)

    def _upload_reply(self, who: Identity, seq: int, version: int) -> pb.UploadReply:
        """The answer to an accepted upload, with how long the device rests before its next work:
        it saves the device a round trip (a check-in that would only be told WAIT) and the server a
        request per trip (its CPU per trip did not change measurably: network_load.py, 3 pairs)."""
        return pb.UploadReply(seq=seq, version=version, rest_s=self.coord.rest_s(who.device))

    async def accept_upload(self, who: Identity, header, receive) -> tuple[int, int]:
        """One upload, whatever carried it (gRPC's Upload stream or the data plane): ``header()``
        gives its UploadHeader, ``receive(size, what, into)`` its ``size`` body bytes (in ``into``, a
        buffer from ``self.bodies``) and their fingerprint.
        Returns ``(seq, version)``; a refusal is counted (coordinator.refuse) and raised."""
        c = self.coord
        ticket = None
        began = False
        body = None  # the upload's buffer once its receive returned (network/bodies.py: when it may go back)
        try:
            try:
                # The whole stream, header included, within upload_timeout_s: a stalled stream is cut
                # and frees its slot (one device cannot hold the others' uploads hostage).
                async with asyncio.timeout(self.limits.upload_timeout_s):
                    h = await header()
                    dtype = h.dtype
                    if self.channels is not None:  # compressed: checked as the float32 delta it decodes to
                        from flotilla.channels.wire import CHANNEL_DTYPE

                        if dtype != CHANNEL_DTYPE:
                            raise Refused(
                                "INVALID_ARGUMENT",
                                "dtype",
                                f"upload refused: dtype {dtype!r}, expected {CHANNEL_DTYPE!r} (this server's "
                                "channels compress uploads: encode the delta with the assignment's channels)",
                            )
                        dtype = "float32"
                    ticket, answer = c.check_header(
                        who.device,
                        h.ticket,
                        h.base_version,
                        dtype,
                        list(h.shape),
                        int(h.num_examples),
                        float(h.train_loss),
                        int(h.examples_seen),
                    )
                    if c.sealed and answer is None and len(h.ephemeral_pk) != 32:
                        raise Refused(
                            "INVALID_ARGUMENT",
                            "tampered",
                            "upload refused: a sealed upload needs the 32-byte ephemeral key",
                        )
                    c.table.begin_upload(ticket)  # one stream per assignment, a few per device
                    began = True
                    # sealed: AES-GCM nonce (12) + weight (8) + float32 delta + tag (16); channels: the encoding's
                    numel = c.numel * c.rows
                    size = self.channels.upload_bytes if self.channels is not None else 4 * numel + 36 * c.sealed
                    # At most `upload_slots` deltas are held in memory at once, whatever the concurrency;
                    # the other streams wait here (gRPC: throttled by HTTP/2 flow control).
                    async with self._upload_slots:
                        # a plain float32 delta: the data plane sums its squares as it arrives (check_delta's norm)
                        squares = not c.sealed and self.channels is None and c.variates is None
                        buf, digest, sumsq = await receive(
                            size, f"shape ({numel},) float32", self.bodies.take(size), squares
                        )
                        body = buf
                        self.observed.bytes_in += len(buf)
            except TimeoutError:
                raise Refused(
                    "DEADLINE_EXCEEDED",
                    "stalled",
                    f"upload refused: the stream did not finish within {self.limits.upload_timeout_s:g} s "
                    "(upload_timeout_s); retry on a better connection",
                    retry_after_s=1.0,
                ) from None
            if answer is not None:  # a retry of an assignment already in the ledger
                if answer.digest is not None and answer.digest == digest:
                    return answer.seq, answer.version
                raise Refused(
                    "ALREADY_EXISTS",
                    "replay",
                    f"upload refused: replayed nonce, assignment {ticket.id[:8]} "
                    f"was already accepted as update #{answer.seq} (with other bytes)",
                )
            if c.sealed:  # the buffer validates what it opens; the server sees only ciphertext
                up = Upload(
                    ticket,
                    int(h.num_examples),
                    float(h.train_loss),
                    int(h.examples_seen),
                    None,
                    math.nan,
                    bytes(h.ephemeral_pk),
                    bytes(buf),
                    digest=digest,
                )
            else:
                if self.channels is not None:
                    try:
                        payload = self.channels.decode_upload(buf)
                    except ValueError as e:
                        raise Refused("INVALID_ARGUMENT", "invalid", f"upload refused: {e}") from None
                else:
                    payload = torch.frombuffer(buf, dtype=torch.float32)
                delta, control = (payload, None) if c.variates is None else (payload[: c.numel], payload[c.numel :])
                norm = c.check_delta(delta, who.device, sumsq)
                if control is not None:
                    c.check_control(control, who.device)
                up = Upload(
                    ticket,
                    int(h.num_examples),
                    float(h.train_loss),
                    int(h.examples_seen),
                    delta,
                    norm,
                    control=control,
                    digest=digest,
                )
            # Shielded: a client hanging up must not cut a commit (or a server step) in half.  The
            # assignment's upload slot is held until the commit ends, so a retry sent meanwhile is
            # told "busy" and then gets the commit's answer, not a replay refusal.
            commit = asyncio.ensure_future(c.commit(up, buf))

            def committed(_, bodies=self.bodies, body=body) -> None:
                c.table.end_upload(ticket)
                up.delta = up.control = None  # views of the body: the sum has their values now, or never will
                bodies.give(body)

            commit.add_done_callback(committed)
            began = False
            body = None  # the commit gives it back
            return await asyncio.shield(commit)
        except Refused as e:
            c.refuse(e, who.device, ticket)
            raise
        finally:
            if began:
                c.table.end_upload(ticket)
            if body is not None:
                self.bodies.give(body)

    async def _receive_body(
        self, request_iterator, size: int, what: str, into: memoryview | None = None
    ) -> tuple[memoryview, str]:
        """The upload's ``size`` bytes (in ``into`` when given), and their fingerprint
        (coordinator.fingerprint), computed block by block as each block is copied in, while it is
        in the cache (a pass over the whole body later costs about twice as much CPU on a busy machine)."""
        # not zeroed: every byte is written below, or it is refused
        buf = memoryview(np.empty(size, np.uint8)) if into is None else into
        pos = crc = 0
        async for part in request_iterator:
            kind = part.WhichOneof("part")
            if kind != "data":
                what_part = (
                    "not a valid UploadPart" if isinstance(part, _Undecodable) else "a second header in the stream"
                )
                raise Refused("INVALID_ARGUMENT", "invalid", f"upload refused: {what_part}")
            n = len(part.data)
            if pos + n > size:
                raise Refused("INVALID_ARGUMENT", "shape", f"upload refused: more than the {size} bytes of {what}")
            data = memoryview(part.data)
            for off in range(0, n, FINGERPRINT_BLOCK):
                block = data[off : off + FINGERPRINT_BLOCK]
                buf[pos + off : pos + off + len(block)] = block
                crc = crc32(block, crc)
            pos += n
        if pos != size:
            # Also where a message over max_message_bytes ends up: gRPC drops it (the client
            # gets RESOURCE_EXHAUSTED "larger than max") and the stream looks cut short here.
            raise Refused(
                "INVALID_ARGUMENT",
                "truncated",
                f"upload refused: the stream ended after {pos} of the {size} bytes that {what} needs",
            )
        return buf, fingerprint_text(crc, size)  # == fingerprint(buf) (tests/test_network_cpu.py holds it)

    # -- the data plane (flotilla.network.dataplane): its handlers, run on this loop ---------------
    async def data_download(self, token: str, peer: str, request: pb.DownloadRequest) -> tuple[bytes, int]:
        who = self._who(token, peer)
        try:
            data = self._download_bytes(request.version)
        except Refused as e:
            raise self.coord.refuse(e, who.device) from None
        self.observed.bytes_out += len(data)
        return data, request.version

    async def data_check_in(self, token: str, peer: str, request: pb.CheckInRequest) -> pb.CheckInReply:
        return self._check_in(self._who(token, peer), request)

    async def data_upload(
        self, token: str, peer: str, header: pb.UploadHeader, receive, device: str | None = None
    ) -> pb.UploadReply:
        """``device``: a sealed upload's (flotilla.network.sealed_uploads): the device its ticket was
        offered to, which the token must name."""
        who = self._who(token, peer)
        if device is not None and who.device != device:
            raise self.coord.refuse(
                Refused(
                    "PERMISSION_DENIED",
                    "ticket",
                    "upload refused: this sealed upload's ticket was offered to another device",
                ),
                who.device,
            )

        async def given() -> pb.UploadHeader:
            return header

        return self._upload_reply(who, *await self.accept_upload(who, given, receive))

    def data_refused(self, err: Refused, peer: str) -> None:
        """A data-plane request refused before it named anyone (too long, not a DataRequest): counted."""
        self.coord.refuse(err, peer)

    async def status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        who = await self._identify(context, roles=("device", "admin"))
        await self._decoded(request, context, who)
        s = self.coord.status()
        s.update(
            uptime_s=round(time.time() - self.started, 1),
            metrics=finite_or_none(self.latest_metrics),
            limits=asdict(self.limits),
            data_port=self.data_bound,  # 0: no data plane (downloads and uploads over gRPC)
            # receive buffers allocated so far, and kept free now (memory; network/bodies.py)
            upload_buffers={
                "made": self.bodies.made,
                "released": self.bodies.released,
                "free_bytes": self.bodies.free_bytes,
            },
            # requests the data plane handed to the handlers, by kind (None: no data plane)
            data_plane_served=None if self.dataplane is None else dict(self.dataplane.served),
            # sealed downloads: offers made, fetches sent and refused, versions sealed (None: off)
            sealed_downloads=None if self.sealed_port is None else dict(self.sealed_port.counts),
            # sealed uploads: offers made, tickets used and refused (None: off)
            sealed_uploads=None
            if self.sealed_port is None or self.sealed_port.uploads is None
            else dict(self.sealed_port.uploads[0].counts),
            state_dir=str(self.store.path),
            task=json.loads(self.task_json),
        )  # devices check their data against it before checking in
        return pb.StatusReply(json=json.dumps(s))

    def refresh_snapshot(self) -> None:
        """Build what watchers see (on the server's loop, so the tables are not changing under it)."""
        o, c = self.observed, self.coord
        lat = sorted(o.step_latency_s)
        r = c.secagg
        o.publish(
            {
                "time": time.time(),
                "uptime_s": round(time.time() - self.started, 1),
                "status": c.status(),
                "devices_seen": len(o.devices_seen),
                "bytes_in": o.bytes_in,
                "bytes_out": o.bytes_out,
                "step_latency_s": {
                    "count": o.step_latency_total,
                    "last": o.step_latency_s[-1] if lat else None,  # None before the first step
                    "p50": lat[len(lat) // 2] if lat else None,
                    "p90": lat[int(len(lat) * 0.9)] if lat else None,
                },
                "secagg": None
                if r is None
                else {"stage": r.stage, "devices": len(r.ids), "slots": r.config.cohort, "aborted": r.aborted},
                "ledger_tail": ledger_tail(self.store.ledger_file),
                "metrics": finite_or_none(self.latest_metrics),
            }
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def _handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "CheckIn": grpc.unary_unary_rpc_method_handler(
                    self.check_in, _parser(pb.CheckInRequest), pb.CheckInReply.SerializeToString
                ),
                "Download": grpc.unary_stream_rpc_method_handler(
                    self.download,
                    _parser(pb.DownloadRequest),
                    None,  # yields serialised ModelChunks
                ),
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self.upload, _parser(pb.UploadPart, wire.parse_upload_part), pb.UploadReply.SerializeToString
                ),
                "Status": grpc.unary_unary_rpc_method_handler(
                    self.status, _parser(pb.StatusRequest), pb.StatusReply.SerializeToString
                ),
                # bytes in and out (JSON): registered by hand, no .proto message
                "SecAggStep": grpc.unary_unary_rpc_method_handler(self.secagg_step, None, None),
            },
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening (TLS only, the port exclusively); returns the bound port."""
        if not 0 <= port <= 65535:
            raise ValueError(f"--port: must be between 0 and 65535, got {port}")
        self._upload_slots = asyncio.Semaphore(self.limits.upload_slots)
        # grpc.so_reuseport 0: a second server on the same port fails to bind instead of sharing it
        self._server = grpc.aio.server(
            options=[*wire.channel_options(self.limits.max_message_bytes), ("grpc.so_reuseport", 0)],
            compression=self.compression,
        )
        self._server.add_generic_rpc_handlers((self._handler(),) + (() if self.hub is None else (self.hub.handler(),)))
        try:
            self.port = self._server.add_secure_port(f"{host}:{port}", self._credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            self._server = None
            self.store.close()
            if _in_use(host, port):
                raise InUse(
                    f"cannot listen on {host}:{port}: the port is in use (another flotilla serve?); "
                    "choose another --port"
                ) from None
            raise ValueError(
                f"cannot listen on {host}:{port}: check the address, and that network.tls.key is the "
                "private key of network.tls.cert"
            ) from None
        try:
            self._start_dataplane(host)
            self._start_sealed_downloads(host)
        except BaseException:
            if self.dataplane is not None:
                self.dataplane.stop()
                self.dataplane, self.data_bound = None, 0
            self._server = None
            self.store.close()
            raise
        await self.coord.start()
        await self._server.start()
        self._last_step_t = time.perf_counter()
        log.info(
            "serving on %s:%d (TLS%s%s%s), %s mode, version %d of %d",
            host,
            self.port,
            f"; data plane on port {self.data_bound}" if self.data_bound else "",
            f"; sealed downloads on port {self.sealed_port.port}" if self.sealed_port is not None else "",
            ", client certificates required" if self.tls.require_client_cert else "",
            self.coord.settings.mode,
            self.coord.version,
            self.coord.settings.total_steps,
        )
        return self.port

    def _start_dataplane(self, host: str) -> None:
        """Listen for check-ins, downloads and uploads on the data port too (with scale-out
        aggregators, which take the downloads and uploads, it carries the devices' check-ins)."""
        if self.data_port in (None, "off"):
            return
        plane = data_plane(self, self.tls, self.limits)
        self.data_bound = _start_listener(
            plane, host, self.data_port, "the data plane", "--data-port (or network.data_port: auto)"
        )
        self.dataplane = plane

    def _start_sealed_downloads(self, host: str) -> None:
        """Serve sealed downloads (flotilla.network.sealed_downloads) when configured."""
        setting = self.sealed_download_port
        if setting in (None, "off"):
            if self.sealed_uploads:
                raise ValueError(
                    "sealed_uploads: they travel on the sealed port; set sealed_download_port (auto or a number)"
                )
            return
        if self.hub is not None:
            raise ValueError(
                "sealed_download_port: not with aggregators (the aggregators serve the downloads, over TLS); "
                "set it to off"
            )
        from flotilla.network.sealed_downloads import SealedDownloadPort

        uploads = None
        if self.sealed_uploads:
            if self.dataplane is None:
                raise ValueError(
                    "sealed_uploads: they run through the data plane's upload handler; set data_port (auto or a number)"
                )
            from flotilla.network.sealed_uploads import UploadTickets

            uploads = (UploadTickets(), self.dataplane.serve_sealed)
        loop = asyncio.get_running_loop()
        sealed = SealedDownloadPort(
            on_sent=lambda nbytes: loop.call_soon_threadsafe(self._sealed_sent, nbytes),
            uploads=uploads,
            max_connections=self.limits.data_connections,
            header_timeout_s=self.limits.data_header_timeout_s,
            idle_timeout_s=self.limits.data_idle_timeout_s,
            transfer_timeout_s=self.limits.upload_timeout_s + 1.0,
        )
        _start_listener(sealed, host, setting, "sealed downloads", "network.sealed_download_port (or auto)")
        self.sealed_port = sealed

    async def run_until_done(self, stop: asyncio.Event | None = None) -> None:
        """Serve until training is finished (then ``linger_s`` more, telling devices DONE) or ``stop``."""
        stop = stop or asyncio.Event()
        while not self.coord.done and not stop.is_set():
            await asyncio.shield(self.coord.close_round_if_due())
            if self.watched and time.monotonic() - self.observed.refreshed_at >= 1.0:
                self.refresh_snapshot()
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass
        if self._pending_records:
            await asyncio.gather(*self._pending_records)
        if self.watched:
            self.refresh_snapshot()  # watchers see the end: done, the last step, the final metrics
        if self.coord.done and not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.linger_s)
            except TimeoutError:
                pass
        await self.stop()

    async def stop(self, grace: float = 1.0) -> None:
        if self.dataplane is not None:  # off the loop: its threads may be waiting on handlers here
            plane, self.dataplane, self.data_bound = self.dataplane, None, 0
            await asyncio.to_thread(plane.stop)
        if self.sealed_port is not None:
            sealed, self.sealed_port = self.sealed_port, None
            await asyncio.to_thread(sealed.stop)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self._evaluator.shutdown(wait=True)
        self.store.close()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Blocking: start, train to the end, linger, stop."""

        async def main():
            await self.start(host, port)
            await self.run_until_done()

        asyncio.run(main())


def data_plane(handlers, tls: TLSFiles, limits: Limits):
    """A data plane (flotilla.network.dataplane) for ``handlers`` on the running loop: the gRPC
    port's TLS files, the limits' connection cap and deadlines (the server's and the aggregators')."""
    from flotilla.network.dataplane import DataPlane

    return DataPlane(
        tls.ssl_context(),
        handlers,
        asyncio.get_running_loop(),
        max_connections=limits.data_connections,
        header_timeout_s=limits.data_header_timeout_s,
        idle_timeout_s=limits.data_idle_timeout_s,
        transfer_timeout_s=limits.upload_timeout_s + 1.0,  # the handler's own timeout answers first
    )


def _start_listener(listener, host: str, setting, what: str, another: str) -> int:
    """Start a threaded listener (the data plane, the sealed-download port) on ``setting`` ("auto":
    any free port, or a number); returns the port.  A port in use, or an address that cannot be
    bound, is refused in one line naming ``what`` listens there and the setting to change."""
    port = 0 if setting == "auto" else int(setting)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: the port must be between 0 and 65535, 'auto' or 'off', got {setting}")
    try:
        return listener.start(host, port)
    except OSError as e:
        if _in_use(host, port):
            raise InUse(
                f"cannot listen on {host}:{port} ({what}): the port is in use; choose another {another}"
            ) from None
        raise ValueError(f"cannot listen on {host}:{port} ({what}): {e.strerror or e}") from None


def _in_use(host: str, port: int) -> bool:
    """Whether another socket listens on ``host:port`` (diagnosis after a failed bind)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is not "in use"
            try:
                sock.bind(addr)
            except OSError:
                return True
    return False


class ServerThread:
    """Runs a :class:`FlotillaServer` on its own event loop in a background thread (tests, notebooks)."""

    def __init__(self, server: FlotillaServer, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(host, port), daemon=True, name="flotilla-server")
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        self.port = server.port

    def _main(self, host: str, port: int) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start(host, port)
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server.run_until_done(self._stop)

        asyncio.run(main())

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop (coroutine functions are awaited) and return its result."""

        async def wrapper():
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # its loop closed meanwhile: it had finished by itself (training done)
                pass
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
