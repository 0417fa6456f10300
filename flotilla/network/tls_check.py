"""Check a server's TLS files before serving: each readable, PEM, and the key the certificate's.

gRPC reports a key that does not match its certificate only as "Failed to bind" when the port
is opened; :func:`check_tls_pair` says which file is wrong, in one line, before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TLSFilesError(ValueError):
    """A TLS file is missing, unreadable, not PEM, or the key is not the certificate's."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSFilesError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def check_tls_pair(
    cert: str | Path, key: str | Path, *, cert_key: str = "network.tls.cert", key_key: str = "network.tls.key"
) -> None:
    """Raise :class:`TLSFilesError` naming the config key unless ``key`` is the private key of the
    first certificate in the PEM chain ``cert``."""
    cert_pem, key_pem = _read(cert, cert_key), _read(key, key_key)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise TLSFilesError(f"{cert_key}: {cert} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        why = "is encrypted (give an unencrypted key)" if isinstance(e, TypeError) else "is not a PEM private key"
        raise TLSFilesError(f"{key_key}: {key} {why}") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*fmt) != certificate.public_key().public_bytes(*fmt):
        raise TLSFilesError(f"{key_key}: {key} is not the private key of the certificate {cert} ({cert_key})")
