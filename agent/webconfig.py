"""The web-config file Prometheus exporters share: TLS and basic auth for the endpoint.

The format is exporter-toolkit's (``--web.config.file``, as node_exporter), a YAML
file with ``tls_server_config``, ``http_server_config`` and ``basic_auth_users``.
It is read at start, on SIGHUP and by ``check-config``; a file that cannot be used
is refused with one line naming the file and the key, never half-applied (on
SIGHUP the endpoint then keeps the web config it has).

What Python's ``ssl`` module cannot do as Go's ``crypto/tls`` does is refused
rather than silently ignored: ``cipher_suites`` and ``curve_preferences`` (Go
names, OpenSSL's defaults apply here), the client auth types that accept a
client certificate without verifying it, and ``rate_limit``.

Relative file names are resolved against the directory of the web-config file,
as exporter-toolkit does. Passwords are bcrypt hashes (the optional ``bcrypt``
package: ``pip install 'gpu-cost-agent[web]'``); a successful check is cached
per user and password, so a scrape costs one bcrypt computation per process,
not one per request; so is a failure, and a password over bcrypt's 72 bytes is refused
without one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import ConfigError
from .cost import format_validation_error

TlsVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
ClientAuthType = Literal[
    "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"
]
_VERIFYING = {"VerifyClientCertIfGiven": ssl.CERT_OPTIONAL, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
#: bcrypt's modular crypt format: $2a$, $2b$ or $2y$, cost, 22 characters of salt and 31 of hash.
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")


class WebConfigError(ConfigError):
    """A web-config file that cannot be used. ``str()`` is one line naming the file and key.

    A :class:`~agent.config.ConfigError`, so callers that refuse a bad configuration need
    not import this module (which only a ``--web.config.file`` needs)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TlsServerConfig(_Strict):
    cert_file: str | None = None
    key_file: str | None = None
    cert: str | None = None
    key: str | None = Field(None, repr=False)
    client_auth_type: ClientAuthType = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = None
    client_allowed_sans: list[str] = []
    min_version: TlsVersion = "TLS12"
    max_version: TlsVersion = "TLS13"
    cipher_suites: list[str] = []
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[str] = []

    @field_validator("client_auth_type")
    @classmethod
    def _auth_type(cls, v: str) -> str:
        if v in ("RequestClientCert", "RequireAnyClientCert"):
            raise ValueError(
                f"{v} (a client certificate accepted without verifying it) is not supported; "
                "use RequireAndVerifyClientCert with client_ca_file"
            )
        return v

    @field_validator("cipher_suites", "curve_preferences")
    @classmethod
    def _go_only(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("not supported by gpu-cost-agent (OpenSSL's defaults apply); remove it")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TlsServerConfig":
        if self.cert_file and self.cert:
            raise ValueError("give cert_file or cert, not both")
        if self.key_file and self.key:
            raise ValueError("give key_file or key, not both")
        if self.client_ca_file and self.client_ca:
            raise ValueError("give client_ca_file or client_ca, not both")
        has_cert, has_key = bool(self.cert_file or self.cert), bool(self.key_file or self.key)
        if has_cert != has_key:
            raise ValueError("cert_file and key_file go together" if has_cert else "key_file without cert_file")
        has_ca = bool(self.client_ca_file or self.client_ca)
        verifies = self.client_auth_type in _VERIFYING
        if has_ca and not verifies:
            raise ValueError("client_ca_file requires client_auth_type VerifyClientCertIfGiven "
                             "or RequireAndVerifyClientCert")
        if verifies and not has_ca:
            raise ValueError(f"client_auth_type {self.client_auth_type} requires client_ca_file")
        if self.client_allowed_sans and self.client_auth_type != "RequireAndVerifyClientCert":
            raise ValueError("client_allowed_sans requires client_auth_type RequireAndVerifyClientCert")
        if _TLS_VERSIONS[self.min_version] > _TLS_VERSIONS[self.max_version]:
            raise ValueError(f"min_version {self.min_version} is above max_version {self.max_version}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.cert)


class Headers(_Strict):
    content_security_policy: str | None = Field(None, alias="Content-Security-Policy")
    x_frame_options: Literal["deny", "sameorigin"] | None = Field(None, alias="X-Frame-Options")
    x_content_type_options: Literal["nosniff"] | None = Field(None, alias="X-Content-Type-Options")
    x_xss_protection: str | None = Field(None, alias="X-XSS-Protection")
    strict_transport_security: str | None = Field(None, alias="Strict-Transport-Security")

    @field_validator("*")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and any(c in v for c in "\r\n\0"):
            raise ValueError("a header value must be one line")
        if v is not None and not v.isascii():
            raise ValueError("a header value must be ASCII text")
        return v


class HttpServerConfig(_Strict):
    #: Accepted for compatibility; the agent speaks HTTP/1.1 only (clients fall back to it).
    http2: bool = True
    headers: Headers = Headers()


class RateLimit(_Strict):
    interval: Any = None
    burst: Any = None

    @model_validator(mode="after")
    def _unsupported(self) -> "RateLimit":
        raise ValueError("not supported by gpu-cost-agent; remove it")


class WebConfigFile(_Strict):
    tls_server_config: TlsServerConfig = TlsServerConfig()
    http_server_config: HttpServerConfig = HttpServerConfig()
    basic_auth_users: dict[str, str] = {}
    rate_limit: RateLimit | None = None

    @field_validator("basic_auth_users")
    @classmethod
    def _users(cls, users: dict[str, str]) -> dict[str, str]:
        for name, hashed in users.items():
            if not name or ":" in name:
                raise ValueError(f"{name!r}: a user name must be non-empty and without ':'")
            if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
                raise ValueError(f"{name}: not a bcrypt hash (generate one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        return users


#: bcrypt reads at most 72 bytes of a password (bcrypt 5 raises on more): a longer one can never
#: match a hash made by a checking tool, so it is refused without running bcrypt at all.
MAX_PASSWORD_BYTES = 72
#: Wrong (user, password) pairs remembered: a client that repeats a wrong password (a misconfigured
#: Prometheus, a replayed guess) is answered from memory, not with another bcrypt computation.
BAD_CACHE = 4096


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes, caching successes and failures.

    The caches hold an HMAC of user and password under a key made at start, never a password.
    :meth:`verify` is the only costly call (a bcrypt computation, tens of ms); the endpoint runs
    it on its own thread and decides how often (:class:`agent.http.MetricsServer`).
    """

    def __init__(self, users: dict[str, str]) -> None:
        import bcrypt  # checked by load()

        self._bcrypt = bcrypt
        self._users = {name: h.encode() for name, h in users.items()}
        # Unknown users are checked against a real hash too, so a reply's timing
        # does not tell which user names exist.
        self._dummy = bcrypt.hashpw(b"gpu-cost-agent", bcrypt.gensalt(rounds=10))
        self._key = os.urandom(32)  # the cache never holds a password, only an HMAC of it
        self._ok: set[bytes] = set()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.checks = 0  # bcrypt computations done

    def _cache_key(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._key, user.encode() + b"\0" + password, hashlib.sha256).digest()

    def known(self, user: str, password: bytes) -> bool | None:
        """True or False when the answer needs no bcrypt (a cached verdict, an over-long
        password), None when it does."""
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        key = self._cache_key(user, password)
        with self._lock:
            if key in self._ok:
                return True
            if key in self._bad:
                self._bad.move_to_end(key)
                return False
        return None

    def verify(self, user: str, password: bytes) -> bool:
        """Check with bcrypt (tens of ms: run it off the event loop) and remember the verdict."""
        known = self.known(user, password)
        if known is not None:
            return known
        hashed = self._users.get(user)
        self.checks += 1
        ok = self._bcrypt.checkpw(password, hashed if hashed is not None else self._dummy) and hashed is not None
        key = self._cache_key(user, password)
        with self._lock:
            if ok:
                if len(self._ok) >= 1024:  # bounded: a handful of real scrapers ever need a slot
                    self._ok.clear()
                self._ok.add(key)
            else:
                self._bad[key] = None
                if len(self._bad) > BAD_CACHE:
                    self._bad.popitem(last=False)
        return ok

    def cached(self, header: str | None) -> bool:
        """True when this header was already verified: the cheap path of every scrape."""
        creds = parse_basic(header)
        return creds is not None and self.known(*creds) is True

    def check(self, header: str | None) -> bool:
        """Verify the header: :meth:`verify` for ``Authorization: Basic`` credentials."""
        creds = parse_basic(header)
        return creds is not None and self.verify(*creds)


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) of an ``Authorization: Basic`` header; None when it is absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class WebConfig:
    """A validated web-config: the TLS context (or None), basic auth (or None), extra headers."""

    def __init__(self, path: Path, parsed: WebConfigFile) -> None:
        self.path = path
        self.parsed = parsed
        self.ssl_context = _ssl_context(path, parsed.tls_server_config) if parsed.tls_server_config.enabled else None
        self.auth = BasicAuth(parsed.basic_auth_users) if parsed.basic_auth_users else None
        h = parsed.http_server_config.headers
        self.headers = {
            Headers.model_fields[name].alias: value
            for name, value in h.model_dump().items()
            if value is not None
        }
        self.allowed_sans = set(parsed.tls_server_config.client_allowed_sans)

    def describe(self) -> str:
        t = self.parsed.tls_server_config
        parts = []
        if self.ssl_context is None:
            parts.append("plain HTTP")
        else:
            parts.append(f"TLS {t.min_version}-{t.max_version}")
            if t.client_auth_type != "NoClientCert":
                parts.append(f"client certificates: {t.client_auth_type}")
        n = len(self.parsed.basic_auth_users)
        parts.append(f"basic auth for {n} user{'s' if n != 1 else ''}" if n else "no basic auth")
        return ", ".join(parts)


def load(path: str | Path) -> WebConfig:
    """Read and validate a web-config file. Raises :class:`WebConfigError` (one line)."""
    path = Path(path)
    try:
        import yaml
    except ImportError:
        raise WebConfigError(f"{path}: reading a web config needs PyYAML: pip install 'gpu-cost-agent[web]'") from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise WebConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(f"{path}: expected a map of settings at the top level")
    try:
        parsed = WebConfigFile.model_validate(data)
    except ValidationError as exc:
        raise WebConfigError(f"{path}: {format_validation_error(exc)}") from None
    if parsed.basic_auth_users:
        from importlib.util import find_spec

        if find_spec("bcrypt") is None:
            raise WebConfigError(
                f"{path}: basic_auth_users needs the bcrypt package: pip install 'gpu-cost-agent[web]'"
            )
    return WebConfig(path, parsed)


def _ssl_context(path: Path, t: TlsServerConfig) -> ssl.SSLContext:
    base = path.parent

    def resolve(name: str, key: str) -> str:
        """The file's full name, once it is known to hold PEM data of the right kind."""
        full = base / Path(name).expanduser()
        try:
            data = full.read_bytes()
        except OSError as exc:
            raise WebConfigError(f"{path}: tls_server_config.{key}: cannot read {full}: "
                                 f"{(exc.strerror or str(exc)).lower()}") from None
        marker, what = (b"PRIVATE KEY-----", "private key") if key == "key_file" else (b"-----BEGIN CERTIFICATE-----",
                                                                                      "certificate")
        if marker not in data:
            raise WebConfigError(f"{path}: tls_server_config.{key}: no PEM {what} in {full}")
        return str(full)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[t.min_version]
    ctx.maximum_version = _TLS_VERSIONS[t.max_version]
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        if t.cert is not None or t.key is not None:
            _load_inline_chain(ctx, t, resolve)
        else:
            assert t.cert_file and t.key_file
            ctx.load_cert_chain(resolve(t.cert_file, "cert_file"), resolve(t.key_file, "key_file"))
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(
            f"{path}: tls_server_config: cannot load the certificate and key: {_ssl_reason(exc)}"
        ) from None
    if t.client_auth_type in _VERIFYING:
        ctx.verify_mode = _VERIFYING[t.client_auth_type]
        try:
            if t.client_ca is not None:
                ctx.load_verify_locations(cadata=t.client_ca)
            else:
                assert t.client_ca_file
                ctx.load_verify_locations(cafile=resolve(t.client_ca_file, "client_ca_file"))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise WebConfigError(
                f"{path}: tls_server_config: cannot load the client CA: {_ssl_reason(exc)}"
            ) from None
    return ctx


def _load_inline_chain(ctx: ssl.SSLContext, t: TlsServerConfig, resolve: Any) -> None:
    """``cert``/``key`` given inline: ssl loads chains from files only, so a private temp file."""
    with tempfile.TemporaryDirectory(prefix="gpucost-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert = resolve(t.cert_file, "cert_file") if t.cert_file else os.path.join(tmp, "cert.pem")
        key = resolve(t.key_file, "key_file") if t.key_file else os.path.join(tmp, "key.pem")
        for inline, name in ((t.cert, cert), (t.key, key)):
            if inline is not None:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(inline)
        ctx.load_cert_chain(cert, key)


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLError) and reason:
        return {"PEM_LIB": "not a PEM certificate", "KEY_VALUES_MISMATCH": "the key does not match the certificate",
                "NO_START_LINE": "no PEM data found"}.get(reason, reason.lower().replace("_", " "))
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def peer_allowed(peercert: dict[str, Any] | None, allowed: set[str]) -> bool:
    """``client_allowed_sans``: some Subject Alternative Name of the client certificate is listed."""
    if not allowed:
        return True
    if not peercert:
        return False
    return any(value in allowed for _kind, value in peercert.get("subjectAltName", ()))
