"""A secure buffer for asynchronous (FedBuff) aggregation: a stand-in for a trusted execution
environment (Papaya, Huba et al. MLSys 2022).

FedBuff's server only ever needs the sum of K buffered updates, so the buffer can live in an
enclave with its own X25519 key pair.  Clients encrypt each update to the buffer's public key
(ephemeral X25519 + HKDF-SHA256 + AES-256-GCM); the untrusted server relays ciphertexts it cannot
read.  The associated data binds the client id, the model version the client trained from, and a
single-use nonce the buffer issued with the assignment, so the relay can neither replay an update,
nor move it to another client or version, without the buffer noticing.  Inside, the buffer
validates each update, applies the staleness weight, and releases only the weighted sum of at least
K updates (optionally with DP noise added first, ``noise_fn``).

Client side:  ``seal_update(delta, weight, assignment) -> EncryptedUpdate``.
Buffer side:  ``assign``, ``receive``, ``release``.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flotilla.core.aggregate import UpdateRejected, check_update
from flotilla.secure import keys as K
from flotilla.secure.errors import (
    BufferNotReady,
    DuplicateContribution,
    ProtocolError,
    ReplayedMessage,
    TamperedMessage,
)

NONCE_BYTES = 16
_INFO = b"flotilla-buffer update v1"


@dataclass(frozen=True)
class Assignment:
    """What a client gets with its task: the model version, a single-use nonce, the buffer's key."""

    client: int | str
    version: int
    nonce: bytes
    buffer_key: bytes


@dataclass(frozen=True)
class EncryptedUpdate:
    """What the untrusted server relays. Only ``ciphertext`` is secret; the rest is authenticated."""

    client: int | str
    version: int
    nonce: bytes
    ephemeral_pk: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Release:
    """The only thing that leaves the buffer: a weighted sum of ``count`` >= K updates."""

    sum: torch.Tensor  # sum_i staleness(tau_i) * weight_i * delta_i (+ noise, if any)
    count: int
    total_weight: float  # sum_i staleness(tau_i) * weight_i
    version: int  # server version at the last accepted update
    weight_sum: float = 0.0  # sum_i weight_i (before staleness: FedBuff's "mean" divides by it)


def _client_bytes(client) -> bytes:
    # Type-tagged so client 7 and client "7" are different parties.
    return f"{type(client).__name__}:{client}".encode()


def _associated_data(client, version: int, nonce: bytes, ephemeral_pk: bytes) -> bytes:
    return K.commit(_INFO, _client_bytes(client), struct.pack(">q", version), nonce, ephemeral_pk)


def seal_update(delta: torch.Tensor, weight: float, assignment: Assignment) -> EncryptedUpdate:
    """Client side: encrypt ``(weight, delta)`` to the buffer named in ``assignment``."""
    eph_sk, eph_pk = K.new_keypair()  # fresh per update: forward secrecy, single-use key
    key = K.derive(eph_sk, assignment.buffer_key, eph_pk + assignment.buffer_key, _INFO)
    payload = struct.pack("<d", float(weight)) + delta.detach().to(torch.float32).contiguous().numpy().tobytes()
    ad = _associated_data(assignment.client, assignment.version, assignment.nonce, eph_pk)
    return EncryptedUpdate(assignment.client, assignment.version, assignment.nonce, eph_pk, K.seal(key, payload, ad))


