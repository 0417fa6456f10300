"""Test-deployment credentials: a CA, a server certificate, client certificates and device tokens.

``flotilla certs DIR`` calls :func:`make_deployment`.  It writes::

    DIR/ca.pem, ca.key             the certificate authority (keep ca.key offline in production)
    DIR/server.pem, server.key     the server's certificate, valid for the given host names / IPs
    DIR/client.pem, client.key     one client certificate (for servers that require mutual TLS)
    DIR/tokens.json                the server's device table: id -> sha256(token), role
    DIR/tokens.txt                 "<id> <token>" per line: hand each device its own line

Keys are ECDSA P-256 (fast to make, supported by gRPC).  Tokens are 256-bit random strings;
the server stores only their SHA-256.  Private keys and tokens.txt are written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key,
    issuer_name: x509.Name,
    issuer_key,
    *,
    ca: bool,
    days: int,
    sans: list[x509.GeneralName] | None = None,
    usage=None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key", "tokens.json", "tokens.txt")


def existing_files(out_dir: str | os.PathLike) -> list[str]:
    """The deployment files already in ``out_dir`` (which :func:`make_deployment` would overwrite)."""
    return [n for n in FILES if (Path(out_dir) / n).exists()]


def make_deployment(
    out_dir: str | os.PathLike,
    hosts: list[str] | tuple[str, ...] = ("localhost", "127.0.0.1"),
    devices: int = 10,
    days: int = 30,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a CA, server and client certificates and ``devices`` device tokens (plus one admin
    token) into ``out_dir``; return the written paths by name."""
    if devices < 0:
        raise ValueError(f"devices: must be >= 0, got {devices}")
    if not hosts:
        raise ValueError("hosts: give at least one host name or IP address for the server certificate")
    out = Path(out_dir)
    existing = existing_files(out)
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; choose an empty folder (or overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    names = list(FILES)

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flotilla test CA")])
    ca_cert = _cert("flotilla test CA", ca_key, ca_name, ca_key, ca=True, days=days)
    server_key = _key()
    server_cert = _cert(
        hosts[0],
        server_key,
        ca_name,
        ca_key,
        ca=False,
        days=days,
        sans=[_san(h) for h in hosts],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key = _key()
    client_cert = _cert(
        "flotilla device", client_key, ca_name, ca_key, ca=False, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )

    pem = serialization.Encoding.PEM
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    _write_private(out / "ca.key", _key_pem(ca_key))
    (out / "server.pem").write_bytes(server_cert.public_bytes(pem))
    _write_private(out / "server.key", _key_pem(server_key))
    (out / "client.pem").write_bytes(client_cert.public_bytes(pem))
    _write_private(out / "client.key", _key_pem(client_key))

    width = max(3, len(str(max(devices - 1, 0))))
    # A fixed prefix makes tokens recognisable (secret scanners, logs) and never starts with "-",
    # which a command line would read as an option.
    tokens = {f"device-{i:0{width}d}": "flt_" + secrets.token_urlsafe(32) for i in range(devices)}
    tokens["admin"] = "flt_" + secrets.token_urlsafe(32)
    table = {
        "devices": {
            name: {"sha256": token_hash(t), "role": "admin" if name == "admin" else "device"}
            for name, t in tokens.items()
        }
    }
    (out / "tokens.json").write_text(json.dumps(table, indent=1) + "\n")
    _write_private(out / "tokens.txt", "".join(f"{name} {t}\n" for name, t in tokens.items()).encode())
    return {n.replace(".", "_"): out / n for n in names}


def read_tokens_txt(path: str | os.PathLike) -> dict[str, str]:
    """``id -> token`` from a tokens.txt written by :func:`make_deployment`."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, token = line.split()
            out[name] = token
    return out
