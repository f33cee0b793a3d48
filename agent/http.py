"""The HTTP endpoint: ``/metrics``, ``/healthz`` and an index page, built for scrape storms.

One event-loop thread owns every connection, so an idle, slow or half-open
client costs a file descriptor and a timer, never a thread. Rendering the
exposition runs on a bounded pool of ``WORKERS`` threads; bcrypt checks run on
a thread of their own, never on those. Every connection must deliver a complete
request head within ``idle_timeout`` seconds (also the keep-alive idle time) and
read its response within ``write_timeout``; otherwise it is closed.

Nobody can take the scrapers' places (docs/endpoint.md has the figures):

* **Connections.** The server accepts connections itself, so every limit applies
  before any TLS or HTTP work. One client address (an IPv4 address, an IPv6 /64)
  holds at most ``max_per_address`` connections; more are reset at once. When
  ``max_connections`` are open, a new connection takes the place of one from the
  address holding the most connections, if that address holds more than the
  newcomer's would (otherwise it is reset): the one that has waited longest for
  its client (in its TLS handshake, before a request head, reading a response),
  else its oldest. A flood from any number of addresses cannot keep a scraper
  out, nor make room at the expense of an address holding less than the flood.
* **Passwords.** A password over 72 bytes, a wrong password already seen and a
  missing or malformed header are answered 401 without bcrypt; credentials once
  verified are let in without it. Every client address may cost at most
  ``AUTH_FAILURE_BURST`` failed checks, then one more every
  ``AUTH_FAILURE_REFILL`` seconds; beyond that it is answered 429 (Retry-After)
  without a check, and each such answer costs it as much as a failure. Checks
  wait in a queue of ``AUTH_QUEUE`` (in arrival order, addresses that never
  failed a check first; 429 after ``AUTH_MAX_WAIT`` s) for the one bcrypt
  thread, which rests after each check so that it uses at most
  ``AUTH_CPU_SHARE`` of one core. Refused credentials are
  answered after ``AUTH_REFUSAL_DELAY`` s, so a client that asks again at once
  costs a few requests a second; refusals are logged at most once a minute, with
  a count of the rest.
* **File descriptors.** ``max_connections`` is at most half the process's limit
  on open files; out of descriptors, accepting pauses 0.1 s (one log line a
  minute) instead of asyncio's traceback per attempt.

The exposition is rendered once per snapshot and content type, and gzipped once
when a client accepts gzip: every scraper of the same tick is served the same
bytes. ``process_*`` metrics are thereby at most ``max_age`` seconds old.

The listening socket is bound by :func:`open_listener` before the agent starts
its sources, so a taken port stops the agent with one line naming the address
before anything that looks like a good start is logged. TLS and basic auth come
from the web-config file (:mod:`agent.webconfig`) and guard every path,
``/healthz`` included, as node_exporter does.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import itertools
import json
import logging
import math
import socket
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .config import parse_listen

if TYPE_CHECKING:
    from .webconfig import WebConfig

log = logging.getLogger(__name__)

#: Listen backlog: a burst of scrapers waits in the kernel queue rather than
#: being refused (the kernel caps it at net.core.somaxconn, 4096 on current Linux).
BACKLOG = 1024
#: Threads that render the exposition; connections never hold one, nor do password checks.
WORKERS = 2
#: Open connections, all addresses together: file descriptors stay for the agent's own work.
MAX_CONNECTIONS = 512
#: Open connections from one client address (IPv4 address, IPv6 /64): half the endpoint, so one
#: address never holds every slot, and a 200-scraper storm from one Prometheus host still fits.
MAX_PER_ADDRESS = 256
#: bcrypt checks waiting for the password thread; more are answered 429.
AUTH_QUEUE = 16
#: The most of one core that bcrypt checks may use: the thread pauses after each check.
AUTH_CPU_SHARE = 0.5
#: Seconds a request waits for its check at most (then 429): well inside Prometheus' 10 s timeout.
AUTH_MAX_WAIT = 5.0
#: Failed bcrypt checks one client address may cost at once, and then one per this many seconds.
AUTH_FAILURE_BURST = 5
AUTH_FAILURE_REFILL = 2.0
#: Seconds before refused credentials are answered (401 or 429; not a request without any).
AUTH_REFUSAL_DELAY = 0.5
#: Client addresses whose failures are remembered (the least recent are forgotten first).
AUTH_CLIENTS = 4096
#: Seconds between two log lines of one kind (refused connections, failed passwords).
LOG_EVERY = 60.0
#: Connections taken per wake-up of the listening socket: a flood of connections to refuse
#: (about 30 µs each) holds up the requests of those already in for at most this many.
ACCEPT_BATCH = 64
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
SERVER = f"gpu-cost-agent/{__version__}"


class ListenError(Exception):
    """The endpoint cannot listen. ``str()`` is one line naming the address."""


@dataclass
class Listener:
    """A bound, listening socket, and the web config that guards it (None: plain HTTP, no auth)."""

    sock: socket.socket
    listen: str
    web: WebConfig | None = None

    @property
    def tls(self) -> bool:
        return self.web is not None and self.web.ssl_context is not None

    def close(self) -> None:
        self.sock.close()


def bind(listen: str, backlog: int = BACKLOG) -> socket.socket:
    """Bind and listen on ``HOST:PORT`` (IPv4, ``[IPv6]`` or a host name). Raises :class:`ListenError`."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen}: {_reason(exc)}") from None
    try:
        # A restart must not fail on the previous process's TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            # [::] serves IPv4 too, as Go's listeners (node_exporter) do.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {listen}: {_reason(exc)}") from None
    return sock