class SecureBuffer:
    """Enclave-style FedBuff buffer. Releases ``sum(w_i * s(tau_i) * d_i)`` only once >= K are in.

    numel:            model size.
    min_updates:      K; ``release`` refuses while fewer updates are buffered.
    staleness_weight: s(tau) for tau = server_version - client's version (default: constant 1).
    max_norm:         reject updates whose L2 norm exceeds this (None: no bound).
    max_staleness:    reject updates staler than this (None: no bound).
    noise_fn:         DP hook applied to the sum inside the buffer before it is released.
    one_per_client:   reject a second update from a client already in the current buffer
                      (``DuplicateContribution``; user-level DP: one contribution per user per release).
    replay_window:    how many accepted nonces are remembered to name a replay as such; an older
                      replay is still refused, as an unknown nonce (memory stays bounded).
    """

    def __init__(
        self,
        numel: int,
        min_updates: int,
        *,
        staleness_weight: Callable[[int], float] | None = None,
        max_norm: float | None = None,
        max_staleness: int | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        one_per_client: bool = False,
        replay_window: int = 1 << 16,
    ):
        if min_updates < 1:
            raise ValueError(f"min_updates: must be >= 1, got {min_updates}")
        self.numel = numel
        self.min_updates = min_updates
        self.staleness_weight = staleness_weight or (lambda tau: 1.0)
        self.max_norm = max_norm
        self.max_staleness = max_staleness
        self.noise_fn = noise_fn
        self.one_per_client = one_per_client
        self.replay_window = replay_window
        self._sk, self.public_key = K.new_keypair()  # the private key never leaves the buffer
        self._issued: dict[bytes, tuple[object, int]] = {}
        self._used: OrderedDict[bytes, None] = OrderedDict()  # recently accepted nonces (older ones: unknown)
        self._contributors: set = set()  # clients in the current buffer (one_per_client)
        self._sum = torch.zeros(numel)
        self._version = -1
        self.count = 0
        self.total_weight = 0.0
        self.weight_sum = 0.0

    @property
    def ready(self) -> bool:
        return self.count >= self.min_updates

    def assign(self, client: int | str, version: int) -> Assignment:
        """Issue a single-use nonce for one client training from model ``version``."""
        nonce = os.urandom(NONCE_BYTES)
        self._issued[nonce] = (client, int(version))
        return Assignment(client, int(version), nonce, self.public_key)

    def cancel(self, assignment: Assignment) -> None:
        """Forget an assignment whose update will never come (the trip was abandoned or rejected)."""
        self._issued.pop(assignment.nonce, None)

    def receive(self, update: EncryptedUpdate, server_version: int) -> float:
        """Decrypt, validate and buffer one update; return the weight applied to it.

        Any rejection raises (ReplayedMessage, TamperedMessage, ProtocolError or UpdateRejected) and
        leaves the buffer exactly as it was.
        """
        who = f"buffer: update from client {update.client}"
        if update.nonce in self._used:
            raise ReplayedMessage(f"{who}: nonce already used (replayed update)")
        issued = self._issued.get(update.nonce)
        if issued is None:
            raise ProtocolError(f"{who}: unknown assignment nonce")
        if issued != (update.client, update.version):
            raise TamperedMessage(
                f"{who}: client/version {update.client}/{update.version} do not match the "
                f"assignment ({issued[0]}/{issued[1]})"
            )
        if server_version < max(update.version, self._version):
            raise ProtocolError(f"{who}: server version {server_version} went backwards")
        tau = server_version - update.version
        if self.one_per_client and _client_bytes(update.client) in self._contributors:
            raise DuplicateContribution(f"{who}: this client already has an update in the buffer (one per release)")
        if self.max_staleness is not None and tau > self.max_staleness:
            raise UpdateRejected(f"{who}: staleness {tau} exceeds max_staleness {self.max_staleness}")
        if len(update.ephemeral_pk) != 32:
            raise TamperedMessage(f"{who}: malformed ephemeral key")
        key = K.derive(self._sk, update.ephemeral_pk, update.ephemeral_pk + self.public_key, _INFO)
        ad = _associated_data(update.client, update.version, update.nonce, update.ephemeral_pk)
        payload = K.open_sealed(key, update.ciphertext, ad, who)
        if len(payload) != 8 + 4 * self.numel:
            raise UpdateRejected(f"{who}: carries {(len(payload) - 8) / 4:g} values, expected {self.numel}")

        (weight,) = struct.unpack("<d", payload[:8])
        delta = torch.from_numpy(np.frombuffer(payload, np.float32, offset=8).copy())
        check_update(delta, self.numel, who)
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateRejected(f"{who}: weight must be a positive finite number, got {weight}")
        if self.max_norm is not None:
            norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            if norm > self.max_norm:
                raise UpdateRejected(f"{who}: L2 norm {norm:.4g} exceeds max_norm {self.max_norm}")
        s = float(self.staleness_weight(tau))
        if not (math.isfinite(s) and s > 0):
            raise UpdateRejected(f"{who}: staleness weight s({tau}) = {s} is not a positive finite number")
        w = weight * s
        # Everything checked: now, and only now, change state.
        self._sum.add_(delta, alpha=w)
        self.total_weight += w
        self.weight_sum += weight
        self.count += 1
        self._version = server_version
        del self._issued[update.nonce]
        self._used[update.nonce] = None
        if len(self._used) > self.replay_window:
            self._used.popitem(last=False)
        if self.one_per_client:
            self._contributors.add(_client_bytes(update.client))
        return w

    def release(self) -> Release:
        """The weighted sum of the buffered updates, then an empty buffer. Needs >= K updates."""
        if not self.ready:
            raise BufferNotReady(f"buffer holds {self.count} updates; it releases only sums of >= {self.min_updates}")
        out = self._sum.clone()
        if self.noise_fn is not None:
            out = self.noise_fn(out)
        rel = Release(out, self.count, self.total_weight, self._version, self.weight_sum)
        self.reset()
        return rel

    def reset(self) -> None:
        """Drop the buffered updates (not the used nonces: a replay stays a replay)."""
        self._sum.zero_()
        self.count = 0
        self.total_weight = 0.0
        self.weight_sum = 0.0
        self._contributors.clear()

    # -- checkpoints: a stand-in for the enclave's sealed storage -----------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffered sum and counters.  A real enclave would seal this to itself; the simulator's
        checkpoints hold it in the clear (they are taken right after a release, when it is empty)."""
        return {
            "sum": self._sum.clone(),
            "count": torch.tensor(self.count),
            "total_weight": torch.tensor(self.total_weight, dtype=torch.float64),
            "weight_sum": torch.tensor(self.weight_sum, dtype=torch.float64),
            "version": torch.tensor(self._version),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["sum"].shape != self._sum.shape:
            raise ValueError(f"secure buffer state has {state['sum'].numel()} values, expected {self.numel}")
        self._sum.copy_(state["sum"])
        self.count = int(state["count"])
        self.total_weight = float(state["total_weight"])
        self.weight_sum = float(state["weight_sum"])
        self._version = int(state["version"])
