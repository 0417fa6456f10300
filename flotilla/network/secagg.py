"""Synchronous secure aggregation over the network: the 4-round protocol of flotilla.secure.protocol
between devices, relayed by the server, for ``mode: sync`` with ``secure_aggregation``.

Transport: one unary RPC ``SecAggStep`` whose request and reply are a ``SecAggBody`` protobuf
(flotilla.proto): its ``json`` field is the request or reply as JSON, protocol messages inside
encoded by :mod:`flotilla.secure.serialize` (strict, no pickle), and its ``data`` field carries the
masked input's vector as raw little-endian bytes, ``bits`` bits per element packed.
Earlier SDKs sent the bare JSON with the vector as base64 inside it (1.33x the bytes, and text for
the server to scan and decode): the server still accepts that body, told apart by its first byte
``{``, and answers it in kind (:func:`decode_body`, :func:`encode_reply`).  A device that
holds a sync assignment (its check-in reply says ``secagg``) trains, then, instead of uploading its
delta:

    join      {ticket, num_examples, train_loss, examples_seen} -> its protocol id and the round's public
              parameters (SecAggConfig fields, clip, max_weight)
    advertise AdvertiseKeys;   get directory -> KeyDirectory
    shares    ShareKeys;       get bundle    -> ShareBundle
    masked    MaskedInput;     get request   -> UnmaskRequest
    unmask    UnmaskResponse;  get result    -> the new model version

A request larger than the server's ``max_request_bytes`` (the masked input of a large model: 4
bytes per parameter in a 32-bit ring) travels as ``part`` requests ``{ticket, index, count}`` whose
``data`` are consecutive slices of the request's serialized SecAggBody (earlier SDKs: of its JSON
text, in the JSON's ``data``); the server reassembles them (:class:`RequestParts`) and answers the
last part as it would the whole request.

``get`` answers ``wait`` until the server closes the stage: when every device still in the protocol
has answered, or ``secagg_stage_s`` after the stage opened (those that did not answer dropped out
at that stage).  Advertising closes at ``cohort`` devices or at the stage deadline (counted from the
first join).  Fewer than the threshold at any stage aborts the round
(``abort``): no step, the model is unchanged, and a new selection starts for the same round.

The device encodes ``(w / max_weight) * clip(delta)`` and the weight itself in Z_{2^bits}
(:class:`~flotilla.secure.encoding.FixedPointEncoder`, as :class:`~flotilla.secure.aggregator.SecureAggregator`;
with ``channels.upload: quantize``, ``quantize_bits`` on the clip's grid into the narrow ring of
:class:`~flotilla.secure.encoding.QuantizedEncoder`, flotilla/channels/ring.py);
the server only ever holds the running sum of masked vectors, and after unmasking the weighted
mean, which it applies with the ServerOptimizer as a plaintext round would.

The server's side is :class:`SecAggRelay` (one per coordinator): it answers SecAggStep requests,
closes stages at their deadlines, aborts a round below the threshold (no step; a new selection)
and hands the unmasked mean to the coordinator's step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError

from flotilla.network import flotilla_pb2 as pb
from flotilla.network.refusals import Refused
from flotilla.network.tickets import Answer, Ticket
from flotilla.secure.aggregator import encode_input
from flotilla.secure.encoding import FixedPointEncoder, QuantizedEncoder
from flotilla.secure.errors import ProtocolError, ReplayedMessage, SecAggAborted, TamperedMessage
from flotilla.secure.messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from flotilla.secure.protocol import SecAggClient, SecAggConfig, SecAggServer
from flotilla.secure.serialize import dumps, dumps_raw, loads

SECAGG_FLAG = "secagg"  # CheckInReply.message of a TRAIN reply: run the masking protocol, do not upload


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of sync masking in ``flotilla serve`` (from the config's secure_aggregation)."""

    clip: float = 1.0
    max_weight: float = 1.0
    bits: int = 32
    degree: int | str | None = "auto"  # None: complete graph; "auto": SecAgg+ ~4 log2 n; or k
    threshold: int | None = None
    max_request_bytes: int = 4 * 2**20 - 1024  # larger requests travel in parts (below the gRPC message limit)
    quantize_bits: int | None = None  # channels.upload quantize: b bits on the clip's grid, in the narrow ring
    stochastic: bool = True  # with quantize_bits: stochastic rounding

    def __post_init__(self):
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secure_aggregation.clip: must be positive, got {self.clip}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"secure_aggregation.max_weight: must be positive, got {self.max_weight}")
        if self.max_request_bytes < 1:
            raise ValueError(f"network.max_message_mb: leaves no room for a request ({self.max_request_bytes} B)")
        if self.quantize_bits is not None:
            QuantizedEncoder(self.clip, 1, self.quantize_bits)  # checks the bits
            if self.bits != 32:
                raise ValueError(
                    "secure_aggregation.bits: sets the fixed-point ring; with channels.upload quantize the "
                    "ring is bits + ceil(log2 slots) wide; leave it unset"
                )

    def encoder(self, slots: int) -> FixedPointEncoder | QuantizedEncoder:
        """The round's encoding for ``slots`` protocol slots (the most summands)."""
        if self.quantize_bits is None:
            return FixedPointEncoder(self.clip, slots, self.bits)
        return QuantizedEncoder(self.clip, slots, self.quantize_bits, self.stochastic)


