"""Messages of the secure-aggregation protocol: plain dataclasses of ints, bytes and numpy arrays,
so the same objects can be serialised onto any transport (gRPC, HTTP, a queue) later.

Every message carries the round's ``session`` id; receivers reject messages from other rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client -> server: two fresh X25519 public keys."""

    session: bytes
    sender: int
    c_pk: bytes  # for encrypting shares between clients
    s_pk: bytes  # for agreeing pairwise mask seeds


@dataclass(frozen=True)
class KeyDirectory:
    """Round 0, server -> all: the public keys of every client that advertised (the set U1)."""

    session: bytes
    keys: dict[int, tuple[bytes, bytes]]  # id -> (c_pk, s_pk)


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client u -> server: Shamir shares of b_u and s_u, encrypted to each neighbour."""

    session: bytes
    sender: int
    ciphertexts: dict[int, bytes]  # recipient v -> AES-GCM(shares for v)
    commitments: dict[int, tuple[bytes, bytes]]  # holder (neighbours and u) -> (H(b share), H(s share))
    b_commitment: bytes  # H(b_u): lets the server check its reconstruction


@dataclass(frozen=True)
class ShareBundle:
    """Round 1, server -> client v: the ciphertexts addressed to v by its neighbours in U2."""

    session: bytes
    recipient: int
    ciphertexts: dict[int, bytes]  # sender u -> ciphertext


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client -> server: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)."""

    session: bytes
    sender: int
    y: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> survivors: who sent a masked input (the set U3)."""

    session: bytes
    survivors: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client -> server: shares of b_u for survivors u, of s_u for dropped u; never both."""

    session: bytes
    sender: int
    b_shares: dict[int, tuple[bytes, bytes]]  # owner u -> (share, salt)
    s_shares: dict[int, tuple[bytes, bytes]]
