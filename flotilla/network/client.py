"""The device side: a TLS connection to a Flotilla server, and a device loop that trains on local data.

    from flotilla.client import Device
    device = Device("server.example:50051", token, model=MyNet(), data=(x, y), ca="certs/ca.pem")
    report = device.run()      # check in, download, train, upload ... until the server says done

Training uses the simulator's :class:`~flotilla.core.client.LocalTrainer` on one flat model, with
the local settings and seed that the server's assignment names.  Connection failures (server
restarting, network down) and rate limits are retried with exponential backoff and jitter; an
upload interrupted by a restart is sent again with the same ticket, and the server's "already
accepted" answer counts as success (the server keeps exactly one copy).  What retrying cannot fix
ends at once with one clear error: a failed TLS handshake (:class:`TLSError`), local data the
model cannot train on (checked before any work is taken), and assignments the device cannot
satisfy (a non-finite update, or one the server refuses as invalid): the device gives such an
assignment up, says why, never retrains it, and stops after ``max_give_ups`` in a row
(:class:`GaveUp`).  :class:`Connection` is the low-level API (one RPC per method) that
:class:`Device` is built on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.core.client import ClientSpec, LocalTrainer, LossFn
from flotilla.core.dataset import FederatedDataset, from_torch_datasets
from flotilla.core.device import resolve_device
from flotilla.core.flat import FlatModel
from flotilla.network import wire
from flotilla.network.wire import pb

log = logging.getLogger("flotilla.client")

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Refused(RuntimeError):
    """The server refused a request; ``code`` is the gRPC status, ``str()`` the server's reason.

    ``retry``, ``reason`` and ``retry_after_s`` are what the server's trailing metadata says
    (flotilla.network.refusals): "request" (send it again after a pause), "checkin" (this
    assignment is over: check in again) or "never"; None when the answer did not come from a
    Flotilla server (the connection failed, or an older server)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        retry: str | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message
        self.retry = retry
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Worth sending again after a pause: the server unreachable or restarting, a call that
        timed out on the way, a rate limit.  Not the server's own verdicts that share those codes
        on servers that do not say so: an expired assignment (DEADLINE_EXCEEDED) or a message over
        the size limit (RESOURCE_EXHAUSTED) get the same answer however often they are sent."""
        if self.retry is not None:
            return self.retry == "request"
        if self.code not in RETRYABLE:
            return False
        if self.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "expired" not in self.details
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self.details.startswith("rate limit")
        return True

    @property
    def unsatisfiable(self) -> bool:
        """An upload refused for what the device trained (shape, values, norm, numbers): the same
        update would be refused again.  Not a duplicate (ALREADY_EXISTS: the first one counted)."""
        if self.code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED):
            return False
        if self.retry is not None:
            return self.retry == "never"
        return self.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)

    @property
    def training_finished(self) -> bool:
        """The server's answer to an upload or step after its last step."""
        return self.code == grpc.StatusCode.FAILED_PRECONDITION and "training finished" in self.details


class TLSError(Refused, ConnectionError):
    """The TLS handshake with the server failed: a certificate problem that retrying will not fix.
    (UNAVAILABLE to gRPC, so still a :class:`Refused`, but never retryable.)"""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message, retry="never", reason="tls")

    def __str__(self) -> str:
        return self.details


class GaveUp(RuntimeError):
    """The device gave up ``max_give_ups`` assignments in a row (its updates cannot be accepted);
    ``report`` is the :class:`DeviceReport` so far."""

    def __init__(self, message: str, report: DeviceReport | None = None):
        super().__init__(message)
        self.report = report


def _refused(err: grpc.RpcError) -> Refused:
    try:
        md = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - an error raised before any call existed has none
        md = {}
    try:
        after = float(md["flotilla-retry-after-s"])
        after = after if math.isfinite(after) and after >= 0 else None
    except (KeyError, ValueError):
        after = None
    return Refused(
        err.code(),
        err.details() or "",
        retry=md.get("flotilla-retry"),
        reason=md.get("flotilla-refusal"),
        retry_after_s=after,
    )


MAX_REST_S = 300.0  # the longest rest an upload's reply may ask of a device (UploadReply.rest_s)

# A certificate failure in gRPC's error text (C-core, BoringSSL): a failed handshake whose reason
# is about a certificate.  A handshake cut short (the server stopping) is not one: it is retried.
_CERTIFICATE_WORDS = ("certificate", "signature", "issuer", "peer name", "hostname", "unknown_ca")


def _certificate_failure(details: str) -> bool:
    d = details.lower()
    return "handshake failed" in d and any(w in d for w in _CERTIFICATE_WORDS)


def _ssl_reason(text: str) -> str:
    """The short BoringSSL reason out of gRPC's long error text."""
    for mark in ("OPENSSL_internal:", "SSL routines:"):
        if mark in text:
            return text.rsplit(mark, 1)[1].removesuffix(": OK").strip()
    return text.strip()


_DROPPED = "the server closed the connection right after the handshake"


def _explain(reason: str, *, has_ca: bool, has_cert: bool) -> str:
    r = reason.upper()
    refused_cert = r == _DROPPED.upper() or (
        "ALERT" in r
        and any(
            m in r
            for m in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")
        )
    )
    if refused_cert and not has_cert:
        return "the server requires a client certificate (mutual TLS): give --cert and --key (cert=, key=)"
    if refused_cert:
        return (
            "the server refused this device's client certificate: --cert must be signed by the CA in "
            "the server's network.tls.ca"
        )
    if "HOSTNAME" in r or "PEER NAME" in r or "IP ADDRESS MISMATCH" in r:
        return "the server's certificate does not list the name this device connects to (--server, or --server-name)"
    if "EXPIRED" in r or "NOT YET VALID" in r:
        return "the server's certificate has expired (or is not valid yet)"
    if has_ca:
        return "the server's certificate is not signed by the CA given with --ca (ca=)"
    return (
        "the server's certificate is not signed by a CA this device trusts: give the CA that signed it with --ca (ca=)"
    )


def _data_refused(r) -> Refused:
    """A data plane's (or sealed upload's) refusal, a pb.DataReply, as this SDK's exception."""
    code = getattr(grpc.StatusCode, r.code, grpc.StatusCode.UNKNOWN)
    after = r.retry_after_s if math.isfinite(r.retry_after_s) and r.retry_after_s >= 0 else None
    return Refused(code, r.message, retry=r.retry or None, reason=r.reason or None, retry_after_s=after)