def _config_json(cfg: SecAggConfig, p: SecAggParams, dp_clip: float | None = None) -> dict[str, Any]:
    return {
        "length": cfg.length,
        "cohort": cfg.cohort,
        "bits": cfg.bits,
        "degree": cfg.degree,
        "threshold": cfg.threshold,
        "session": base64.b64encode(cfg.session).decode(),
        "clip": p.clip,
        "max_weight": p.max_weight,
        "max_request_bytes": p.max_request_bytes,
        "dp_clip": dp_clip,
        **({"quantize_bits": p.quantize_bits, "stochastic": p.stochastic} if p.quantize_bits is not None else {}),
    }


# -- the body of a SecAggStep call ------------------------------------------------------------------
def encode_body(req: dict[str, Any], data: bytes | memoryview = b"") -> bytes:
    """A request (or reply) as it travels: a SecAggBody with the JSON and the raw bytes."""
    return pb.SecAggBody(json=json.dumps(req), data=bytes(data)).SerializeToString()


def decode_body(body: bytes) -> tuple[dict[str, Any] | None, bool]:
    """``(request, legacy)`` of a SecAggStep body: a SecAggBody (its ``data``, if any, becomes the
    request's ``"data"``; its JSON then has none of its own), or the bare JSON of SDKs before
    SecAggBody (``legacy``); request None if it is neither."""
    legacy = body[:1] == b"{"
    try:
        if legacy:
            return json.loads(body), True
        msg = pb.SecAggBody.FromString(body)
        req = json.loads(msg.json)
    except (ValueError, UnicodeDecodeError, DecodeError):
        return None, legacy
    data = msg.data  # (read once: each read of a bytes field is a copy)
    if not isinstance(req, dict) or (data and "data" in req):
        return None, False
    if data:
        req["data"] = data
    return req, False


def encode_reply(reply: dict[str, Any], legacy: bool) -> bytes:
    return json.dumps(reply).encode() if legacy else encode_body(reply)


def decode_reply(body: bytes) -> dict[str, Any]:
    return json.loads(pb.SecAggBody.FromString(body).json)


