"""The HTTP endpoint in-process: timeouts, slow clients, keep-alive, the render cache, TLS and auth."""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import socket
import ssl
import threading
import time

import pytest
from fakes import FakeGpu, FakeSource, make_sampler
from prometheus_client.parser import text_string_to_metric_families
from tlsutil import bcrypt_hash, client_context, make_cert

from agent.exporter import make_registry
from agent.http import Listener, ListenError, MetricsServer, accepts_gzip, bind
from agent.webconfig import load as load_web_config


class Endpoint:
    """A MetricsServer on a free loopback port over a fake GPU sampler."""

    def __init__(self, listen: str = "127.0.0.1:0", web_file=None, **kw) -> None:
        self.src = FakeSource([FakeGpu(lambda t: 300.0)])
        self.sampler = make_sampler(self.src)
        registry = make_registry(lambda: self.sampler.snapshot)
        web = load_web_config(web_file) if web_file else None
        listener = Listener(bind(listen), listen, web)
        self.server = MetricsServer("", 0, registry, lambda: (True, {"status": "ok"}),
                                    snapshot=lambda: self.sampler.snapshot, listener=listener, **kw)
        self.server.start()
        self.port = self.server.port

    def tick(self) -> None:
        self.src.t += 1
        self.sampler.tick()

    def connect(self) -> socket.socket:
        return socket.create_connection((self.server.host, self.port), timeout=5)

    def get(self, path: str = "/metrics", headers: dict | None = None, timeout: float = 5):
        conn = http.client.HTTPConnection(self.server.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def endpoint():
    made: list[Endpoint] = []

    def make(*args, **kw) -> Endpoint:
        made.append(Endpoint(*args, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (recv gives b""), or None if it stayed open."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_idle_and_half_open_connections_are_closed_after_the_timeout(endpoint):
    e = endpoint(idle_timeout=0.5)
    idle = e.connect()
    partial = e.connect()
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    assert 0.4 < closed_within(idle, 3.0) < 1.5
    assert closed_within(partial, 3.0) < 1.5
    idle.close()
    partial.close()
    time.sleep(0.05)
    assert e.server.connections == 0


def test_keep_alive_serves_several_requests_then_idles_out(endpoint):
    e = endpoint(idle_timeout=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
    for path in ("/metrics", "/healthz", "/metrics"):
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Connection") is None
        r.read()
    assert e.server.connections == 1  # one connection carried all three
    time.sleep(1.0)
    assert e.server.connections == 0
    conn.close()


def test_connection_close_and_http_1_0_are_honoured(endpoint):
    e = endpoint()
    s = e.connect()
    s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    reply = b""
    while chunk := s.recv(4096):  # the server closes after one response
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in reply
    s.close()
    s = e.connect()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert closed_within(s, 2.0) is not None
    s.close()


def test_slow_clients_do_not_block_a_normal_scrape(endpoint):
    e = endpoint(idle_timeout=3.0)
    # 60 clients trickling request heads, 60 idle ones, and 10 that ask for
    # /metrics and never read: far more than the worker threads.
    slow = [e.connect() for _ in range(120)]
    for s in slow[:60]:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    stuck = []
    for _ in range(10):
        s = e.connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        stuck.append(s)
    time.sleep(0.2)
    for _ in range(5):
        start = time.monotonic()
        status, _, body = e.get("/metrics")
        assert status == 200 and b"gpucost_gpu_power_watts" in body
        assert time.monotonic() - start < 0.5
    for s in slow + stuck:
        s.close()


def test_exposition_is_rendered_once_per_snapshot_and_gzipped_when_accepted(endpoint):
    e = endpoint()
    exp = e.server.exposition
    plain = {e.get()[2] for _ in range(10)}
    assert exp.renders == 1 and len(plain) == 1
    status, headers, body = e.get(headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == plain.pop()
    assert exp.renders == 1  # gzip reuses the rendering
    e.tick()  # a new snapshot: rendered again
    text = e.get()[2].decode()
    assert exp.renders == 2
    ticks = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "gpucost_agent_ticks_total"]
    assert ticks == [2.0]
    # OpenMetrics is its own rendering, cached on its own.
    _, headers, body = e.get(headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert exp.renders == 3


def test_gzip_follows_every_new_rendering(endpoint):
    """Issue 16 item 6: the gzipped body is the current rendering's, never one kept from an earlier
    snapshot (before, only the real-Prometheus test would have noticed)."""
    e = endpoint()
    for tick in range(1, 4):
        _, headers, body = e.get(headers={"Accept-Encoding": "gzip"})
        plain = e.get()[2]
        assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == plain
        ticks = [s.value for f in text_string_to_metric_families(plain.decode()) for s in f.samples
                 if s.name == "gpucost_agent_ticks_total"]
        assert ticks == [float(tick)]
        e.tick()


def test_cache_expires_without_a_new_snapshot(endpoint):
    e = endpoint()
    e.server.exposition.max_age = 0.2  # a finished replay: no new snapshot, process_* must still move
    e.get()
    time.sleep(0.3)
    e.get()
    assert e.server.exposition.renders == 2


@pytest.mark.parametrize("value, expected", [("gzip", True), ("gzip, deflate, br", True), ("deflate", False),
                                             ("gzip;q=0", False), ("*", True), ("", False), ("GZIP;q=0.5", True)])
def test_accepts_gzip(value, expected):
    assert accepts_gzip(value) is expected


def test_methods_paths_and_malformed_requests(endpoint):
    e = endpoint()
    assert e.get("/nope")[0] == 404
    assert e.get("/")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", e.port, timeout=5)
    conn.request("HEAD", "/metrics")
    r = conn.getresponse()
    assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""
    conn.request("POST", "/metrics", body=b"x=1")
    r = conn.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "GET, HEAD"
    r.read()
    conn.close()
    with e.connect() as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    with e.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")


def test_connections_beyond_the_limit_are_closed_at_once(endpoint):
    e = endpoint(max_connections=5)
    held = [e.connect() for _ in range(5)]
    time.sleep(0.1)
    extra = e.connect()
    assert closed_within(extra, 2.0) is not None
    extra.close()
    for s in held:
        s.close()
    time.sleep(0.1)
    assert e.get("/healthz")[0] == 200


def test_bind_names_the_address_when_the_port_is_taken():
    taken = bind("127.0.0.1:0")
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ListenError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: address already in use$"):
            bind(f"127.0.0.1:{port}")
    finally:
        taken.close()
    with pytest.raises(ListenError, match=r"^cannot listen on 192\.0\.2\.1:9842: no such address on this host$"):
        bind("192.0.2.1:9842")


def test_ipv6_loopback_and_dual_stack(endpoint):
    e = endpoint("[::1]:0")
    assert e.server.url == f"http://[::1]:{e.port}"
    assert e.get("/healthz")[0] == 200
    any6 = bind("[::]:0")
    try:
        port = any6.getsockname()[1]
        v4 = socket.create_connection(("127.0.0.1", port), timeout=2)  # [::] takes IPv4 too
        v4.close()
    finally:
        any6.close()


# -- TLS and basic auth --------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    server = make_cert(d, "server")
    client = make_cert(d, "client", cn="prometheus", sans="DNS:prometheus.example")
    other = make_cert(d, "other", cn="intruder", sans="DNS:intruder.example")
    return d, server, client, other


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/metrics", auth: tuple[str, str] | None = None):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_tls_with_basic_auth_guards_every_path(endpoint, tls):
    d, server, _, _ = tls
    web = d / "web.yml"
    web.write_text(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"  # relative to the file
        f"basic_auth_users:\n  alice: '{bcrypt_hash('s3cret')}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )
    e = endpoint(web_file=web)
    ctx = client_context(server[0])
    assert e.server.url.startswith("https://")
    status, headers, body = https_get(e.port, ctx, auth=("alice", "s3cret"))
    assert status == 200 and b"gpucost_gpu_power_watts" in body and headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/metrics", "/healthz", "/"):
        status, headers, _ = https_get(e.port, ctx, path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        assert https_get(e.port, ctx, path, auth=("alice", "wrong"))[0] == 401
        assert https_get(e.port, ctx, path, auth=("bob", "s3cret"))[0] == 401
    assert https_get(e.port, ctx, auth=("alice", "s3cret"))[0] == 200  # the cached path
    # Plain HTTP on the TLS port gets no metrics, only a TLS alert or a closed connection.
    reply = b""
    with e.connect() as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1" not in reply and b"gpucost" not in reply


def test_client_certificates_and_allowed_sans(endpoint, tls):
    d, server, client, other = tls
    web = d / "mtls.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {server[0]}\n  key_file: {server[1]}\n"
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {client[0]}\n"
        "  client_allowed_sans: [prometheus.example]\n  min_version: TLS13\n"
    )
    e = endpoint(web_file=web)
    assert https_get(e.port, client_context(server[0], client))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(e.port, client_context(server[0]))  # no client certificate
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(e.port, client_context(server[0], other))  # not signed by the client CA
    # Trusted by the CA but a SAN outside client_allowed_sans: the connection is dropped.
    web.write_text(web.read_text().replace("[prometheus.example]", "[someone.else]"))
    e2 = endpoint(web_file=web)
    with pytest.raises((http.client.HTTPException, ConnectionError, ssl.SSLError)):
        https_get(e2.port, client_context(server[0], client))


def test_stop_returns_promptly_with_connections_open(endpoint, caplog):
    e = endpoint(idle_timeout=30)
    held = [e.connect() for _ in range(20)]
    time.sleep(0.1)
    start = time.monotonic()
    e.server.stop()
    assert time.monotonic() - start < 2.0
    for s in held:
        assert closed_within(s, 2.0) is not None
        s.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_concurrent_scrapes_all_succeed(endpoint):
    e = endpoint()
    results: list[int] = []

    def scrape() -> None:
        for _ in range(10):
            results.append(e.get()[0])

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 200
