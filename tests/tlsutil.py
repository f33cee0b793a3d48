"""Test-time TLS material (openssl on the machine; no ``cryptography`` package) and web-config files."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import bcrypt


def make_cert(directory: Path, name: str, cn: str = "localhost",
              sans: str = "IP:127.0.0.1,IP:::1,DNS:localhost") -> tuple[Path, Path]:
    """A self-signed EC certificate and key: ``name.pem``, ``name.key``."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={sans}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def bcrypt_hash(password: str) -> str:
    # Cost 4, the minimum: the tests check the logic, not bcrypt's slowness.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def client_context(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Trusts ``ca`` (the server's self-signed certificate); presents ``cert`` if given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx
