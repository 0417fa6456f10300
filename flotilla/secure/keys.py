"""The few public-key and symmetric primitives the protocols need, from ``cryptography``.

X25519 key agreement -> HKDF-SHA256 (salted with the round's session id, with an ``info`` string
naming the purpose and the parties) -> 32-byte keys for AES-256-GCM or for the mask PRG.  Binding
purpose, parties and round into every derived key means a key can never be reused across them.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flotilla.secure.errors import ProtocolError, TamperedMessage

KEY_BYTES = 32
NONCE_BYTES = 12
_RAW = dict(encoding=serialization.Encoding.Raw)


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(format=serialization.PublicFormat.Raw, **_RAW)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(
        format=serialization.PrivateFormat.Raw, encryption_algorithm=serialization.NoEncryption(), **_RAW
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def derive(sk: X25519PrivateKey, peer_public: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF(X25519(sk, peer)) -> 32 bytes. Invalid or low-order peer keys raise ProtocolError."""
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise ProtocolError(f"invalid X25519 public key: {e}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """AES-256-GCM; the random nonce travels in front of the ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes, what: str = "ciphertext") -> bytes:
    """Inverse of ``seal``; any change to key, nonce, ciphertext, tag or ``ad`` raises TamperedMessage."""
    if len(blob) < NONCE_BYTES + 16:
        raise TamperedMessage(f"{what}: too short to be an AES-GCM ciphertext")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag:
        raise TamperedMessage(f"{what}: authentication failed (tampered, misrouted or from another round)") from None


def commit(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts (unambiguous concatenation)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()


def ident(i: int) -> bytes:
    """Fixed-width encoding of a protocol party id for use in ``info`` / associated data."""
    return int(i).to_bytes(8, "big")