def probe_tls(
    server: str,
    ca: bytes | None,
    cert: str | Path | None,
    key: str | Path | None,
    server_name: str | None = None,
    timeout_s: float = 3.0,
) -> str | None:
    """Why a TLS session with ``server`` fails, or None if it works or the server cannot be reached
    (that is for the retry loop).  gRPC reports a server that refuses the client certificate only
    as "Socket closed", the same words as a server going down; a handshake of our own tells them
    apart.  In TLS 1.3 the server judges the client certificate after the handshake, so an HTTP/2
    preface is sent and one byte read: a server that accepts the device answers with its own
    settings, one that refuses it closes the connection."""
    host, _, port = server.rpartition(":")
    host = host.removeprefix("dns:").lstrip("/").strip("[]")
    if not host or not port.isdigit():
        return None
    from flotilla.network.dataplane_client import client_context

    try:
        ctx = client_context(ca, cert, key)
    except (ssl.SSLError, ValueError, OSError):
        return None  # gRPC reads the same files and says what is wrong with them
    ctx.set_alpn_protocols(["h2"])
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(sock, server_hostname=server_name or host) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            if not s.recv(1):
                return _DROPPED
    except ssl.SSLCertVerificationError as e:
        return e.verify_message or e.reason or str(e)
    except ssl.SSLError as e:
        return e.reason or str(e)
    except OSError:
        return None
    finally:
        sock.close()
    return None


@dataclass
class Assignment:
    id: str
    ticket: str
    version: int
    round: int
    seed: int
    client: ClientSpec
    numel: int
    expires_in_s: float
    device: str = ""  # who the server says this device is (the sealed update names it)
    buffer_key: bytes = b""  # async secure buffer: seal the update to this key ...
    buffer_nonce: bytes = b""  # ... binding this single-use nonce
    seal_weight: float = 0.0  # sealed weight: this, or num_examples when 0
    clip_norm: float = 0.0  # > 0: clip the delta to this L2 norm before sealing (user-level DP)
    secagg: bool = False  # sync secure aggregation: run the masking protocol instead of uploading
    dp_sgd: Any = None  # sample-level DP (flotilla.privacy.SampleLevelSpec): train with DP-SGD
    algorithm: dict[str, Any] | None = None  # client.algorithm (fedprox: mu; scaffold); None: FedAvg's local SGD
    channels: dict[str, Any] | None = None  # compressed download/upload (flotilla.channels); None: float32
    aggregator: str | None = None  # scale-out (serve --aggregators N): upload to this HOST:PORT, not the server
    aggregator_data_port: int = 0  # ... through its data plane on this port of the same host (0: gRPC)

    @property
    def scaffold(self) -> bool:
        return self.algorithm is not None and self.algorithm.get("name") == "scaffold"


@dataclass
class CheckIn:
    action: str  # "train" | "wait" | "done"
    assignment: Assignment | None
    retry_after_s: float
    task: dict[str, Any]
    device_id: str
    message: str = ""


def _client_spec(spec: dict[str, Any]) -> ClientSpec:
    """The assignment's local-training settings; keys this SDK does not know (a newer server's) are
    left out, not fatal, so an older device keeps training with what it understands."""
    known = {f.name for f in dataclasses.fields(ClientSpec)}
    unknown = tuple(sorted(set(spec) - known))
    if unknown and unknown not in _UNKNOWN_SEEN:
        _UNKNOWN_SEEN.add(unknown)
        log.warning(
            "the server's assignments carry settings this SDK does not know (ignored; update the SDK): %s",
            ", ".join(unknown),
        )
    return ClientSpec(**{k: v for k, v in spec.items() if k in known})


_UNKNOWN_SEEN: set[tuple[str, ...]] = set()  # warned once per set of unknown keys


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} not found")
    return p.read_bytes()