def _fd_limit() -> int:
    """This process's soft limit on open files (a large number when there is none)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1 << 20
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no such address on this host"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _peer_allowed(peercert: dict[str, Any] | None, allowed: set[str]) -> bool:
    from .webconfig import peer_allowed  # loaded already: only a web config sets allowed SANs

    return peer_allowed(peercert, allowed)


def open_listener(listen: str, web: WebConfig | None = None) -> Listener:
    """Bind (raises ListenError); ``web`` (a loaded web config, None: plain HTTP) guards it."""
    return Listener(bind(listen), listen, web)


@dataclass
class _Rendered:
    snapshot: Any
    at: float
    content_type: str
    plain: bytes
    gz: bytes | None = None


class Exposition:
    """``/metrics`` bodies, rendered once per snapshot and content type.

    ``snapshot`` returns the current snapshot; the sampler replaces the object
    every tick, so an identity check tells a new tick from the old one. The
    rendered entry holds a reference to its snapshot, so the identity cannot be
    reused while it is cached. ``max_age`` bounds how old ``process_*`` metrics
    (not part of the snapshot) can be when no new tick comes (a finished replay).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        snapshot: Callable[[], Any] | None = None,
        max_age: float = 1.0,
        latest: Callable[[], Any] | None = None,
    ) -> None:
        self.registry = registry
        self.snapshot = snapshot or (lambda: None)
        #: The newest snapshot, read without side effects (the event loop's fast path); default:
        #: ``snapshot``. ``snapshot`` itself may do work first (the service saves the totals).
        self.latest = latest or self.snapshot
        self.max_age = max_age
        self.renders = 0
        self._entries: dict[str, _Rendered] = {}
        self._lock = threading.Lock()

    def _current(self, content_type: str, snap: Any, now: float) -> _Rendered | None:
        """The cached rendering of ``content_type`` if it is of ``snap`` and young enough."""
        entry = self._entries.get(content_type)
        if entry is None or entry.snapshot is not snap or now - entry.at > self.max_age:
            return None
        return entry

    def body(self, accept: str, want_gzip: bool) -> tuple[str, bytes, bool]:
        """(content type, bytes, gzipped) for a scrape. Thread-safe; renders only on a miss."""
        encoder, content_type = negotiate(accept)
        with self._lock:  # one render per miss, however many scrapers arrive at once
            snap = self.snapshot()
            now = time.monotonic()
            entry = self._current(content_type, snap, now)
            if entry is None:
                entry = _Rendered(snap, now, content_type, encoder(self.registry))
                self._entries.pop(content_type, None)
                self._entries[content_type] = entry
                while len(self._entries) > MAX_RENDERINGS:  # the least recently rendered go first
                    del self._entries[next(iter(self._entries))]
                self.renders += 1
            if not want_gzip:
                return content_type, entry.plain, False
            if entry.gz is None:
                entry.gz = gzip.compress(entry.plain, compresslevel=6, mtime=0)
            return content_type, entry.gz, True

    def fresh(self, accept: str, want_gzip: bool) -> tuple[str, bytes, bool] | None:
        """The cached body if it is still current, without rendering: the event loop's fast path."""
        _, content_type = negotiate(accept)
        entry = self._current(content_type, self.latest(), time.monotonic())
        if entry is None:
            return None
        if want_gzip:
            return (content_type, entry.gz, True) if entry.gz is not None else None
        return content_type, entry.plain, False


