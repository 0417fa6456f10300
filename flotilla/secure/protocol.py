"""Practical secure aggregation (Bonawitz et al., CCS 2017) with the SecAgg+ sparse graph option
(Bell et al., CCS 2020), as two message-passing state machines.

    round 0  client.advertise()            -> AdvertiseKeys   server.receive_advertise / close_advertise -> KeyDirectory
    round 1  client.share_keys(directory)  -> ShareKeys       server.receive_shares / close_shares -> {v: ShareBundle}
    round 2  client.masked_input(bundle, x) -> MaskedInput    server.receive_masked_input / close_masked_input -> UnmaskRequest
    round 3  client.unmask(request)        -> UnmaskResponse  server.receive_unmask / finish -> sum of x_u (ring vector)

Threat model: honest-but-curious server, clients that may drop at any point, and a network (or a
misbehaving party) that may tamper with, misroute or replay messages.  Tampering is detected by
AES-GCM (share ciphertexts) and by hash commitments (revealed shares); a rejected message leaves the
receiver's state unchanged.  Without a PKI there are no signatures, so the consistency round of the
paper's malicious-server variant is omitted (see docs/security.md).

Parties are identified by positive integers; a client id is also its Shamir evaluation point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from flotilla.secure import keys as K
from flotilla.secure import shamir
from flotilla.secure.encoding import container
from flotilla.secure.errors import ProtocolError, ReplayedMessage, SecAggAborted, TamperedMessage
from flotilla.secure.graph import neighbours
from flotilla.secure.messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from flotilla.secure.prg import PRG

SALT_BYTES = 16
_PAYLOAD = 2 * (shamir.SHARE_BYTES + SALT_BYTES)  # b share, b salt, s share, s salt


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one round, known to the server and every client.

    length:    ring elements per input vector.
    cohort:    clients invited (n); sets the default threshold and bounds the participants.
    bits:      the ring is Z_{2^bits}: 32 or 64 (fixed point), or any width 2..64 (a quantised ring,
               flotilla.secure.encoding.QuantizedEncoder), held in the narrowest unsigned numpy type;
               every party reduces its vectors mod 2^bits (a masked input never has higher bits set).
    degree:    None: every pair of clients masks (Bonawitz). k: SecAgg+, each client masks with and
               shares its secrets among k graph neighbours (rounded up to even; >= n-1 means all).
    threshold: shares needed to reconstruct a secret (t). Default: a strict majority of a client's
               neighbourhood including itself (n//2 + 1 for the complete graph).
    session:   fresh random round id; salts every key derivation and is checked on every message.
    """

    length: int
    cohort: int
    bits: int = 32
    degree: int | None = None
    threshold: int | None = None
    session: bytes = field(default_factory=lambda: os.urandom(16))

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length: must be >= 1, got {self.length}")
        if self.cohort < 2:
            raise ValueError(f"cohort: secure aggregation needs >= 2 clients, got {self.cohort}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 64:
            raise ValueError(f"bits: must be an int in 2..64, got {self.bits!r}")
        if self.degree is not None and self.degree < 1:
            raise ValueError(f"degree: must be >= 1 or None, got {self.degree}")
        if not 1 <= self.t <= self.neighbourhood:
            raise ValueError(
                f"threshold: must be between 1 and the neighbourhood size {self.neighbourhood}, got {self.t}"
            )

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(container(self.bits))

    @property
    def narrow(self) -> bool:
        """True when the ring is narrower than its numpy type (vectors need reducing mod 2^bits)."""
        return self.bits < 8 * self.dtype.itemsize

    def reduce(self, v: np.ndarray) -> np.ndarray:
        """``v`` mod 2^bits, in place (a ring as wide as its type wraps by itself)."""
        if self.narrow:
            np.bitwise_and(v, self.dtype.type((1 << self.bits) - 1), out=v)
        return v

    @property
    def sparse(self) -> bool:
        """True when SecAgg+ neighbourhoods are smaller than the cohort."""
        return self.degree is not None and 2 * ((self.degree + 1) // 2) < self.cohort - 1

    @property
    def neighbourhood(self) -> int:
        """Share holders per client (its neighbours plus itself)."""
        return 2 * ((self.degree + 1) // 2) + 1 if self.sparse else self.cohort

    @property
    def t(self) -> int:
        return self.threshold if self.threshold is not None else self.neighbourhood // 2 + 1

    def graph(self, ids) -> dict[int, frozenset[int]]:
        return neighbours(ids, self.degree if self.sparse else None, self.session)


def _share_key_info(sender: int, recipient: int) -> bytes:
    return b"flotilla-secagg share" + K.ident(sender) + K.ident(recipient)


def _mask_info(u: int, v: int) -> bytes:
    a, b = sorted((u, v))
    return b"flotilla-secagg mask" + K.ident(a) + K.ident(b)


def _share_commitment(session: bytes, owner: int, holder: int, kind: bytes, share: bytes, salt: bytes) -> bytes:
    return K.commit(b"flotilla-secagg share-commit", session, K.ident(owner), K.ident(holder), kind, share, salt)


def _check_session(config: SecAggConfig, msg, who: str) -> None:
    if msg.session != config.session:
        raise ReplayedMessage(f"{who}: {type(msg).__name__} belongs to another round (session id mismatch)")


def add_masks(y: np.ndarray, seeds: list[tuple[bytes, int]], prg: PRG) -> None:
    """``y += sum sign * PRG(seed)`` mod 2^bits in place: a client's masks (``SecAggClient.mask_seeds``)."""
    for seed, sign in seeds:
        prg.add_into(y, seed, sign)


class SecAggClient:
    """One client's side of a round. Call advertise, share_keys, masked_input, unmask in order."""

    def __init__(self, cid: int, config: SecAggConfig, prg: PRG | None = None):
        if not isinstance(cid, int) or cid < 1:
            raise ValueError(f"client id must be a positive int (it is a Shamir point), got {cid!r}")
        self.id = cid
        self.config = config
        self.stage = "advertise"
        self._prg = prg
        self._who = f"client {cid}"

    def _expect(self, stage: str, msg) -> None:
        _check_session(self.config, msg, self._who)
        if self.stage != stage:
            raise ProtocolError(f"{self._who}: got {type(msg).__name__} while in stage {self.stage!r}")

    # -- round 0 ------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        if self.stage != "advertise":
            raise ProtocolError(f"{self._who}: keys already advertised")
        self._c_sk, c_pk = K.new_keypair()
        self._s_sk, s_pk = K.new_keypair()
        self._own = (c_pk, s_pk)
        self.stage = "share"
        return AdvertiseKeys(self.config.session, self.id, c_pk, s_pk)

    # -- round 1 ------------------------------------------------------------------------
    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        self._expect("share", directory)
        cfg, keys = self.config, directory.keys
        if keys.get(self.id) != self._own:
            raise ProtocolError(f"{self._who}: the key directory does not carry this client's keys")
        if len(keys) < cfg.t:
            raise SecAggAborted(f"{self._who}: only {len(keys)} clients advertised keys, threshold is {cfg.t}")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise ProtocolError(f"{self._who}: the key directory repeats a public key")
        nb = cfg.graph(keys)[self.id]
        if len(nb) + 1 < cfg.t:
            raise SecAggAborted(f"{self._who}: only {len(nb) + 1} share holders, threshold is {cfg.t}")

        b = os.urandom(32)  # self-mask seed b_u
        holders = sorted(nb | {self.id})
        b_sh = shamir.split(b, cfg.t, holders)
        s_sh = shamir.split(K.private_bytes(self._s_sk), cfg.t, holders)
        ciphertexts, commitments = {}, {}
        for v in holders:
            bs, ss = shamir.share_to_bytes(b_sh[v]), shamir.share_to_bytes(s_sh[v])
            b_salt, s_salt = os.urandom(SALT_BYTES), os.urandom(SALT_BYTES)
            commitments[v] = (
                _share_commitment(cfg.session, self.id, v, b"b", bs, b_salt),
                _share_commitment(cfg.session, self.id, v, b"s", ss, s_salt),
            )
            payload = bs + b_salt + ss + s_salt
            if v == self.id:
                self._held = {self.id: payload}  # our own share stays here
                continue
            key = K.derive(self._c_sk, keys[v][0], cfg.session, _share_key_info(self.id, v))
            ciphertexts[v] = K.seal(key, payload, cfg.session + K.ident(self.id) + K.ident(v))
        self._keys, self._nb, self._b = keys, nb, b
        self.stage = "mask"
        return ShareKeys(
            cfg.session,
            self.id,
            ciphertexts,
            commitments,
            K.commit(b"flotilla-secagg b", cfg.session, K.ident(self.id), b),
        )

    # -- round 2 ------------------------------------------------------------------------
    def masked_input(self, bundle: ShareBundle, x: np.ndarray) -> MaskedInput:
        cfg = self.config
        senders = self._check_bundle(bundle)
        if not isinstance(x, np.ndarray) or x.dtype != cfg.dtype or x.shape != (cfg.length,):
            raise ProtocolError(f"{self._who}: input must be a ({cfg.length},) {cfg.dtype} ring vector")
        if cfg.narrow and int(x.max(initial=0)) >> cfg.bits:
            raise ProtocolError(f"{self._who}: input has values outside Z_2^{cfg.bits}")
        y = x.copy()
        add_masks(y, self._open(bundle, senders), self._prg or PRG(cfg.length, cfg.dtype))
        return MaskedInput(cfg.session, self.id, cfg.reduce(y))

    def mask_seeds(self, bundle: ShareBundle) -> list[tuple[bytes, int]]:
        """Round 2 without the input: the seeds of this client's masks, ``[(b_u, +1), (s_uv, +1 if v > u
        else -1), ...]``, for :func:`add_masks` (``masked_input`` is this plus the input).  A runtime that
        masks elsewhere (a Ray actor training this client) gets only these seeds; the client keeps its
        shares for round 3."""
        return self._open(bundle, self._check_bundle(bundle))

    def _check_bundle(self, bundle: ShareBundle) -> set[int]:
        self._expect("mask", bundle)
        cfg = self.config
        if bundle.recipient != self.id:
            raise ProtocolError(f"{self._who}: share bundle is addressed to client {bundle.recipient}")
        senders = set(bundle.ciphertexts)
        if not senders <= self._nb:
            raise ProtocolError(f"{self._who}: shares from non-neighbours {sorted(senders - self._nb)[:5]}")
        if len(senders) + 1 < cfg.t:
            raise SecAggAborted(
                f"{self._who}: only {len(senders) + 1} of its share holders remain, threshold is {cfg.t}"
            )
        return senders

    def _open(self, bundle: ShareBundle, senders: set[int]) -> list[tuple[bytes, int]]:
        cfg = self.config
        # Decrypt everything before changing any state: one bad ciphertext rejects the bundle.
        held = {}
        for u in sorted(senders):
            key = K.derive(self._c_sk, self._keys[u][0], cfg.session, _share_key_info(u, self.id))
            pt = K.open_sealed(
                key,
                bundle.ciphertexts[u],
                cfg.session + K.ident(u) + K.ident(self.id),
                f"{self._who}: shares from client {u}",
            )
            if len(pt) != _PAYLOAD:
                raise TamperedMessage(f"{self._who}: shares from client {u} have the wrong length")
            held[u] = pt

        seeds = [(self._b, 1)]
        for v in sorted(senders):  # pairwise masks cancel in the sum
            seed = K.derive(self._s_sk, self._keys[v][1], cfg.session, _mask_info(self.id, v))
            seeds.append((seed, +1 if v > self.id else -1))
        self._held.update(held)
        self._u2_nb = senders
        del self._b, self._s_sk, self._c_sk  # no longer needed: forget them
        self.stage = "unmask"
        return seeds

    # -- round 3 ------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._expect("unmask", request)
        cfg, survivors = self.config, request.survivors
        if self.id not in survivors:
            raise ProtocolError(f"{self._who}: not listed among the survivors")
        if len(survivors) < cfg.t:
            raise SecAggAborted(
                f"{self._who}: only {len(survivors)} survivors, threshold is {cfg.t}; revealing nothing"
            )
        if not (survivors & self._nb) <= self._u2_nb:
            raise ProtocolError(f"{self._who}: survivors include neighbours that never shared keys")
        b_rev, s_rev = {}, {}
        n, s = shamir.SHARE_BYTES, SALT_BYTES
        for u, p in self._held.items():
            # A survivor's self-mask or a dropped client's mask key, never both for one client.
            if u in survivors:
                b_rev[u] = (p[:n], p[n : n + s])
            else:
                s_rev[u] = (p[n + s : 2 * n + s], p[2 * n + s :])
        self._held = {}
        self.stage = "done"
        return UnmaskResponse(cfg.session, self.id, b_rev, s_rev)


class SecAggServer:
    """The server's side: relays messages, sums masked inputs, and removes the masks at the end."""

    def __init__(self, config: SecAggConfig, prg: PRG | None = None):
        self.config = config
        self.stage = "advertise"
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self._shares: dict[int, ShareKeys] = {}
        self._masked: set[int] = set()
        self._revealed: dict[int, UnmaskResponse] = {}
        self._prg = prg

    # Participant sets of the paper: U1 advertised, U2 shared keys, U3 sent a masked input.
    @property
    def u1(self) -> frozenset[int]:
        return frozenset(self.keys)

    @property
    def u2(self) -> frozenset[int]:
        return frozenset(self._shares)

    @property
    def u3(self) -> frozenset[int]:
        return frozenset(self._masked)

    @property
    def responders(self) -> frozenset[int]:
        return frozenset(self._revealed)

    def _expect(self, stage: str, msg) -> None:
        _check_session(self.config, msg, "server")
        if self.stage != stage:
            raise ProtocolError(f"server: got {type(msg).__name__} while in stage {self.stage!r}")

    def _abort(self, why: str):
        self.stage = "aborted"
        self._sum = None  # drop the masked inputs
        raise SecAggAborted(f"secure aggregation aborted: {why}; nothing was disclosed")

    def _need(self, have: int, what: str) -> None:
        if have < self.config.t:
            self._abort(f"only {have} {what}, threshold is {self.config.t}")

    # -- round 0 ------------------------------------------------------------------------
    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._expect("advertise", msg)
        if not isinstance(msg.sender, int) or msg.sender < 1:
            raise ProtocolError(f"server: client id must be a positive int, got {msg.sender!r}")
        if msg.sender in self.keys:
            raise ReplayedMessage(f"server: client {msg.sender} already advertised keys")
        if len(msg.c_pk) != 32 or len(msg.s_pk) != 32:
            raise ProtocolError(f"server: client {msg.sender} sent malformed public keys")
        if len(self.keys) >= self.config.cohort:
            raise ProtocolError(f"server: the round is full ({self.config.cohort} clients)")
        self.keys[msg.sender] = (msg.c_pk, msg.s_pk)

    def close_advertise(self) -> KeyDirectory:
        if self.stage != "advertise":
            raise ProtocolError(f"server: cannot close advertise in stage {self.stage!r}")
        self._need(len(self.keys), "clients advertised keys")
        self.graph = self.config.graph(self.keys)
        self.stage = "share"
        return KeyDirectory(self.config.session, dict(self.keys))

    # -- round 1 ------------------------------------------------------------------------
    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect("share", msg)
        u = msg.sender
        if u not in self.keys:
            raise ProtocolError(f"server: shares from client {u}, which did not advertise keys")
        if u in self._shares:
            raise ReplayedMessage(f"server: client {u} already shared its keys")
        nb = self.graph[u]
        if set(msg.ciphertexts) != nb or set(msg.commitments) != nb | {u}:
            raise ProtocolError(f"server: client {u} must send shares to exactly its {len(nb)} neighbours")
        if any(len(c) != 32 for pair in msg.commitments.values() for c in pair) or len(msg.b_commitment) != 32:
            raise ProtocolError(f"server: client {u} sent malformed commitments")
        self._shares[u] = msg

    def close_shares(self) -> dict[int, ShareBundle]:
        if self.stage != "share":
            raise ProtocolError(f"server: cannot close share keys in stage {self.stage!r}")
        u2 = self._shares
        self._need(len(u2), "clients shared keys")
        bundles = {
            v: ShareBundle(self.config.session, v, {u: u2[u].ciphertexts[v] for u in sorted(self.graph[v]) if u in u2})
            for v in u2
        }
        self._sum = np.zeros(self.config.length, self.config.dtype)
        self.stage = "mask"
        return bundles

    # -- round 2 ------------------------------------------------------------------------
    def receive_masked_input(self, msg: MaskedInput) -> None:
        self._expect("mask", msg)
        cfg, u = self.config, msg.sender
        if u not in self._shares:
            raise ProtocolError(f"server: masked input from client {u}, which did not share keys")
        if u in self._masked:
            raise ReplayedMessage(f"server: client {u} already sent its masked input")
        y = msg.y
        if not isinstance(y, np.ndarray) or y.dtype != cfg.dtype or y.shape != (cfg.length,):
            raise ProtocolError(f"server: masked input from client {u} is not a ({cfg.length},) {cfg.dtype} vector")
        if cfg.narrow and int(y.max(initial=0)) >> cfg.bits:
            raise ProtocolError(f"server: masked input from client {u} has values outside Z_2^{cfg.bits}")
        np.add(self._sum, y, out=self._sum)  # only the running sum is kept
        self._masked.add(u)

    def receive_masked_sum(self, session: bytes, senders, y: np.ndarray) -> None:
        """Round 2 for several clients at once: ``y`` is the sum mod 2^bits of their masked inputs,
        added up by a relay that trained them (a Ray actor); the same checks as one by one."""
        cfg, senders = self.config, sorted(senders)
        if session != cfg.session:
            raise ReplayedMessage("server: a masked sum belongs to another round (session id mismatch)")
        if self.stage != "mask":
            raise ProtocolError(f"server: got a masked sum while in stage {self.stage!r}")
        if len(set(senders)) != len(senders) or not senders:
            raise ProtocolError(f"server: a masked sum must name distinct senders, got {senders[:5]}")
        for u in senders:
            if u not in self._shares:
                raise ProtocolError(f"server: masked input from client {u}, which did not share keys")
            if u in self._masked:
                raise ReplayedMessage(f"server: client {u} already sent its masked input")
        if not isinstance(y, np.ndarray) or y.dtype != cfg.dtype or y.shape != (cfg.length,):
            raise ProtocolError(f"server: a masked sum is not a ({cfg.length},) {cfg.dtype} vector")
        np.add(self._sum, y, out=self._sum)
        self._masked.update(senders)

    def close_masked_input(self) -> UnmaskRequest:
        if self.stage != "mask":
            raise ProtocolError(f"server: cannot close masked input in stage {self.stage!r}")
        self._need(len(self._masked), "clients sent masked inputs")
        self.stage = "unmask"
        return UnmaskRequest(self.config.session, frozenset(self._masked))

    # -- round 3 ------------------------------------------------------------------------
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._expect("unmask", msg)
        v, cfg = msg.sender, self.config
        if v not in self._masked:
            raise ProtocolError(f"server: unmask response from client {v}, which is not a survivor")
        if v in self._revealed:
            raise ReplayedMessage(f"server: client {v} already sent its unmask shares")
        u2, u3 = set(self._shares), self._masked
        want_b = u3 & (self.graph[v] | {v})
        want_s = (u2 - u3) & self.graph[v]
        if set(msg.b_shares) != want_b or set(msg.s_shares) != want_s:
            raise ProtocolError(
                f"server: client {v} must reveal b-shares for exactly its surviving "
                f"neighbours and s-shares for exactly its dropped ones"
            )
        for kind, revealed in ((b"b", msg.b_shares), (b"s", msg.s_shares)):
            idx = 0 if kind == b"b" else 1
            for u, (share, salt) in revealed.items():
                expect = self._shares[u].commitments[v][idx]
                if _share_commitment(cfg.session, u, v, kind, share, salt) != expect:
                    raise TamperedMessage(
                        f"server: client {v}'s share of client {u}'s "
                        f"{'self-mask seed' if idx == 0 else 'mask key'} does not match its commitment"
                    )
                try:
                    shamir.share_from_bytes(share)
                except ValueError as e:
                    raise TamperedMessage(f"server: client {v}'s share of client {u}: {e}") from None
        self._revealed[v] = msg

    def finish(self) -> np.ndarray:
        """Remove all masks and return sum_{u in U3} x_u (mod 2^bits). Aborts if any secret lacks t shares."""
        if self.stage != "unmask":
            raise ProtocolError(f"server: cannot finish in stage {self.stage!r}")
        cfg, u3 = self.config, self._masked
        dropped = set(self._shares) - u3
        self._need(len(self._revealed), "survivors sent unmask shares")
        b_shares = {u: {} for u in u3}
        s_shares = {u: {} for u in dropped if self.graph[u] & u3}  # no surviving neighbour: no mask to remove
        for v, msg in self._revealed.items():
            for u, (share, _) in msg.b_shares.items():
                b_shares[u][v] = shamir.share_from_bytes(share)
            for u, (share, _) in msg.s_shares.items():
                s_shares[u][v] = shamir.share_from_bytes(share)
        # Check every secret is recoverable before reconstructing any of them.
        for what, table in (("self-mask seed", b_shares), ("mask key", s_shares)):
            for u, got in table.items():
                self._need(len(got), f"shares of client {u}'s {what}")

        def first_t(got: dict[int, int]) -> dict[int, int]:
            return {x: got[x] for x in sorted(got)[: cfg.t]}

        prg = self._prg or PRG(cfg.length, cfg.dtype)
        total = self._sum
        for u in sorted(b_shares):
            b = shamir.combine(first_t(b_shares[u]))
            if K.commit(b"flotilla-secagg b", cfg.session, K.ident(u), b) != self._shares[u].b_commitment:
                self._abort(f"client {u} dealt inconsistent shares of its self-mask seed")
            prg.add_into(total, b, -1)
        for u in sorted(s_shares):
            sk = K.private_from_bytes(shamir.combine(first_t(s_shares[u])))
            if K.public_bytes(sk) != self.keys[u][1]:
                self._abort(f"client {u} dealt inconsistent shares of its mask key")
            for v in sorted(self.graph[u] & u3):
                seed = K.derive(sk, self.keys[v][1], cfg.session, _mask_info(u, v))
                prg.add_into(total, seed, -1 if u > v else +1)  # undo v's term for the dropped u
        self.stage = "done"
        self._sum = None
        return cfg.reduce(total)