class Connection:
    """One TLS channel to a server, authenticated with a device token; one method per RPC.

    Check-ins, downloads and uploads go through the server's data plane (flotilla.network.dataplane)
    once a check-in named one (``data_port``; ``data_plane=False``: never), else through gRPC."""

    def __init__(
        self,
        server: str,
        token: str | None,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        compression: str | None = None,
        chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float = 120.0,
        data_plane: bool = True,
    ):
        self._ca = _read(ca, "ca")
        self._cert, self._key, self._server_name = cert, key, server_name
        self._reached = False  # any answer from the server so far (then "Socket closed" is not a handshake problem)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=_read(key, "key"), certificate_chain=_read(cert, "cert")
        )
        options = wire.channel_options(max_message_bytes)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.server = server
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.channel = grpc.secure_channel(server, creds, options=options, compression=wire.compression(compression))
        self.metadata = ((wire.AUTH_HEADER, f"Bearer {token}"),) if token else ()
        ser = lambda m: m.SerializeToString()  # noqa: E731
        self._check_in = self.channel.unary_unary(wire.CHECK_IN, ser, pb.CheckInReply.FromString)
        self._download = self.channel.unary_stream(wire.DOWNLOAD, ser, pb.ModelChunk.FromString)
        self._upload = self.channel.stream_unary(wire.UPLOAD, ser, pb.UploadReply.FromString)
        self._status = self.channel.unary_unary(wire.STATUS, ser, pb.StatusReply.FromString)
        self._secagg = self.channel.unary_unary(wire.SECAGG_STEP, None, None)
        self._token = token
        self.data_plane = data_plane
        self.data_port = 0  # the data port the last check-in named (0: none)
        self._data = None  # its DataClient, made on first use
        self._data_off_until = 0.0  # unreachable lately: gRPC until then
        self._data_check_ins = True  # False: this server's data plane predates check-ins (gRPC's)
        # sealed downloads (flotilla.network.sealed_downloads): the last TRAIN check-in's offer, by
        # version; a port unreachable lately and until when it is not tried (another port, e.g. a
        # restarted server's, is tried at once); fetches that worked and that failed
        self._sealed_offers: dict[int, Any] = {}
        self._sealed_off: tuple[int, float] = (0, 0.0)
        self.sealed_downloads = {"fetched": 0, "failed": 0}
        # sealed uploads (flotilla.network.sealed_uploads): the last TRAIN check-in's offer, by the
        # assignment's ticket (one try; any failure short of the server's reply: TLS); the counts
        self._sealed_upload_offers: dict[str, Any] = {}
        self.sealed_uploads = {"sent": 0, "failed": 0}
        # what the last accepted upload's reply asked: no work for this device for that many seconds
        # (async mode), so checking in sooner would only be told WAIT; 0: check in when ready
        self.rest_s = 0.0

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
        self.channel.close()

    # -- the data plane ----------------------------------------------------------------------------
    def _data_client(self):
        """The data plane's client, or None to use gRPC (none advertised, or unreachable lately)."""
        if not (self.data_plane and self.data_port) or time.monotonic() < self._data_off_until:
            return None
        if self._data is None or self._data.port != self.data_port:
            from flotilla.network.dataplane_client import DataClient

            if self._data is not None:
                self._data.close()
            self._data = DataClient(
                self.host,
                self.data_port,
                self._token,
                ca=self._ca,
                cert=self._cert,
                key=self._key,
                server_name=self._server_name,
                timeout_s=self.timeout_s,
            )
        return self._data

    @property
    def host(self) -> str:
        """The server's host name or address, as the data ports are reached."""
        return self.server.rpartition(":")[0].removeprefix("dns:").lstrip("/").strip("[]")

    _GRPC = object()  # a data-plane call's answer when gRPC must carry it instead

    def _via_data(self, fn):
        """``fn(data_client)``, with the data plane's failures as this SDK's exceptions; ``_GRPC``
        when the data port cannot be reached (then gRPC for a minute)."""
        from flotilla.network.dataplane_client import DataRefusal, TLSFailure, Unreachable

        client = self._data_client()
        if client is None:
            return self._GRPC
        try:
            return fn(client)
        except Unreachable as e:
            log.warning("%s; using gRPC for check-ins, downloads and uploads for a minute", e)
            self._data_off_until = time.monotonic() + 60.0
            return self._GRPC
        except TLSFailure as e:
            why = str(e)
            raise TLSError(
                f"TLS handshake with {client.host}:{client.port} (data plane) failed: "
                f"{_explain(why, has_ca=self._ca is not None, has_cert=self._cert is not None)} [{why}]"
            ) from None
        except DataRefusal as e:
            raise _data_refused(e.reply) from None
        except TimeoutError as e:  # this call's own timeout_s, as gRPC's deadline
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"data plane: {e}") from None
        except OSError as e:  # the connection broke mid-way: worth sending again
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"data plane: {e}") from None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, err: grpc.RpcError) -> Exception:
        """The exception for a failed call: :class:`TLSError` for a certificate problem (no retry
        can fix it), else :class:`Refused`."""
        r = _refused(err)
        if r.code != grpc.StatusCode.UNAVAILABLE:
            self._reached = True
            return r
        why = None
        if _certificate_failure(r.details):
            why = _ssl_reason(r.details)
        elif not self._reached:
            why = probe_tls(self.server, self._ca, self._cert, self._key, self._server_name)
            if why == _DROPPED:  # confirm: not a server that happened to be stopping just then
                time.sleep(0.2)
                why = probe_tls(self.server, self._ca, self._cert, self._key, self._server_name)
        if why is None:
            return r
        return TLSError(
            f"TLS handshake with {self.server} failed: "
            f"{_explain(why, has_ca=self._ca is not None, has_cert=self._cert is not None)} [{why}]"
        )

    def check_in(self, num_examples: int = 0) -> CheckIn:
        request = pb.CheckInRequest(num_examples=num_examples, sdk_version=wire.SDK_VERSION)
        r = self._GRPC  # the first check-in (no data port known yet) is gRPC's
        if self._data_check_ins:
            try:
                r = self._via_data(lambda d: d.check_in(request))
            except Refused as e:
                # a data plane that does not know check-ins (a server older than this SDK) answers
                # "not a valid DataRequest": check in over gRPC from now on (the bytes still go there)
                if e.reason != "invalid" or e.code not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNIMPLEMENTED,
                ):
                    raise
                log.info("the data plane does not take check-ins (%s); checking in over gRPC", e.details)
                self._data_check_ins = False
        if r is self._GRPC:
            try:
                r = self._check_in(request, metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as e:
                raise self._error(e) from None
        self._reached = True
        if r.data_port != self.data_port:  # a new port (a restarted server): worth trying at once
            self.data_port, self._data_off_until = r.data_port, 0.0
        action = {pb.CheckInReply.WAIT: "wait", pb.CheckInReply.TRAIN: "train", pb.CheckInReply.DONE: "done"}[r.action]
        a = None
        if action == "train":
            x = r.assignment
            self._sealed_offers.clear()
            self._sealed_upload_offers.clear()
            if x.HasField("sealed_download"):
                from flotilla.network.sealed_downloads import usable

                if usable(x.sealed_download):
                    self._sealed_offers[x.version] = x.sealed_download
            if x.HasField("sealed_upload"):
                from flotilla.network import sealed_uploads

                if sealed_uploads.usable(x.sealed_upload):
                    self._sealed_upload_offers[x.ticket] = x.sealed_upload
            spec = json.loads(x.client_json)
            dp_sgd = spec.pop("dp_sgd", None)
            algorithm = spec.pop("algorithm", None)
            channels = spec.pop("channels", None)
            aggregator = spec.pop("aggregator", None)
            aggregator_data_port = int(spec.pop("aggregator_data_port", 0) or 0)
            if dp_sgd is not None:
                from flotilla.privacy.sample import SampleLevelSpec

                dp_sgd = SampleLevelSpec(**dp_sgd)
            a = Assignment(
                x.assignment_id,
                x.ticket,
                x.version,
                x.round,
                x.seed,
                _client_spec(spec),
                x.numel,
                x.expires_in_s,
                r.device_id,
                bytes(x.buffer_key),
                bytes(x.buffer_nonce),
                x.seal_weight,
                x.clip_norm,
                r.message == "secagg",
                dp_sgd,
                algorithm,
                channels,
                aggregator,
                aggregator_data_port,
            )
        return CheckIn(action, a, r.retry_after_s, json.loads(r.task_json or "{}"), r.device_id, r.message)

    def download(self, version: int, out: torch.Tensor | None = None, codec=None) -> torch.Tensor:
        """The model at ``version`` as a flat float32 vector (written into ``out`` if given); ``codec``: the
        assignment's download channel (flotilla.channels), whose encoding the chunks carry."""
        if codec is not None and not codec.lossless:
            return self._download_encoded(version, out, codec)

        def into(total: int) -> memoryview:
            nonlocal out
            if total % 4:
                raise Refused(grpc.StatusCode.DATA_LOSS, f"model of {total} bytes is not float32")
            if out is None:
                out = torch.empty(total // 4, dtype=torch.float32)
            if out.numel() * 4 != total:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the server's model has {total // 4} parameters, this device's has {out.numel()}",
                )
            return memoryview(out.numpy()).cast("B")

        self._fetch(version, into)
        return out

    def _download_encoded(self, version: int, out: torch.Tensor | None, codec) -> torch.Tensor:
        buf = bytearray(codec.message_bytes)

        def into(total: int) -> memoryview:
            if total != len(buf):
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the server's model is {total} bytes, this device's channel decodes {len(buf)}",
                )
            return memoryview(buf)

        self._fetch(version, into)
        weights = codec.decode(buf)
        return weights if out is None else out.copy_(weights)

    def _sealed_port_off(self, port: int) -> bool:
        """Whether ``port`` could not be reached lately: not tried for a minute, for downloads and
        uploads alike (another port, e.g. a restarted server's, is tried at once)."""
        off_port, off_until = self._sealed_off
        return port == off_port and time.monotonic() < off_until

    def _sealed_socket(self, port: int, what: str):
        """A plain connection to the sealed port, or None (then it is off for a minute)."""
        try:
            return socket.create_connection((self.host, port), timeout=min(self.timeout_s, 10.0))
        except OSError as e:
            log.warning("sealed port %d unreachable (%s); %s over TLS for a minute", port, e, what)
            self._sealed_off = (port, time.monotonic() + 60.0)
            return None

    def _fetch_sealed(self, offer, version: int, into) -> bool:
        """Whether ``offer`` (a pb.SealedDownload) delivered ``version`` into ``into``, tags and
        digest checked."""
        from flotilla.network.sealed_downloads import SealedDownloadError, receive

        sock = self._sealed_socket(offer.port, "downloading")
        if sock is None:
            self.sealed_downloads["failed"] += 1
            return False
        try:
            with sock:
                sock.settimeout(self.timeout_s)
                receive(sock, offer, version, into)
        except (OSError, SealedDownloadError) as e:
            log.warning("sealed download of version %d failed (%s); downloading over TLS", version, e)
            self.sealed_downloads["failed"] += 1
            return False
        self.sealed_downloads["fetched"] += 1
        return True

    def _send_sealed(self, offer, header, data):
        """The server's UploadReply to a sealed upload (flotilla.network.sealed_uploads), or None
        when anything short of that reply failed: the caller then uploads over TLS, which the
        server answers as a retry if this one got in.  A refusal of the upload itself is final."""
        from flotilla.network import sealed_uploads
        from flotilla.network.dataplane_client import DataRefusal

        if self._sealed_port_off(offer.port):
            return None
        sock = self._sealed_socket(offer.port, "uploading")
        if sock is None:
            self.sealed_uploads["failed"] += 1
            return None
        try:
            with sock:
                sock.settimeout(self.timeout_s)
                reply = sealed_uploads.upload(sock, offer, self._token, header, data)
        except DataRefusal as e:
            raise _data_refused(e.reply) from None
        except OSError as e:  # a refused ticket, a cut, a record failing its tag
            log.warning("sealed upload failed (%s); uploading over TLS", e)
            self.sealed_uploads["failed"] += 1
            return None
        self.sealed_uploads["sent"] += 1
        return reply

    def _fetch(self, version: int, into) -> None:
        """``version``'s download bytes into ``into(total_bytes) -> writable memoryview`` (called once
        the size is known; it may refuse the size): through the data plane when the server named
        one, else gRPC's chunk stream, checked chunk by chunk.  A sealed-download offer for
        ``version`` (from the last check-in) is tried first, once; on any failure the TLS paths."""
        offer = self._sealed_offers.pop(version, None)
        if offer is not None and not self._sealed_port_off(offer.port) and self._fetch_sealed(offer, version, into):
            return
        if self._via_data(lambda d: d.download(version, into)) is not self._GRPC:
            return
        view, received = None, 0
        try:
            for chunk in self._download(
                pb.DownloadRequest(version=version), metadata=self.metadata, timeout=self.timeout_s
            ):
                if view is None:
                    view = into(chunk.total_bytes)
                n = len(chunk.data)
                if chunk.offset != received or received + n > len(view):
                    raise Refused(grpc.StatusCode.DATA_LOSS, f"model chunk at offset {chunk.offset} out of order")
                view[received : received + n] = chunk.data
                received += n
        except grpc.RpcError as e:
            raise self._error(e) from None
        if view is None or received != len(view):
            raise Refused(grpc.StatusCode.DATA_LOSS, f"model download ended after {received} bytes")

    def upload(
        self,
        assignment: Assignment,
        delta: torch.Tensor,
        num_examples: int,
        train_loss: float = 0.0,
        examples_seen: int = 0,
        steps: int = 0,
    ) -> tuple[int, int]:
        """Send ``delta`` (trained from ``assignment.version``); returns ``(ledger seq, server version)``.

        When the assignment carries a secure buffer key, the delta is sealed to it
        (:func:`flotilla.secure.seal_update`) and only the ciphertext leaves the device.  When it says
        ``secagg`` (sync secure aggregation), the delta enters the masking protocol
        (:func:`flotilla.network.secagg.run_device`) and only a masked vector leaves the device;
        returns ``(-1, version after the round)``."""
        self.rest_s = 0.0
        if assignment.secagg:
            return -1, self.secagg_round(assignment, delta, num_examples, train_loss, examples_seen)
        if assignment.buffer_key:
            from flotilla.secure.buffer import Assignment as BufferAssignment
            from flotilla.secure.buffer import seal_update

            weight = assignment.seal_weight or float(num_examples)
            if assignment.clip_norm > 0:  # as SecureFedBuff's clients: just under S, so float rounding stays <= S
                norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
                if norm > assignment.clip_norm:
                    delta = delta * (assignment.clip_norm * (1 - 1e-6) / norm)
            sealed = seal_update(
                delta,
                weight,
                BufferAssignment(assignment.device, assignment.version, assignment.buffer_nonce, assignment.buffer_key),
            )
            return self.upload_raw(
                assignment.ticket,
                assignment.version,
                "sealed",
                [int(delta.numel())],
                sealed.ciphertext,
                num_examples,
                train_loss,
                examples_seen,
                steps,
                ephemeral_pk=sealed.ephemeral_pk,
            )
        data = delta.detach().contiguous().numpy()
        return self.upload_raw(
            assignment.ticket,
            assignment.version,
            str(data.dtype),
            list(delta.shape),
            data,
            num_examples,
            train_loss,
            examples_seen,
            steps,
        )

    def upload_raw(
        self,
        ticket: str,
        base_version: int,
        dtype: str,
        shape: list[int],
        data,
        num_examples: int,
        train_loss: float = 0.0,
        examples_seen: int = 0,
        steps: int = 0,
        chunk_bytes: int | None = None,
        ephemeral_pk: bytes = b"",
    ) -> tuple[int, int]:
        """Send any header and bytes (the protocol as is, for tests and other SDKs): through the data
        plane if the server named one, unless ``chunk_bytes`` asks for gRPC's chunked stream."""
        header = pb.UploadHeader(
            ticket=ticket,
            base_version=base_version,
            dtype=dtype,
            shape=shape,
            num_examples=num_examples,
            train_loss=train_loss,
            examples_seen=examples_seen,
            steps=steps,
            ephemeral_pk=ephemeral_pk,
        )
        r = None
        offer = self._sealed_upload_offers.pop(ticket, None)
        if offer is not None and chunk_bytes is None and self._data_client() is not None:
            r = self._send_sealed(offer, header, data)
        if r is None:
            r = self._GRPC if chunk_bytes is not None else self._via_data(lambda d: d.upload(header, data))
        if r is self._GRPC:  # no data plane, or gRPC's own chunking asked for: the gRPC stream

            def parts():
                yield pb.UploadPart(header=header)
                for part in wire.chunks(data, chunk_bytes or self.chunk_bytes):
                    yield pb.UploadPart(data=bytes(part))

            try:
                r = self._upload(parts(), metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as e:
                raise self._error(e) from None
        # a server's hint, bounded: a NaN, a negative or an hour-long rest would stall the device
        self.rest_s = min(r.rest_s, MAX_REST_S) if r.rest_s > 0 else 0.0
        return r.seq, r.version

    def secagg_call(self, request: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        """One SecAggStep request: a SecAggBody, its JSON and raw bytes (flotilla.network.secagg)."""
        from flotilla.network.secagg import encode_body

        return self.secagg_send(encode_body(request, data))

    def secagg_send(self, body: bytes) -> dict[str, Any]:
        """One SecAggStep request already encoded (a SecAggBody); the reply's JSON as a dict."""
        from flotilla.network.secagg import decode_reply

        try:
            return decode_reply(self._secagg(body, metadata=self.metadata, timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise self._error(e) from None

    def secagg_round(
        self,
        assignment: Assignment,
        delta: torch.Tensor,
        num_examples: int,
        train_loss: float = 0.0,
        examples_seen: int = 0,
        stop_after: str | None = None,
    ) -> int:
        """This device's part of a sync secure round; the server's version afterwards.  An aborted
        round raises Refused(ABORTED)."""
        from flotilla.network.secagg import RoundAborted, run_device

        try:
            return run_device(
                self.secagg_call,
                assignment.ticket,
                delta,
                float(num_examples),
                num_examples,
                train_loss,
                examples_seen,
                stop_after=stop_after,
                send_body=self.secagg_send,
            )
        except RoundAborted as e:
            raise Refused(grpc.StatusCode.ABORTED, str(e)) from None

    def status(self) -> dict[str, Any]:
        try:
            out = json.loads(self._status(pb.StatusRequest(), metadata=self.metadata, timeout=self.timeout_s).json)
        except grpc.RpcError as e:
            raise self._error(e) from None
        self._reached = True
        return out


def as_device_data(data, client: int = 0) -> tuple[FederatedDataset, int]:
    """A device's own data as ``(FederatedDataset, client index)``.

    Accepts ``(x, y)`` tensors, a torch ``Dataset`` of ``(x, y)`` items, or a FederatedDataset
    (``client`` picks which of its clients this device is)."""
    if isinstance(data, FederatedDataset):
        if not 0 <= client < data.num_clients:
            raise ValueError(f"client: {client} is not a client of {data.name} (0..{data.num_clients - 1})")
        return data, client
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: x has {len(x)} examples but y has {len(y)}")
        return FederatedDataset("device", lambda idx: (x[idx], y[idx]), [torch.arange(len(x))]), 0
    if isinstance(data, torch.utils.data.Dataset):
        return from_torch_datasets({"device": data}), 0
    raise TypeError(f"data: expected (x, y) tensors, a torch Dataset or a FederatedDataset, got {type(data).__name__}")


def save_device_data(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write one device's data as the safetensors file ``flotilla join --data`` reads (keys x, y)."""
    from safetensors.torch import save_file

    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(path))


def load_device_data(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data: {p} not found")
    try:
        t = load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"--data: {p} is not a safetensors file ({e})") from None
    missing = {"x", "y"} - set(t)
    if missing:
        raise ValueError(f"--data: {p} lacks tensor(s) {sorted(missing)} (expected keys 'x' and 'y')")
    return t["x"], t["y"]


def export_clients(dataset: FederatedDataset, out_dir: str | Path, clients: list[int] | None = None) -> list[Path]:
    """Write each client's training data to ``out_dir/client<i>.safetensors`` (for test deployments)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in clients if clients is not None else range(dataset.num_clients):
        x, y = dataset.fetch(dataset.train_indices[c])
        p = out / f"client{c}.safetensors"
        save_device_data(p, x, y)
        paths.append(p)
    return paths


@dataclass
class Backoff:
    """Exponential backoff with jitter, reset after a success.  ``max_s`` stays below the
    server's ``linger_s`` (10 s by default), so a device in back-off when training ends still
    checks in while the server says DONE."""

    initial_s: float = 0.2
    max_s: float = 5.0
    give_up_after_s: float = 300.0
    _attempt: int = 0
    _since: float | None = None

    def reset(self) -> None:
        self._attempt = 0
        self._since = None

    def wait(self, error: Exception) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since > self.give_up_after_s:
            raise ConnectionError(
                f"no usable answer from the server for {now - self._since:.0f} s, giving up: {error}"
            ) from error
        delay = min(self.max_s, self.initial_s * 2**self._attempt) * random.uniform(0.5, 1.0)
        hint = getattr(error, "retry_after_s", None)  # the server's own "come back in" (rate limits)
        if hint is not None:
            delay = max(delay, min(hint, self.max_s) * random.uniform(1.0, 1.2))
        self._attempt += 1
        time.sleep(delay)


@dataclass
class DeviceReport:
    accepted: list[dict[str, Any]] = field(default_factory=list)  # {seq, version, assignment}
    refused: list[str] = field(default_factory=list)
    gave_up: list[dict[str, Any]] = field(default_factory=list)  # {assignment, version, why}
    reconnects: int = 0
    tasks: int = 0
    epsilon: float | None = None  # sample-level DP: this device's epsilon over all its DP-SGD steps


def check_device_data(
    model: nn.Module, loss_fn: LossFn, dataset: FederatedDataset, client: int = 0, probe: int = 32
) -> None:
    """Refuse data ``model`` cannot train on, before the device takes any work: non-finite
    inputs, inputs the model cannot run (one forward pass and loss on the first ``probe``
    examples), and with cross-entropy, labels outside the model's classes (all of them).
    Raises ValueError with one line that says what is wrong."""
    x, y = dataset.fetch(dataset.train_indices[client])
    shapes = f"x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}, y {tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}"
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"data: x holds non-finite values (NaN or inf) ({shapes})")

    def attempt(fn):  # whatever the model or the loss raises on the wrong input, as one line
        try:
            with torch.no_grad():
                return fn()
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"data: the model cannot train on this device's data ({shapes}): "
                f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}"
            ) from None

    was_training = model.training
    model.eval()  # no dropout, no batch-norm statistics updated by the check
    try:
        out = attempt(lambda: model(x[:probe]))
        if loss_fn is F.cross_entropy and not y.is_floating_point() and out.dim() >= 2 and len(y):
            classes, lo, hi = out.shape[1], int(y.min()), int(y.max())
            if lo < 0 or hi >= classes:
                raise ValueError(
                    f"data: labels y range over {lo}..{hi}, but the model has {classes} classes "
                    f"(labels 0..{classes - 1})"
                )
        loss = attempt(lambda: loss_fn(out, y[:probe]))
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(loss).all()):
        raise ValueError(f"data: the loss on this device's data is not finite ({shapes})")


class Device:
    """A device: trains ``model`` on its own ``data`` whenever the server assigns it work.

    ``model`` is a module, or a function ``task -> module`` called with the server's task config
    (``flotilla join`` passes :func:`model_for_task`).  Before the first check-in the device asks
    the server's status for the task, builds the model and checks its data against it
    (:func:`check_device_data`), so bad data never holds an assignment.  An assignment whose update
    cannot be accepted (non-finite values, or an upload the server refuses as invalid, such as a
    norm above its bound) is given up and never retrained; after ``max_give_ups`` in a row the
    device stops with :class:`GaveUp` (None: never)."""

    def __init__(
        self,
        server: str,
        token: str,
        model: nn.Module | Callable[[dict[str, Any]], nn.Module],
        data,
        loss_fn: LossFn = F.cross_entropy,
        *,
        client: int = 0,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        compression: str | None = None,
        backoff: Backoff | None = None,
        max_tasks: int | None = None,
        max_give_ups: int | None = 3,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = resolve_device(device)  # where this device trains (flotilla join --device)
        self.dataset, self.client = as_device_data(data, client)
        self.num_examples = self.dataset.num_train(self.client)
        if self.num_examples == 0:
            raise ValueError("data: this device has no training examples")
        self._model = model
        self.flat: FlatModel | None = None
        self.loss_fn = loss_fn
        self._trainer: LocalTrainer | None = None
        self._trainer_key: tuple | None = None
        # SCAFFOLD: this device's c_i (in memory; a device that restarts starts again from c_i = 0,
        # SCAFFOLD's own initialisation) and the server's c of the assignment's version
        self.variates = None
        self._dp_compatible = False
        self._data_checked = False
        self.dp_steps: dict[tuple, int] = {}  # (noise multiplier, sample rate, delta, accountant) -> DP-SGD steps
        self.conn = Connection(
            server, token, ca=ca, cert=cert, key=key, server_name=server_name, compression=compression
        )
        self._conn_args = (token, dict(ca=ca, cert=cert, key=key, server_name=server_name, compression=compression))
        self._aggregators: dict[str, Connection] = {}  # scale-out: a connection per aggregator address
        self.backoff = backoff or Backoff()
        self.max_tasks = max_tasks
        self.max_give_ups = max_give_ups
        self.on_event = on_event or (lambda kind, info: None)
        self.step_limit: int | None = None  # the server's last version, from its status
        self._given_up: dict[tuple, str] = {}  # (version, seed) or ("id", assignment) -> why
        self._channels = None  # (the assignment's channels settings, their codecs)
        self.residual: torch.Tensor | None = None  # error feedback: what compression dropped so far
        self._give_ups_in_a_row = 0

    def _module(self, task: dict[str, Any]) -> nn.Module:
        if not isinstance(self._model, nn.Module):
            self._model = self._model(task)
        return self._model

    def check_data(self, task: dict[str, Any] | None = None) -> None:
        """Check the local data against the model (built for ``task`` if the model is a function)."""
        if not self._data_checked:
            check_device_data(self._module(task or {}), self.loss_fn, self.dataset, self.client)
            self._data_checked = True

    def _prepare(self, task: dict[str, Any], dp_sgd) -> None:
        if self.flat is not None:
            if (dp_sgd is not None) != self._dp_compatible:
                raise ValueError("the server switched sample-level DP on or off mid-run; restart the device")
            return
        model = self._module(task)
        self._dp_compatible = dp_sgd is not None
        if dp_sgd is not None:  # as the server did: recurrent layers become Opacus' (parameter order changes)
            from flotilla.privacy.sample import make_dp_compatible

            make_dp_compatible(model)
        self.flat = FlatModel(model, self.device)
        self.start = torch.empty(self.flat.numel)
        self.delta = torch.empty(self.flat.numel)

    def _trainer_for(self, spec: ClientSpec, dp_sgd, algorithm: dict[str, Any] | None = None) -> LocalTrainer:
        key = (json.dumps(algorithm, sort_keys=True) if algorithm is not None else None,)
        if (
            self._trainer is None
            or self._trainer.spec != spec
            or getattr(self._trainer, "dp", None) != dp_sgd
            or self._trainer_key != key
        ):
            if hasattr(self._trainer, "close"):
                self._trainer.close()
            if algorithm is not None:
                if dp_sgd is not None:
                    raise ValueError(
                        f"the server asks for client.algorithm {algorithm.get('name')!r} and DP-SGD at "
                        "once; they do not compose"
                    )
                self._trainer = self._algorithm_trainer(spec, algorithm)
            elif dp_sgd is None:
                self._trainer = LocalTrainer(self.flat, self.loss_fn, spec)
            else:
                from flotilla.privacy.sample import DPLocalTrainer

                self._trainer = DPLocalTrainer(self.flat, self.loss_fn, spec, dp_sgd)
            self._trainer_key = key
        return self._trainer

    def _algorithm_trainer(self, spec: ClientSpec, algorithm: dict[str, Any]) -> LocalTrainer:
        """The client update of the server's ``client.algorithm``: the simulator's own trainers."""
        from flotilla.algorithms.registry import as_config

        try:
            cfg = as_config(algorithm)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError or the registry's ValueError
            raise ValueError(
                f"the server's client.algorithm {algorithm!r} is not one this SDK can run: {str(e).splitlines()[0]}"
            ) from None
        if self.device.type != "cpu" and (cfg.name == "scaffold" or (cfg.name == "fedprox" and cfg.mu > 0)):
            raise ValueError(
                f"device: the server's client.algorithm {cfg.name} trains on the CPU only for now; join with --device cpu"
            )
        if cfg.name == "fedprox" and cfg.mu > 0:
            from flotilla.algorithms.fedprox import FedProxTrainer

            return FedProxTrainer(self.flat, self.loss_fn, spec, float(cfg.mu))
        if cfg.name == "scaffold":
            from flotilla.algorithms.scaffold import ScaffoldTrainer

            return ScaffoldTrainer(self.flat, self.loss_fn, spec, self._variates())
        return LocalTrainer(self.flat, self.loss_fn, spec)  # fedavg, or fedprox with mu = 0 (FedAvg exactly)

    def _variates(self):
        if self.variates is None:
            from flotilla.algorithms.scaffold import ControlVariates
            from flotilla.algorithms.store import MemoryStore

            self.variates = ControlVariates(self.flat.numel, 1, MemoryStore(self.flat.numel))
            self._download_buf = torch.empty(2 * self.flat.numel)  # weights, then the server's c
        return self.variates

    def _train(self, a: Assignment):
        """Local training for assignment ``a`` (into ``self.delta``).  With DP-SGD the batch sampling
        and noise are seeded on the device, never from the server's seed (the server must not be
        able to replay the noise), and the device accounts its own epsilon over every DP-SGD step."""
        trainer = self._trainer_for(a.client, a.dp_sgd, a.algorithm)
        if a.dp_sgd is None:
            return trainer.train(self.dataset, self.client, self.start, a.seed, self.delta)
        r = trainer.train(self.dataset, self.client, self.start, secrets.randbits(62), self.delta)
        trainer.results.clear()
        key = (a.dp_sgd.noise_multiplier, r.sample_rate, a.dp_sgd.delta, a.dp_sgd.accountant)
        self.dp_steps[key] = self.dp_steps.get(key, 0) + r.steps
        return r

    def epsilon(self) -> float | None:
        """This device's sample-level epsilon over all its DP-SGD steps so far (None without DP-SGD).
        Steps under different settings compose; the reported delta is the largest of them."""
        if not self.dp_steps:
            return None
        from flotilla.privacy.accountant import epsilon_of_history

        delta = max(k[2] for k in self.dp_steps)
        kinds = {k[3] for k in self.dp_steps}
        return epsilon_of_history(
            [(z, q, t) for (z, q, _, _), t in self.dp_steps.items()], delta, kinds.pop() if len(kinds) == 1 else "rdp"
        )

    def _retry(self, report: DeviceReport, fn, *args):
        while True:
            try:
                out = fn(*args)
                self.backoff.reset()
                return out
            except Refused as e:
                if not e.retryable:
                    raise
                report.reconnects += 1
                self.on_event("reconnect", {"error": e.details, "code": e.code.name})
                log.info("server busy or unreachable (%s); retrying with backoff", e.code.name)
                self.backoff.wait(e)

    # -- assignments the device cannot satisfy -------------------------------------------------
    @staticmethod
    def _keys(a: Assignment) -> list[tuple]:
        # Without DP-SGD, training is a function of (version, seed, settings): a new ticket for the
        # same ones (sync: re-issued after expiry) would give the same refused delta.
        keys = [("id", a.id)]
        if a.dp_sgd is None:
            keys.append((a.version, a.seed, json.dumps(asdict(a.client), sort_keys=True, default=str)))
        return keys

    def _known_bad(self, a: Assignment) -> str | None:
        return next((self._given_up[k] for k in self._keys(a) if k in self._given_up), None)

    def _give_up(self, report: DeviceReport, a: Assignment, why: str) -> None:
        """Drop assignment ``a`` for good (``why``: one line), and stop after too many in a row."""
        for k in self._keys(a):
            self._given_up[k] = why
        self._give_ups_in_a_row += 1
        info = {"assignment": a.id, "version": a.version, "why": why}
        report.gave_up.append(info)
        self.on_event("gave_up", info)
        log.warning("gave up assignment %s: %s", a.id[:8], why)
        if self.max_give_ups is not None and self._give_ups_in_a_row >= self.max_give_ups:
            raise GaveUp(f"gave up {self._give_ups_in_a_row} assignments in a row; the last because {why}", report)

    def _wait(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.05) * random.uniform(0.5, 1.5))

    def _finished(self, report: DeviceReport, message: str) -> DeviceReport:
        self.on_event("done", {"message": message})
        return report

    def run(self) -> DeviceReport:
        """Work until the server says training is done (or ``max_tasks`` uploads were made)."""
        report = DeviceReport()
        try:
            # First contact: the server's task and last version.  A certificate problem ends here
            # (TLSError), and data the model cannot train on fails before any work is taken.
            status = self._retry(report, self.conn.status)
            self.step_limit = status.get("step_limit")
            if "task" in status or isinstance(self._model, nn.Module):
                self.check_data(status.get("task"))
            while self.max_tasks is None or report.tasks < self.max_tasks:
                ci = self._retry(report, self.conn.check_in, self.num_examples)
                if ci.action == "done":
                    return self._finished(report, ci.message)
                if ci.action == "wait":
                    self._wait(ci.retry_after_s)
                    continue
                a = ci.assignment
                if not self._data_checked:  # a server whose status does not name its task
                    self.check_data(ci.task)
                why = self._known_bad(a)
                if why is not None:
                    if ("id", a.id) not in self._given_up:  # a new ticket for the same refused training
                        self._give_up(report, a, why)
                    # sync: the server hands this device its live assignment until it expires or the
                    # round closes; wait for that rather than retrain it
                    self._wait(min(2.0, max(a.expires_in_s, 0.1)))
                    continue
                self._prepare(ci.task, a.dp_sgd)
                if a.numel != self.flat.numel:
                    raise ValueError(
                        f"the server's model has {a.numel} parameters, this device's model has {self.flat.numel}"
                    )
                if a.scaffold:
                    self._trainer_for(a.client, a.dp_sgd, a.algorithm)  # c_i lives on across assignments
                try:
                    self._retry(
                        report,
                        self.uploader(a).download,
                        a.version,
                        self._download_buf if a.scaffold else self.start,
                        self._codecs(a).down if a.channels else None,
                    )
                except Refused as e:  # e.g. the version moved on between check-in and download
                    report.refused.append(str(e))
                    continue
                payload = self.delta
                if a.scaffold:  # the download is the weights, then the server's c of that version
                    self.start.copy_(self._download_buf[: self.flat.numel])
                    self.variates.c.copy_(self._download_buf[self.flat.numel :])
                r = self._train(a)
                report.tasks += 1
                report.epsilon = self.epsilon()
                if a.scaffold:  # the upload: the delta, then delta c_i (zero if no step was taken)
                    dc = self.variates.held_delta(self.client)
                    payload = torch.stack([self.delta, dc if dc is not None else torch.zeros_like(self.delta)])
                if not math.isfinite(r.loss) or not bool(torch.isfinite(payload).all()):
                    self._give_up(
                        report,
                        a,
                        "training diverged: the update has non-finite values "
                        f"(train loss {r.loss:.4g}); a smaller client.lr may help",
                    )
                    continue
                if a.channels:  # compressed (clipped first with user-level DP); the residual stays here
                    payload, _, residual = self._codecs(a).upload(self.delta, a.seed, self.residual)
                    if residual is not None:
                        self.residual = residual
                try:
                    seq, version = self._upload_once(report, a, r, payload)
                except Refused as e:
                    if e.training_finished:
                        return self._finished(report, e.details)
                    report.refused.append(str(e))
                    self.on_event("refused", {"assignment": a.id, "error": str(e)})
                    if e.unsatisfiable:
                        self._give_up(report, a, e.details)  # the same delta would be refused again
                    continue
                self._give_ups_in_a_row = 0
                if a.scaffold:  # accepted: c_i+ becomes this device's c_i (as the server added its delta c_i)
                    self.variates.keep(self.client)
                info = {"seq": seq, "version": version, "assignment": a.id, "base_version": a.version}
                if report.epsilon is not None:
                    info["epsilon"] = report.epsilon
                report.accepted.append(info)
                self.on_event("accepted", info)
                if self.step_limit is not None and version >= self.step_limit:
                    # this update made the last step: nothing more to do, even if the server
                    # stops before this device could check in again
                    return self._finished(report, f"training finished at version {version}")
                rest = self.uploader(a).rest_s
                if rest > 0 and (self.max_tasks is None or report.tasks < self.max_tasks):
                    # no work for this device before then: a check-in sooner would only be told WAIT
                    time.sleep(rest * random.uniform(1.0, 1.2))
        finally:
            self.conn.close()
            for c in self._aggregators.values():
                c.close()
            if hasattr(self._trainer, "close"):  # DP-SGD: Opacus' hooks come off the user's model
                self._trainer.close()
                self._trainer = None
        return report

    def _codecs(self, a: Assignment):
        """The codecs of the assignment's channels (rebuilt only when the server's settings change)."""
        if self._channels is None or self._channels[0] != a.channels:
            from flotilla.channels.wire import device_channels

            self._channels = (a.channels, device_channels(a.channels, self.flat.shapes))
        return self._channels[1]

    def uploader(self, a: Assignment) -> Connection:
        """Where ``a``'s model comes from and its update goes: the server, or (scale-out) the
        aggregator the assignment names."""
        if not a.aggregator:
            return self.conn
        if a.aggregator not in self._aggregators:
            self._aggregators[a.aggregator] = Connection(a.aggregator, self._conn_args[0], **self._conn_args[1])
        conn = self._aggregators[a.aggregator]
        if conn.data_port != a.aggregator_data_port:  # its data plane (the assignment names it; 0: gRPC)
            # a new port (a restarted aggregator): worth trying at once, as Connection.check_in does
            conn.data_port, conn._data_off_until = a.aggregator_data_port, 0.0
        return conn

    def _upload_once(
        self, report: DeviceReport, a: Assignment, r, payload: torch.Tensor | bytes | None = None
    ) -> tuple[int, int]:
        retried = False
        conn = self.uploader(a)
        while True:
            try:
                if isinstance(payload, bytes):  # compressed by the assignment's channels
                    from flotilla.channels.wire import CHANNEL_DTYPE

                    out = conn.upload_raw(
                        a.ticket,
                        a.version,
                        CHANNEL_DTYPE,
                        [a.numel],
                        payload,
                        r.num_examples,
                        r.loss,
                        r.examples_seen,
                        r.steps,
                    )
                else:
                    out = conn.upload(
                        a,
                        self.delta if payload is None else payload,
                        r.num_examples,
                        r.loss,
                        r.examples_seen,
                        r.steps,
                    )
                self.backoff.reset()
                return out
            except Refused as e:
                if e.retryable:
                    retried = True
                    report.reconnects += 1
                    self.on_event("reconnect", {"error": e.details, "code": e.code.name})
                    self.backoff.wait(e)
                    continue
                if retried and e.code == grpc.StatusCode.ALREADY_EXISTS:
                    # The first attempt did land before the connection broke: it counts once.
                    return -1, -1
                raise


def model_for_task(task: dict[str, Any]) -> nn.Module:
    """The model of a registered task's config (what the server sends at check-in); flotilla.tasks."""
    from flotilla.tasks import model_for_task as registered_model

    return registered_model(task)