#: Renderings kept: one per content type a scraper asks for (a handful exist, see :func:`negotiate`).
MAX_RENDERINGS = 16
#: Exposition versions a client may name; any other is read as the nearest one below it.
_VERSIONS = {"0.0.1", "0.0.4", "1.0.0", "2.0.0"}


def _version(value: str) -> str | None:
    """The version named in an ``Accept`` parameter as one prometheus_client renders, or None."""
    if value in _VERSIONS:
        return value
    parts = value.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        return None  # '²', 'abc', '1..0': as if no version were named
    number = tuple(int(p) for p in parts)
    return "2.0.0" if number >= (2,) else "1.0.0" if number >= (1,) else "0.0.4"


@lru_cache(maxsize=64)  # a scraper sends the same Accept every time: parsed once
def negotiate(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """prometheus_client's content negotiation, for any ``Accept`` a client sends.

    The client library compares versions without checking them (``version=²`` raises) and
    echoes any version it is given into the content type, which is also the render cache's key:
    versions are reduced to the few it renders, so neither a bad header nor a stream of made-up
    versions can cost more than those renderings."""
    if "version=" in accept:
        media = []
        for part in accept.split(","):
            params = []
            for param in part.split(";"):
                key, sep, value = param.strip().partition("=")
                if sep and key == "version":
                    version = _version(value)
                    if version is None:
                        continue
                    param = f"version={version}"
                params.append(param)
            media.append(";".join(params))
        accept = ",".join(media)
    try:
        return choose_encoder(accept)
    except Exception:  # a client library stricter or looser than this one: what no Accept gets
        return choose_encoder("")


def accepts_gzip(value: str) -> bool:
    """``Accept-Encoding`` names gzip (or ``*``) with a non-zero quality."""
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if name not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return "keep-alive" in conn


def _parse_head(head: bytes) -> _Request:
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or HTTP/1.1 only")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header")
        key = name.decode("latin-1").lower()
        val = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return _Request(method, target, version, headers)


def client_key(address: Any) -> str:
    """The client address the per-address limits count by: the IPv4 address (also when it
    comes as ``::ffff:a.b.c.d``), or the /64 of an IPv6 address (one host's usual share)."""
    host = address[0] if isinstance(address, tuple) else str(address)
    if ":" not in host:
        return host  # IPv4, as accept() gives it: dotted quad already (the common case, kept cheap)
    import ipaddress  # IPv6 clients only: not held by every daemon

    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))}"
    return str(ip)


