"""The HTTP endpoint: ``/metrics``, ``/healthz`` and an index page, built for scrape storms.

One event-loop thread owns every connection, so an idle, slow or half-open
client costs a file descriptor and a timer, never a thread. The few things that
take CPU time (rendering the exposition, a bcrypt check) run on a bounded pool
of ``WORKERS`` threads. Every connection must deliver a complete request head
within ``idle_timeout`` seconds (also the keep-alive idle time) and read its
response within ``write_timeout``; otherwise it is closed.

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
import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
#: Threads that render and check passwords; connections never hold one.
WORKERS = 2
#: Open connections beyond this are closed at once, keeping file descriptors for the agent's own work.
MAX_CONNECTIONS = 512
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
    ) -> None:
        self.registry = registry
        self.snapshot = snapshot or (lambda: None)
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
        encoder, content_type = choose_encoder(accept)
        with self._lock:  # one render per miss, however many scrapers arrive at once
            snap = self.snapshot()
            now = time.monotonic()
            entry = self._current(content_type, snap, now)
            if entry is None:
                entry = _Rendered(snap, now, content_type, encoder(self.registry))
                self._entries[content_type] = entry
                self.renders += 1
            if not want_gzip:
                return content_type, entry.plain, False
            if entry.gz is None:
                entry.gz = gzip.compress(entry.plain, compresslevel=6, mtime=0)
            return content_type, entry.gz, True

    def fresh(self, accept: str, want_gzip: bool) -> tuple[str, bytes, bool] | None:
        """The cached body if it is still current, without rendering: the event loop's fast path."""
        _, content_type = choose_encoder(accept)
        entry = self._current(content_type, self.snapshot(), time.monotonic())
        if entry is None:
            return None
        if want_gzip:
            return (content_type, entry.gz, True) if entry.gz is not None else None
        return content_type, entry.plain, False


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


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/`` on an asyncio loop in its own thread.

    ``snapshot`` (optional) returns the sampler's current snapshot, so renders
    are cached per tick. ``listener`` is a socket bound earlier by
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
        listener: Listener | None = None,
        idle_timeout: float = 5.0,
        write_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        workers: int = WORKERS,
    ) -> None:
        if listener is None:
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listener = Listener(bind(listen), listen)
        self.listener = listener
        self.exposition = Exposition(registry, snapshot)
        self.health = health
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.workers = workers
        self._set_web(listener.web)
        address = listener.sock.getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        self.connections = 0  # open now
        self.refused = 0  # closed at once: over max_connections
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
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

    async def _start_server(self) -> asyncio.AbstractServer:
        """Serve the listening socket with the current web config's TLS (or none). The server gets
        a duplicate of the socket: closing it (a new web config, stop) leaves the port bound."""
        ctx = self.listener.web.ssl_context if self.listener.web is not None else None
        return await asyncio.start_server(
            self._connection,
            sock=self.listener.sock.dup(),
            backlog=BACKLOG,
            limit=MAX_HEAD_BYTES,
            ssl=ctx,
            ssl_handshake_timeout=self.idle_timeout if ctx is not None else None,
            ssl_shutdown_timeout=2.0 if ctx is not None else None,
        )

    def apply_web(self, web: WebConfig | None) -> None:
        """A web config read again (SIGHUP): basic auth, headers and allowed SANs apply from the
        next request, TLS from the next connection on the same port (a new server takes the
        bound socket over; connections open now keep the TLS they have)."""
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            self.listener.web = web
            self._set_web(web)
            return
        asyncio.run_coroutine_threadsafe(self._swap_web(web), loop).result(timeout=10)

    async def _swap_web(self, web: WebConfig | None) -> None:
        before = self.listener.web
        self.listener.web = web
        self._set_web(web)  # first: a connection the new server accepts is checked by the new rules
        if (web.ssl_context if web is not None else None) is None and (
                before is None or before.ssl_context is None):
            return  # plain HTTP before and after: nothing to change on the socket
        try:
            server = await self._start_server()
        except BaseException:
            self.listener.web = before  # all or nothing: the running server keeps its rules
            self._set_web(before)
            raise
        old, self._server = self._server, server
        if old is not None:
            old.close()  # stops accepting; its connections run on

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="http-work")
        try:
            self._server = loop.run_until_complete(self._start_server())
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
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    # -- one connection -----------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        abort = False
        try:
            if self._sans and not _peer_allowed(writer.get_extra_info("peercert"), self._sans):
                log.debug("http: client certificate SAN not in client_allowed_sans")
                return
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            # A client that does not read its response: close() would keep the
            # unsent bytes (and the connection) until it does.
            abort = True
        except asyncio.CancelledError:
            # Shutting down. Finish rather than end cancelled: asyncio's stream
            # callback logs a traceback for a cancelled connection task (3.11).
            abort = True
        except Exception:  # a bug must cost one connection, never the endpoint
            abort = True
            log.exception("http: unexpected error")
        finally:
            self.connections -= 1
            self._tasks.discard(task)
            if abort:
                writer.transport.abort()
            else:
                writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed (between requests: normal keep-alive end)
        except TimeoutError:
            return False  # idle or too slow: the connection is dropped, nothing is answered
        except asyncio.LimitOverrunError:
            await self._send(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"request head too large\n", False)
            return False
        try:
            req = _parse_head(head)
            await self._read_body(reader, req)
        except _BadRequest as exc:
            await self._send(writer, exc.status, f"{exc}\n".encode(), False)
            return False
        keep = req.keep_alive
        status, headers, body = await self._respond(req)
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
        if not length.isdigit():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        n = int(length)
        if n > MAX_BODY_BYTES:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        if n:
            async with asyncio.timeout(self.idle_timeout):
                await reader.readexactly(n)

    async def _respond(self, req: _Request) -> tuple[HTTPStatus, list[tuple[str, str]], bytes]:
        if self._auth is not None and not await self._authorized(req.headers.get("authorization")):
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

    async def _authorized(self, header: str | None) -> bool:
        auth = self._auth  # the one in force when the request came (SIGHUP may replace it)
        assert auth is not None
        if not header:
            return False
        if auth.cached(header):
            return True
        loop = asyncio.get_running_loop()
        return await asyncio.shield(loop.run_in_executor(self._pool, auth.check, header))

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