class RequestParts:
    """Reassembles the requests devices split into ``part`` requests, one pending request per device.

    Bounded: a request may hold at most ``max_chars`` characters or bytes (the largest message the
    round can need), and a device has one request pending at a time (index 0 starts it anew).  The
    parts of one request are all bytes (slices of a SecAggBody) or all text (earlier SDKs' bare JSON).
    A malformed part is refused with a ValueError and ends the device's pending request (it starts
    over with part 0, which the server's rate limit counts); nothing else changes."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.pending: dict[str, tuple[str, int, list, int]] = {}  # device -> (ticket id, count, parts, size)

    def add(self, device: str, ticket_id: str, req: dict[str, Any]) -> str | bytes | None:
        """Take one part; returns the whole request (its SecAggBody bytes, or earlier SDKs' JSON
        text) once its last part arrived, else None."""
        try:
            return self._add(device, ticket_id, req)
        except ValueError:
            self.pending.pop(device, None)
            raise

    def _add(self, device: str, ticket_id: str, req: dict[str, Any]) -> str | None:
        index, count, data = req.get("index"), req.get("count"), req.get("data")
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not isinstance(count, int)
            or isinstance(count, bool)
            or not isinstance(data, str | bytes)
            or not 0 <= index < count
            or not 2 <= count <= self.max_chars
        ):
            raise ValueError("part: expected {index: 0..count-1, count: >= 2, data: bytes or a string}")
        if index == 0:
            ticket, parts, chars = ticket_id, [], 0
        else:
            if device not in self.pending:
                raise ValueError(f"part {index} of {count}: no request in progress (send part 0 first)")
            ticket, expect, parts, chars = self.pending[device]
            if ticket != ticket_id or expect != count or index != len(parts):
                raise ValueError(
                    f"part {index} of {count}: expected part {len(parts)} of {expect} of the same assignment"
                )
            if type(data) is not type(parts[0]):
                raise ValueError(f"part {index} of {count}: parts of one request are all bytes or all text")
        if chars + len(data) > self.max_chars:
            raise ValueError(
                f"part {index} of {count}: the request is larger than the {self.max_chars} characters this round needs"
            )
        parts = parts + [data]
        if len(parts) < count:
            self.pending[device] = (ticket, count, parts, chars + len(data))
            return None
        self.pending.pop(device, None)
        return parts[0][:0].join(parts)


def split_body(req: dict[str, Any], data: bytes | memoryview, max_bytes: int) -> list[bytes]:
    """``req`` (with raw ``data``) as it travels: one SecAggBody if it fits in ``max_bytes``, else
    ``part`` bodies carrying consecutive slices of that body."""
    body = encode_body(req, data)
    if len(body) <= max_bytes:
        return [body]
    frame = len(encode_body({"op": "part", "ticket": req["ticket"], "index": 10**9, "count": 10**9}, b"x" * 2**21))
    budget = max_bytes - (frame - 2**21)
    if budget < 64:
        raise ValueError(f"secure aggregation: max_request_bytes={max_bytes} leaves no room for a part")
    view = memoryview(body)
    slices = [view[i : i + budget] for i in range(0, len(body), budget)]
    return [
        encode_body({"op": "part", "ticket": req["ticket"], "index": k, "count": len(slices)}, d)
        for k, d in enumerate(slices)
    ]


def split_request(req: dict[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    """``req`` as earlier SDKs sent it, bare JSON: itself if its JSON fits in ``max_bytes``, else ``part``
    requests that do (kept for tests and other clients of the old body; the server still reads it)."""
    text = json.dumps(req)
    if len(text.encode()) <= max_bytes:
        return [req]
    frame = len(json.dumps({"op": "part", "ticket": req["ticket"], "index": 10**9, "count": 10**9, "data": ""}))
    budget = max_bytes - frame
    if budget < 64:
        raise ValueError(f"secure aggregation: max_request_bytes={max_bytes} leaves no room for a part")
    slices, i = [], 0
    while i < len(text):
        n = budget
        while len(json.dumps(text[i : i + n]).encode()) - 2 > budget:  # escaped quotes grow a slice
            n -= max(1, (len(json.dumps(text[i : i + n]).encode()) - 2 - budget))
        slices.append(text[i : i + n])
        i += n
    return [
        {"op": "part", "ticket": req["ticket"], "index": k, "count": len(slices), "data": d}
        for k, d in enumerate(slices)
    ]


class SecAggRound:
    """The server's side of one round: protocol ids, the SecAggServer, stage bookkeeping."""

    def __init__(
        self, numel: int, slots: int, params: SecAggParams, version: int, now: float, dp_clip: float | None = None
    ):
        from flotilla.secure.graph import default_degree

        degree = default_degree(slots) if params.degree == "auto" else params.degree
        self.params = params
        self.dp_clip = dp_clip  # user-level DP: devices clip their delta to this L2 norm
        self.version = version
        self.encoder = params.encoder(slots)
        self.config = SecAggConfig(
            length=numel + 1, cohort=slots, bits=self.encoder.bits, degree=degree, threshold=params.threshold
        )
        self.server = SecAggServer(self.config)
        self.ids: dict[str, int] = {}  # device -> protocol id (1..slots)
        self.meta: dict[int, dict[str, Any]] = {}  # id -> num_examples, train_loss, examples_seen, ticket
        self.opened = now  # when the current stage opened (advertise: first join)
        self.directory: KeyDirectory | None = None
        self.bundles: dict[int, ShareBundle] | None = None
        self.request: UnmaskRequest | None = None
        self.aborted: str | None = None
        # the largest request of the round is the masked input: at most (earlier SDKs) base64 of
        # length x itemsize bytes; its raw bytes are fewer
        itemsize = np.dtype(self.encoder.dtype).itemsize
        self.parts = RequestParts(4 * -(-self.config.length * itemsize // 3) + 65536)

    @property
    def stage(self) -> str:
        return self.server.stage

    def config_json(self) -> dict[str, Any]:
        return _config_json(self.config, self.params, self.dp_clip)

    @property
    def masked_input_bytes(self) -> int:
        """Bytes of one masked input's vector on the wire: ``length`` ring elements of ``bits`` bits."""
        return -(-self.config.length * self.config.bits // 8)

    def advance(self, now: float, stage_s: float, cohort: int) -> bool:
        """Close the current stage if it is due.  Returns True when the round is ready to finish.
        Raises SecAggAborted below the threshold (the SecAggServer has then dropped its sum)."""
        s = self.server
        due = now - self.opened >= stage_s
        if s.stage == "advertise" and self.ids:
            if due or len(s.u1) >= cohort:
                self.directory = s.close_advertise()
                self.opened = now
        elif s.stage == "share":
            if due or s.u2 == s.u1:
                self.bundles = s.close_shares()
                self.opened = now
        elif s.stage == "mask":
            if due or s.u3 == s.u2:
                self.request = s.close_masked_input()
                self.opened = now
        elif s.stage == "unmask":
            return due or s.responders == s.u3
        return False

    def finish(
        self, noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, denominator: float | None = None
    ) -> tuple[torch.Tensor, float]:
        """(weighted mean of the survivors' clipped deltas, sum of their weights).  With user-level
        DP (``noise_fn``, weights 1): the noised sum divided by ``denominator``, the expected cohort
        (DP-FedAvg's release, as flotilla.secure.SecureAggregator does in the simulator)."""
        n = len(self.server.u3)
        total = self.server.finish()
        dec = self.encoder.decode_sum(total, n)
        weight_sum = float(dec[-1]) / self.encoder.clip
        if not weight_sum > 0:
            raise SecAggAborted("secure aggregation: the unmasked weight sum is not positive")
        if noise_fn is None:
            mean = torch.from_numpy(np.asarray(dec[:-1], dtype=np.float64) / weight_sum).to(torch.float32)
        else:
            mean = noise_fn(torch.from_numpy(np.asarray(dec[:-1], dtype=np.float32))).div_(denominator)
        return mean, weight_sum * self.params.max_weight


# -- the device's side --------------------------------------------------------------------------------
class RoundAborted(Exception):
    """The server aborted the secure round (fewer than the threshold); check in again."""


def run_device(
    call: Callable[..., dict[str, Any]],
    ticket: str,
    delta: torch.Tensor,
    weight: float,
    num_examples: int,
    train_loss: float = 0.0,
    examples_seen: int = 0,
    *,
    poll_s: float = 0.05,
    stop_after: str | None = None,
    send_body: Callable[[bytes], dict[str, Any]] | None = None,
) -> int:
    """Run this device's part of a secure round; returns the server's model version afterwards.

    ``call(request, data)`` sends one SecAggStep request (a dict, and the raw bytes of a masked
    input) and returns the reply dict; ``send_body(body)``, if given, sends the protocol messages'
    bodies as :func:`split_body` encoded them (whole, or in parts), else they go through ``call`` too.
    ``stop_after`` (tests) names the op after which the device vanishes, e.g. ``"masked"``."""

    def get(want: str) -> dict[str, Any]:
        while True:
            r = call({"op": "get", "ticket": ticket, "want": want})
            if r["status"] == "abort":
                raise RoundAborted(r.get("message", "secure aggregation aborted"))
            if r["status"] == "ok":
                return r
            time.sleep(min(float(r.get("retry_after_s", poll_s)), 1.0))

    def send(op: str, msg) -> bool:
        obj, data = dumps_raw(msg, cfg.bits) if op == "masked" else (dumps(msg), b"")
        req = {"op": op, "ticket": ticket, "msg": obj}
        bodies = split_body(req, data, max_request)
        for body in bodies:
            if send_body is not None:
                r = send_body(body)
            else:
                whole, _ = decode_body(body)
                r = call({k: v for k, v in whole.items() if k != "data"}, whole.get("data", b""))
            if r["status"] == "abort":
                break
        if r["status"] == "abort":
            raise RoundAborted(r.get("message", "secure aggregation aborted"))
        return stop_after == op

    r = call(
        {
            "op": "join",
            "ticket": ticket,
            "num_examples": int(num_examples),
            "train_loss": float(train_loss),
            "examples_seen": int(examples_seen),
        }
    )
    if r["status"] == "abort":
        raise RoundAborted(r.get("message", "secure aggregation aborted"))
    c = r["config"]
    max_request = int(c.get("max_request_bytes", SecAggParams.max_request_bytes))
    cfg = SecAggConfig(
        length=int(c["length"]),
        cohort=int(c["cohort"]),
        bits=int(c["bits"]),
        degree=c["degree"],
        threshold=c["threshold"],
        session=base64.b64decode(c["session"]),
    )
    if cfg.length != delta.numel() + 1:
        raise ValueError(
            f"secure aggregation: the server expects {cfg.length - 1} weights, this delta has {delta.numel()}"
        )
    client = SecAggClient(int(r["id"]), cfg)
    qbits = c.get("quantize_bits")
    if qbits is None:
        enc = FixedPointEncoder(float(c["clip"]), cfg.cohort, cfg.bits)
    else:  # channels.upload quantize: onto the clip's grid, into the narrow ring (flotilla/channels/ring.py)
        enc = QuantizedEncoder(float(c["clip"]), cfg.cohort, int(qbits), bool(c.get("stochastic", True)))
        if enc.bits != cfg.bits:
            raise ValueError(
                f"secure aggregation: {qbits}-bit values need a {enc.bits}-bit ring, the server says {cfg.bits}"
            )
    weight = 1.0 if c.get("uniform") else float(weight)
    if c.get("dp_clip"):  # user-level DP: this device's contribution to the sum has L2 norm <= S
        delta = delta * min(1.0, float(c["dp_clip"]) / max(float(delta.norm()), 1e-12))
    factor = min(weight, float(c["max_weight"])) / float(c["max_weight"])
    if send("advertise", client.advertise()):
        return -1
    directory = loads(get("directory")["msg"], KeyDirectory)
    if send("shares", client.share_keys(directory)):
        return -1
    bundle = loads(get("bundle")["msg"], ShareBundle)
    ring = np.empty(cfg.length, enc.dtype)
    if qbits is None:
        ring[:-1] = enc.encode(delta.detach().numpy(), factor)
        ring[-1] = enc.encode([enc.clip], factor)[0]  # the weight travels masked too
    else:  # stochastic rounding from fresh entropy; under DP what it encodes stays within dp_clip
        dp_clip = float(c["dp_clip"]) if c.get("dp_clip") else None
        encode_input(enc, delta.detach(), factor, dp_clip, ring, np.random.default_rng())
    if send("masked", client.masked_input(bundle, ring)):
        return -1
    request = loads(get("request")["msg"], UnmaskRequest)
    if send("unmask", client.unmask(request)):
        return -1
    return int(get("result")["version"])


MESSAGES = {"advertise": AdvertiseKeys, "shares": ShareKeys, "masked": MaskedInput, "unmask": UnmaskResponse}


# -- the server's side: the relay between devices --------------------------------------------------
class SecAggRelay:
    """Runs the sync secure rounds of a :class:`~flotilla.network.coordinator.Coordinator`: one
    SecAggStep request at a time (:meth:`step`), stage deadlines (:meth:`advance`), the abort
    (no step; the round starts over with a new selection) and the commit (the unmasked weighted
    mean becomes the round's step through the coordinator's ``_step``, core's server step).

    A refusal changes no state.  Tickets of aborted rounds and tickets issued before the last
    abort cannot join again (the devices check in for a new selection)."""

    def __init__(self, coord):
        self.coord = coord
        self.round: SecAggRound | None = None
        self.aborted: set[str] = set()  # tickets of aborted secure rounds (cleared at each step)
        self.restart = -math.inf  # tickets issued before the last abort cannot join

    def continues_request(self, device: str) -> bool:
        """Whether ``device`` is midway through a SecAggStep request sent in parts."""
        return self.round is not None and device in self.round.parts.pending

    async def step(self, device: str, req: dict[str, Any]) -> dict[str, Any]:
        """One SecAggStep request of ``device``; a refusal changes no state."""
        c = self.coord
        if (
            not isinstance(req, dict)
            or not isinstance(req.get("ticket"), str)
            or req.get("op") not in (*MESSAGES, "join", "get", "part")
        ):
            raise Refused(
                "INVALID_ARGUMENT",
                "invalid",
                "SecAggStep: expected {op: join|advertise|shares|masked|unmask|get|part, ticket, ...}",
            )
        ticket = Ticket.decode(req["ticket"], c.secret)
        if ticket.device != device:
            raise Refused(
                "PERMISSION_DENIED", "ticket", f"SecAggStep: assignment {ticket.id[:8]} belongs to another device"
            )
        op = req["op"]
        async with c.lock:
            await self.advance()
            r = self.round
            if op == "get" and req.get("want") == "result" and ticket.version < c.version:
                return {"status": "ok", "version": c.version}
            if ticket.version != c.version or c.done:
                return {
                    "status": "abort",
                    "message": f"round {ticket.version} is over (the server is at round {c.version}); check in again",
                }
            if ticket.expires <= c.clock():
                raise Refused(
                    "FAILED_PRECONDITION", "expired", f"SecAggStep: assignment {ticket.id[:8]} expired; check in again"
                )
            if op == "join":
                if ticket.id in self.aborted or ticket.expires - c.settings.assignment_timeout_s < self.restart - 1e-3:
                    return {"status": "abort", "message": f"round {c.version} was aborted; check in again"}
                if r is None:
                    r = self.round = SecAggRound(
                        c.numel,
                        c.settings.slots,
                        c.masked,
                        c.version,
                        c.clock(),
                        dp_clip=c.privacy.user.clip_norm if c.privacy is not None else None,
                    )
                if device not in r.ids:
                    if r.stage != "advertise" or len(r.ids) >= r.config.cohort:
                        raise Refused(
                            "FAILED_PRECONDITION",
                            "late",
                            f"SecAggStep: round {c.version} has closed its cohort; check in again later",
                        )
                    c.table.check_live(ticket)
                    n = req.get("num_examples")
                    if (
                        isinstance(n, bool)
                        or not isinstance(n, int)
                        or n < 1
                        or (c.settings.weighting == "examples" and n > c.masked.max_weight)
                    ):
                        raise Refused(
                            "INVALID_ARGUMENT",
                            "examples",
                            f"SecAggStep: num_examples must be an int in "
                            f"[1, max_weight={c.masked.max_weight:g}], got {n!r}",
                        )
                    loss, seen = req.get("train_loss", 0.0), req.get("examples_seen", 0)
                    c.check_numbers(n, loss, seen, "SecAggStep")
                    r.ids[device] = len(r.ids) + 1
                    r.meta[r.ids[device]] = {
                        "num_examples": n,
                        "train_loss": float(loss),
                        "examples_seen": seen,
                        "ticket": ticket,
                    }
                    if len(r.ids) == 1:
                        r.opened = c.clock()
                return {
                    "status": "ok",
                    "id": r.ids[device],
                    "config": {**r.config_json(), "uniform": c.settings.weighting == "uniform"},
                }
            if r is None or device not in r.ids:
                if ticket.id in self.aborted:
                    return {"status": "abort", "message": f"round {c.version} was aborted; check in again"}
                raise Refused("FAILED_PRECONDITION", "invalid", "SecAggStep: join the round first")
            me = r.ids[device]
            if op == "part":  # a request too large for one message, in slices (RequestParts)
                try:
                    text = r.parts.add(device, ticket.id, req)
                except ValueError as e:
                    raise Refused("INVALID_ARGUMENT", "invalid", f"SecAggStep: {e}") from None
                if text is None:
                    return {"status": "ok", "part": req["index"]}
                outer = req["ticket"]
                try:
                    req = json.loads(text) if isinstance(text, str) else decode_body(text)[0]
                except ValueError:
                    req = None
                if req is None:
                    raise Refused(
                        "INVALID_ARGUMENT", "invalid", "SecAggStep: the reassembled parts are not a request"
                    ) from None
                if not isinstance(req, dict) or req.get("ticket") != outer or req.get("op") not in MESSAGES:
                    raise Refused(
                        "INVALID_ARGUMENT",
                        "invalid",
                        "SecAggStep: the reassembled request must be "
                        "advertise|shares|masked|unmask with the parts' ticket",
                    )
                op = req["op"]
            if op == "get":
                want = req.get("want")
                ready = {
                    "directory": r.directory is not None,
                    "bundle": r.bundles is not None,
                    "request": r.request is not None,
                    "result": False,
                }
                if want not in ready:
                    raise Refused("INVALID_ARGUMENT", "invalid", f"SecAggStep: unknown want {want!r}")
                if not ready[want]:
                    return {"status": "wait", "retry_after_s": 0.05}
                if want == "directory":
                    msg = r.directory
                elif want == "bundle":
                    if me not in r.bundles:
                        return {"status": "abort", "message": "this device dropped out of the round (no share bundle)"}
                    msg = r.bundles[me]
                else:
                    if me not in r.request.survivors:
                        return {"status": "abort", "message": "this device dropped out of the round (no masked input)"}
                    msg = r.request
                return {"status": "ok", "msg": dumps(msg)}
            cls = MESSAGES[op]
            try:
                data = req.get("data") if op == "masked" else None  # the vector's raw bytes
                if data is not None and not isinstance(data, bytes):
                    raise ProtocolError("MaskedInput: its vector travels as raw bytes in SecAggBody.data")
                msg = loads(req.get("msg"), cls, length=r.config.length, raw=data, bits=r.config.bits)
                if msg.sender != me:
                    raise Refused(
                        "PERMISSION_DENIED",
                        "ticket",
                        f"SecAggStep: {cls.__name__} names sender {msg.sender}, this device is {me}",
                    )
                receive = {
                    "advertise": r.server.receive_advertise,
                    "shares": r.server.receive_shares,
                    "masked": r.server.receive_masked_input,
                    "unmask": r.server.receive_unmask,
                }[op]
                receive(msg)
            except TamperedMessage as e:
                raise Refused("INVALID_ARGUMENT", "tampered", f"SecAggStep: {e}") from None
            except ReplayedMessage as e:
                raise Refused("ALREADY_EXISTS", "replay", f"SecAggStep: {e}") from None
            except ProtocolError as e:
                late = f"stage {r.stage!r}" in str(e) or "cannot" in str(e)
                raise Refused(
                    "FAILED_PRECONDITION" if late else "INVALID_ARGUMENT",
                    "late" if late else "invalid",
                    f"SecAggStep: {e}",
                ) from None
            except SecAggAborted as e:
                await self._abort(str(e))
                return {"status": "abort", "message": str(e)}
            await self.advance()
            return {"status": "ok"}

    async def advance(self) -> None:
        """Close due stages; finish (one server step) or abort the round.  Called with the lock held."""
        r, c = self.round, self.coord
        if r is None:
            return
        try:
            for _ in range(4):
                stage = r.stage
                if r.advance(c.clock(), c.settings.secagg_stage_s, c.settings.cohort):
                    mean, _ = r.finish(*(c.masked_release or ()))
                    await self._commit(r, mean)
                    return
                if r.stage == stage:
                    return
        except SecAggAborted as e:
            await self._abort(str(e))

    async def _abort(self, why: str) -> None:
        """No step: the model is unchanged; the round starts over with a new selection."""
        c = self.coord
        logging.getLogger("flotilla.network").warning("round %d: %s; the round starts over", c.version, why)
        c.counters["secagg_aborted"] += 1
        if self.round is not None:
            self.aborted |= {m["ticket"].id for m in self.round.meta.values()}
        self.round = None
        for device, t in c.table.items():
            if t.version == c.version:
                c.table.drop(device)
        c.selection.redraw()
        c.round_started = self.restart = c.clock()

    async def _commit(self, r: SecAggRound, mean: torch.Tensor) -> None:
        """The unmasked weighted mean becomes this round's step; the ledger records who was in the sum
        (no delta, no norm: the server never had either)."""
        c = self.coord
        loop = asyncio.get_running_loop()
        included = sorted(r.server.u3)
        for pid in included:
            m = r.meta[pid]
            t = m["ticket"]
            weight = float(m["num_examples"]) if c.settings.weighting == "examples" else 1.0
            entry = {
                "seq": c.next_seq,
                "assignment": t.id,
                "device": t.device,
                "base_version": t.version,
                "expires": t.expires,
                "version": c.version,
                "staleness": 0,
                "num_examples": m["num_examples"],
                "weight": weight,
                "norm": None,
                "train_loss": m["train_loss"],
                "examples_seen": m["examples_seen"],
                "file": f"secagg-{t.id}.none",
                "secagg_id": pid,
                "reply_version": c.version + 1,
            }
            await loop.run_in_executor(None, c.store.accept, entry)
            c.next_seq += 1
            c.buffer.append(entry)
            c.contributors.add(t.device)
            c.table.settle(t)
            c.table.answer(t.id, Answer(entry["seq"], c.version + 1, None, t.expires + c.grace_s))
            c.counters["accepted"] += 1
        c.counters["secagg_dropped"] += len(r.server.u1 | r.server.u2) - len(included)
        c.aggregator.reset()
        c.aggregator.add(mean, 1.0, "secagg")
        self.round = None
        self.aborted = set()
        await c._step()