class _Every:
    """At most one log line per ``interval`` seconds; what is held back is counted into the next."""

    def __init__(self, interval: float = LOG_EVERY) -> None:
        self.interval = interval
        self._last = -math.inf
        self.held = 0

    def due(self) -> int | None:
        """The number held back since the last line when a line is due now, else None."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self.held += 1
            return None
        self._last, held, self.held = now, self.held, 0
        return held


def _since(held: int, what: str) -> str:
    return f" ({held} more {what} since the last such line)" if held else ""


_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close with a reset: no FIN handshake, no TIME_WAIT, nothing left to send."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


@dataclass(eq=False)
class _Conn:
    """One accepted connection. ``waiting`` (since ``since``): on its client, to finish the TLS
    handshake, send a request head or read a response; the first to make room for a newcomer."""

    client: str
    sock: socket.socket | None  # until asyncio's transport owns it
    task: asyncio.Task[None] | None = None
    waiting: bool = True
    since: float = field(default_factory=time.monotonic)
    released: bool = False


#: The verdicts of :class:`_AuthGate`: let in, 401 (no credentials: at once), 401, 429.
_OK, _ANONYMOUS, _DENIED, _BUSY = "ok", "anonymous", "denied", "busy"


@dataclass(eq=False)
class _Check:
    """A bcrypt check waiting for the password thread; every request with the same credentials
    (and the same web config) waits for the same one."""

    auth: Any
    user: str
    password: bytes
    client: str
    future: asyncio.Future[bool | None]  # None: never checked (made room for another), a 429
    key: tuple[int, str, bytes]
    order: int


@dataclass
class _Client:
    """What the password gate remembers of one client address."""

    credit: float  # failed checks it may still cost now (throttled requests cost too)
    at: float  # when credit was last set
    failed: bool = False  # a check from it has failed: it queues behind addresses that never failed


class _AuthGate:
    """Basic-auth verdicts, on the event loop. bcrypt runs on one thread of its own, at most
    ``AUTH_CPU_SHARE`` of a core, for at most ``AUTH_QUEUE`` waiting checks; a client address
    has credit for ``AUTH_FAILURE_BURST`` failed checks, and one more every
    ``AUTH_FAILURE_REFILL`` s. A request answered 429 costs credit too, so a client that keeps
    asking faster than that is answered 429 until it slows down. Checks wait in arrival order,
    except that those from addresses that never failed one go first."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-auth")
        self._queue: list[_Check] = []  # in arrival order; see _rank
        self._order = itertools.count()
        self._pending: dict[tuple[int, str, bytes], _Check] = {}
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._runner: asyncio.Task[None] | None = None
        self._log = _Every()
        self.checks = 0  # bcrypt checks run
        self.check_seconds = 0.0  # their wall time on the password thread
        self.throttled = 0  # answered 429 without a check
        self.denied = 0  # answered 401 with credentials

    # -- per-address credit: failed checks one client may still cost now --

    def credit(self, client: str) -> float:
        got = self._clients.get(client)
        if got is None:
            return float(AUTH_FAILURE_BURST)
        return min(float(AUTH_FAILURE_BURST), got.credit + (time.monotonic() - got.at) / AUTH_FAILURE_REFILL)

    def _add(self, client: str, amount: float, failed: bool = False) -> None:
        credit = max(0.0, min(float(AUTH_FAILURE_BURST), self.credit(client) + amount))
        got = self._clients.get(client)
        if got is None:
            got = self._clients[client] = _Client(credit, time.monotonic())
            while len(self._clients) > AUTH_CLIENTS:  # the least recently seen are forgotten
                self._clients.popitem(last=False)
        else:
            got.credit, got.at = credit, time.monotonic()
            self._clients.move_to_end(client)
        got.failed = got.failed or failed

    def _retry_after(self, client: str) -> int:
        return max(1, math.ceil((1.0 - self.credit(client)) * AUTH_FAILURE_REFILL))

    # -- verdicts --

    async def verdict(self, auth: Any, header: str | None, client: str) -> tuple[str, int]:
        """(``_OK`` | ``_ANONYMOUS`` | ``_DENIED`` | ``_BUSY``, seconds to retry after for ``_BUSY``)."""
        from .webconfig import MAX_PASSWORD_BYTES, parse_basic  # loaded: only a web config sets basic auth

        if not header:
            return _ANONYMOUS, 0  # a first request without credentials, as browsers send: not logged
        creds = parse_basic(header)
        if creds is None:
            return self._deny(client, "malformed Authorization header")
        user, password = creds
        known = auth.known(user, password)
        if known is True:
            return _OK, 0
        if known is False:
            return self._deny(client, "password over 72 bytes" if len(password) > MAX_PASSWORD_BYTES
                              else "a refused password again", user)
        key = (id(auth), user, password)
        check = self._pending.get(key)
        if check is None:
            if self.credit(client) < 1.0:
                return self._throttle(client, "too many failed passwords from this address")
            check = _Check(auth, user, password, client, asyncio.get_running_loop().create_future(), key,
                           next(self._order))
            if not self._enqueue(check):
                return self._throttle(client, "password checks busy")
            self._add(client, -1.0)  # reserved; given back if the password is right or never checked
        try:
            ok = await asyncio.wait_for(asyncio.shield(check.future), AUTH_MAX_WAIT)
        except TimeoutError:  # the thread is slower than the queue assumed (a starved CPU)
            if check in self._queue:
                self._queue.remove(check)
                self._drop(check)
            ok = None
        if ok is None:
            return self._throttle(client, "password checks busy")
        if ok:
            return _OK, 0
        return self._deny(client, "wrong password or unknown user", user)

    def _rank(self, check: _Check) -> tuple[bool, int]:
        """Checks from addresses that never failed one go first, in arrival order: whether an
        address has failed is read now, not when its check came (a flood's first checks)."""
        got = self._clients.get(check.client)
        return got is not None and got.failed, check.order

    def _enqueue(self, check: _Check) -> bool:
        if len(self._queue) >= AUTH_QUEUE:
            worst = max(self._queue, key=self._rank)
            if self._rank(check) >= self._rank(worst):
                return False
            self._queue.remove(worst)  # the last one from an address that has failed makes room
            self._drop(worst)
        self._queue.append(check)
        self._pending[check.key] = check
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return True

    def _drop(self, check: _Check) -> None:
        """A waiting check that will not run: its waiters are answered 429."""
        self._pending.pop(check.key, None)
        self._add(check.client, 1.0)
        if not check.future.done():
            check.future.set_result(None)  # type: ignore[arg-type]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                check = min(self._queue, key=self._rank)
                self._queue.remove(check)
                start = time.monotonic()
                try:
                    ok = bool(await loop.run_in_executor(self._pool, check.auth.verify, check.user, check.password))
                except Exception as exc:  # bcrypt refused something: a wrong password, not a dead endpoint
                    log.warning("http: password check failed: %r", exc)
                    ok = False
                took = time.monotonic() - start
                self.checks += 1
                self.check_seconds += took
                self._pending.pop(check.key, None)
                self._add(check.client, 1.0 if ok else 0.0, failed=not ok)  # the reservation given back or kept
                if not check.future.done():
                    check.future.set_result(ok)
                # Rest so that bcrypt takes at most AUTH_CPU_SHARE of one core.
                await asyncio.sleep(min(1.0, took * (1.0 - AUTH_CPU_SHARE) / AUTH_CPU_SHARE))
        finally:
            self._runner = None

    def _deny(self, client: str, why: str, user: str | None = None) -> tuple[str, int]:
        self.denied += 1
        held = self._log.due()
        if held is not None:
            who = f" as {user[:64]!r}" if user is not None else ""
            log.warning("http: basic auth refused for %s%s: %s%s", client, who, why,
                        _since(held, "refused or throttled"))
        return _DENIED, 0

    def _throttle(self, client: str, why: str) -> tuple[str, int]:
        self.throttled += 1
        self._add(client, -1.0)  # asking again at once only puts the next check off
        held = self._log.due()
        if held is not None:
            log.warning("http: basic auth throttled for %s (429): %s%s", client, why,
                        _since(held, "refused or throttled"))
        return _BUSY, self._retry_after(client)

    def close(self) -> None:
        for check in self._queue:
            if not check.future.done():
                check.future.cancel()
        self._queue.clear()
        self._pending.clear()
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/`` on an asyncio loop in its own thread.

    ``snapshot`` (optional) returns the snapshot to serve (called on a render worker, so
    renders are cached per tick), ``latest`` the newest one without side effects (the event
    loop's check of the cache). ``listener`` is a socket bound earlier by
    :func:`open_listener`; without one the server binds ``host:port`` itself.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        snapshot: Callable[[], Any] | None = None,
        latest: Callable[[], Any] | None = None,
        listener: Listener | None = None,
        idle_timeout: float = 5.0,
        write_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_PER_ADDRESS,
        workers: int = WORKERS,
    ) -> None:
        if listener is None:
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listener = Listener(bind(listen), listen)
        self.listener = listener
        self.exposition = Exposition(registry, snapshot, latest=latest)
        self.health = health
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        # Half the file descriptors at most: an agent started with a low limit keeps the rest for
        # its state file, /proc and the GPU library rather than failing to save.
        self.max_connections = min(max_connections, max(8, _fd_limit() // 2))
        self.max_per_address = max_per_address
        self.workers = workers
        self._set_web(listener.web)
        address = listener.sock.getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        self.connections = 0  # open now
        self.refused = 0  # reset at once: over max_per_address, or max_connections and nobody to make room
        self.evicted = 0  # waiting connections closed to make room for a newcomer
        self.auth = _AuthGate()
        self._by_client: dict[str, dict[_Conn, None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting: socket.socket | None = None
        self._accept_paused = False
        self._pool: ThreadPoolExecutor | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._refusal_log = _Every()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.listener.tls else 'http'}://{host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            self.listener.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        except Exception as exc:  # never let the endpoint hold up the final save
            log.debug("http shutdown: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.listener.close()

    def _set_web(self, web: WebConfig | None) -> None:
        """What each request is checked against: basic auth, allowed client SANs, extra headers."""
        self._auth = web.auth if web is not None else None
        self._sans = web.allowed_sans if web is not None else set()
        self._extra_headers = list(web.headers.items()) if web is not None else []

    def apply_web(self, web: WebConfig | None) -> None:
        """A web config read again (SIGHUP): basic auth, headers and allowed SANs apply from the
        next request, TLS from the next connection on the same port (connections open now keep
        the TLS they have)."""
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            self.listener.web = web
            self._set_web(web)
            return
        asyncio.run_coroutine_threadsafe(self._swap_web(web), loop).result(timeout=10)

    async def _swap_web(self, web: WebConfig | None) -> None:
        # On the loop: no request sees half of the old rules and half of the new.
        self.listener.web = web
        self._set_web(web)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="http-work")
        try:
            # A duplicate of the listening socket: closing it (stop) leaves the port bound until
            # the listener itself is closed.
            self._accepting = self.listener.sock.dup()
            self._accepting.setblocking(False)
            loop.add_reader(self._accepting.fileno(), self._accept)
        except BaseException as exc:  # pragma: no cover - the socket is already bound
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._stop_accepting()
        self.auth.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    def _stop_accepting(self) -> None:
        sock, self._accepting = self._accepting, None
        if sock is not None:
            if not self._accept_paused and self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()

    # -- accepting: every limit before any TLS or HTTP work -------------------

    def _accept(self) -> None:
        """The listening socket is readable: take up to ACCEPT_BATCH connections waiting; the
        loop serves what else is ready before it takes more."""
        sock = self._accepting
        if sock is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors: those waiting stay in the kernel's queue a moment.
                    held = self._refusal_log.due()
                    if held is not None:
                        log.warning("http: cannot accept connections: %s (%d open)%s", _reason(exc),
                                    self.connections, _since(held, "refused"))
                    self._pause_accepting(0.1)
                    return
                continue  # one connection gone before it was accepted (ECONNABORTED): the next
            self._admit(conn, client_key(address))

    def _pause_accepting(self, seconds: float) -> None:
        loop, sock = self._loop, self._accepting
        if loop is None or sock is None or self._accept_paused:
            return
        loop.remove_reader(sock.fileno())
        self._accept_paused = True

        def resume() -> None:
            self._accept_paused = False
            if self._accepting is not None:
                loop.add_reader(self._accepting.fileno(), self._accept)

        loop.call_later(seconds, resume)

    def _admit(self, sock: socket.socket, client: str) -> None:
        mine = self._by_client.get(client)
        held = len(mine) if mine is not None else 0
        if held >= self.max_per_address:
            return self._refuse(sock, client, "%d connections open from that address (the most one address may "
                                              "hold)", held)
        if self.connections >= self.max_connections and not self._make_room(held):
            return self._refuse(sock, client, "%d connections open (the most the endpoint holds), none from an "
                                              "address holding more", self.connections)
        sock.setblocking(False)
        conn = _Conn(client, sock)
        if mine is None:
            mine = self._by_client[client] = {}
        mine[conn] = None
        self.connections += 1
        assert self._loop is not None
        task = self._loop.create_task(self._connection(conn))
        conn.task = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._finished, conn))

    def _finished(self, conn: _Conn, task: asyncio.Task[None]) -> None:
        """Also for a task cancelled before it ran (to make room): the socket is closed."""
        self._tasks.discard(task)
        self._release(conn)
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None

    def _refuse(self, sock: socket.socket, client: str, why: str, count: int) -> None:
        """Reset at once; one log line a minute at most (``why % count``: formatted only then)."""
        self.refused += 1
        _reset(sock)
        held = self._refusal_log.due()
        if held is not None:
            log.warning("http: refused a connection from %s: %s%s", client, why % count, _since(held, "refused"))

    def _make_room(self, newcomer_holds: int) -> bool:
        """Close a connection of the address holding the most, if it holds more than the
        newcomer's address would: the one waiting longest for its client (to send a request or
        read a response), else its oldest. True if one was closed."""
        most = max(self._by_client.values(), key=len, default=None)
        if most is None or len(most) <= newcomer_holds + 1:
            return False
        victim = min(most, key=lambda c: (not c.waiting, c.since))
        self.evicted += 1
        self._release(victim)
        if victim.task is not None:
            victim.task.cancel()
        return True

    def _release(self, conn: _Conn) -> None:
        if conn.released:
            return
        conn.released = True
        self.connections -= 1
        mine = self._by_client.get(conn.client)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._by_client[conn.client]

    # -- one connection -----------------------------------------------------

    async def _connection(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        web = self.listener.web
        ctx = web.ssl_context if web is not None else None
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        writer: asyncio.StreamWriter | None = None
        abort = failed = False
        try:
            tls = {"ssl": ctx, "ssl_handshake_timeout": self.idle_timeout, "ssl_shutdown_timeout": 2.0} if ctx else {}
            sock, conn.sock = conn.sock, None  # asyncio's from here: it closes it if the handshake fails
            assert sock is not None
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, **tls)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            if self._sans and not _peer_allowed(writer.get_extra_info("peercert"), self._sans):
                log.debug("http: client certificate SAN not in client_allowed_sans")
                return
            while await self._one_request(conn, reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError):  # ConnectionError, TimeoutError, ssl.SSLError
            # A failed TLS handshake, or a client that does not read its response: close() would
            # keep the unsent bytes (and the connection) until it does.
            abort = failed = True
        except asyncio.CancelledError:
            # Shutting down, or making room for a newcomer.
            abort = True
        except Exception:  # a bug must cost one connection, never the endpoint
            abort = True
            log.exception("http: unexpected error")
        finally:
            # Without a writer there is no transport: asyncio has closed the socket (a failed
            # handshake), or _finished does.
            self._release(conn)
            if writer is not None:
                await self._close(writer, abort, failed)

    async def _close(self, writer: asyncio.StreamWriter, abort: bool, failed: bool) -> None:
        """Close (or reset). Where the stream's close waiter can hold an error (the connection
        failed, or unsent bytes may yet fail), wait for it, at most ``write_timeout``: unsent
        bytes do not keep the connection for ever, and the error (a reset by the client) is
        retrieved here rather than logged by asyncio, with a traceback, whenever the garbage
        collector happens to find it first. A clean close or reset has nothing to wait for."""
        transport = writer.transport
        pending = not abort and transport.get_write_buffer_size() > 0
        if abort:
            transport.abort()
        else:
            writer.close()
        if not (failed or pending):
            return
        try:
            async with asyncio.timeout(1.0 if abort else self.write_timeout):
                await writer.wait_closed()
        except TimeoutError:
            transport.abort()
        except Exception:
            pass  # the error that ended the connection, handled above

    async def _one_request(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to keep the connection for another."""
        conn.waiting, conn.since = True, time.monotonic()
        try:
            async with asyncio.timeout(self.idle_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed (between requests: normal keep-alive end)
        except TimeoutError:
            return False  # idle or too slow: the connection is dropped, nothing is answered
        except asyncio.LimitOverrunError:
            conn.waiting = False
            await self._send(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"request head too large\n", False)
            return False
        conn.waiting = False
        try:
            req = _parse_head(head)
            await self._read_body(reader, req)
        except _BadRequest as exc:
            await self._send(writer, exc.status, f"{exc}\n".encode(), False)
            return False
        keep = req.keep_alive
        status, headers, body = await self._respond(req, conn)
        conn.waiting, conn.since = True, time.monotonic()  # on the client to read it
        await self._send(writer, status, body, keep, headers, head_only=req.method == "HEAD", version=req.version)
        if log.isEnabledFor(logging.DEBUG):
            log.debug('http: %s "%s %s" %d', writer.get_extra_info("peername"), req.method, req.target, status)
        return keep

    async def _read_body(self, reader: asyncio.StreamReader, req: _Request) -> None:
        """Requests carry no body worth reading; one is read and dropped so keep-alive stays in step."""
        if "transfer-encoding" in req.headers:
            raise _BadRequest(HTTPStatus.NOT_IMPLEMENTED, "request bodies are not accepted")
        length = req.headers.get("content-length")
        if length is None:
            return
        # ASCII digits only: str.isdigit() is true for '²' and '٣', which int() refuses or reads.
        if not (length.isascii() and length.isdigit()):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if len(length) > 12 or int(length) > MAX_BODY_BYTES:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        n = int(length)
        if n:
            async with asyncio.timeout(self.idle_timeout):
                await reader.readexactly(n)

    async def _respond(self, req: _Request, conn: _Conn) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        auth = self._auth  # the one in force when the request came (SIGHUP may replace it)
        if auth is not None:
            verdict, retry_after = await self.auth.verdict(auth, req.headers.get("authorization"), conn.client)
            if verdict in (_DENIED, _BUSY):
                # Refused credentials are answered late: a client asking again as soon as it is
                # answered costs the loop a request per AUTH_REFUSAL_DELAY, not thousands a second.
                # Its connection counts as waiting meanwhile (the first to make room).
                conn.waiting, conn.since = True, time.monotonic()
                await asyncio.sleep(AUTH_REFUSAL_DELAY)
                conn.waiting = False
            if verdict == _BUSY:
                return (HTTPStatus.TOO_MANY_REQUESTS, [("Retry-After", str(retry_after)),
                                                       ("Content-Type", "text/plain; charset=utf-8")],
                        b"too many failed password checks\n")
            if verdict != _OK:
                return (
                    HTTPStatus.UNAUTHORIZED,
                    [("WWW-Authenticate", 'Basic realm="gpu-cost-agent", charset="UTF-8"'),
                     ("Content-Type", "text/plain; charset=utf-8")],
                    b"Unauthorized\n",
                )
        if req.method not in ("GET", "HEAD"):
            return (HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD"),
                                                   ("Content-Type", "text/plain; charset=utf-8")],
                    b"method not allowed\n")
        path = req.target.split("?", 1)[0]
        try:
            if path == "/metrics":
                return await self._metrics(req)
            if path == "/healthz":
                ok, body = self.health()
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                return status, [("Content-Type", "application/json")], json.dumps(body).encode() + b"\n"
        except Exception as exc:
            log.error("http: %s failed: %r", path, exc)
            return HTTPStatus.INTERNAL_SERVER_ERROR, [("Content-Type", "text/plain; charset=utf-8")], \
                b"internal error\n"
        if path == "/":
            page = (
                "<html><head><title>gpu-cost-agent</title></head><body>"
                f"<h1>gpu-cost-agent {__version__}</h1>"
                '<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a></p></body></html>'
            )
            return HTTPStatus.OK, [("Content-Type", "text/html; charset=utf-8")], page.encode()
        return HTTPStatus.NOT_FOUND, [("Content-Type", "text/plain; charset=utf-8")], b"not found\n"

    async def _metrics(self, req: _Request) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        accept = req.headers.get("accept", "")
        want_gzip = accepts_gzip(req.headers.get("accept-encoding", ""))
        got = self.exposition.fresh(accept, want_gzip)
        if got is None:
            loop = asyncio.get_running_loop()
            got = await asyncio.shield(loop.run_in_executor(self._pool, self.exposition.body, accept, want_gzip))
        content_type, body, gzipped = got
        headers = [("Content-Type", content_type), ("Vary", "Accept, Accept-Encoding")]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        return HTTPStatus.OK, headers, body

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        keep: bool,
        headers: list[tuple[str, str]] | None = None,
        *,
        head_only: bool = False,
        version: str = "HTTP/1.1",
    ) -> None:
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Server: {SERVER}", f"Date: {_http_date()}"]
        lines += [f"{k}: {v}" for k, v in (headers or [("Content-Type", "text/plain; charset=utf-8")])]
        lines += [f"{k}: {v}" for k, v in self._extra_headers]
        lines.append(f"Content-Length: {len(body)}")
        if not keep:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + body)
        async with asyncio.timeout(self.write_timeout):
            await writer.drain()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
