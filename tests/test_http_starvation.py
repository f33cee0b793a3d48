"""Nobody can take the scrapers' places (issue 15 items 3-5, issue 16 item 2).

Attackers and scrapers come from different loopback addresses (all of 127.0.0.0/8 is
loopback on Linux): the attackers from 127.0.0.2 and 127.0.1.x, the scrapers from 127.0.0.1.
The reported cases run against the real agent process; the gate's own rules in-process.
"""

from __future__ import annotations

import base64
import http.client
import logging
import resource
import selectors
import socket
import statistics
import threading
import time

import bcrypt
import pytest
from agentproc import AgentProcess

from agent.exporter import make_registry
from agent.http import Listener, MetricsServer, bind
from agent.webconfig import load as load_web_config

ATTACKER = "127.0.0.2"


def basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


def raise_fd_limit(wanted: int, needed: int) -> None:
    """Raise the soft limit on open files towards ``wanted``; fail (not skip) below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert soft >= needed, f"this test needs {needed} open files; the hard limit is {hard}"


def get(port: int, path: str = "/metrics", headers: dict | None = None, source: str = "127.0.0.1",
        timeout: float = 5.0, raw_headers: list[tuple[str, str]] | None = None) -> tuple[int, dict, bytes]:
    """One request on a new connection from ``source``: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.putrequest("GET", path)
        for k, v in list((headers or {}).items()) + (raw_headers or []):
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def web_file(tmp_path, password: str = "scrape-me", rounds: int = 4, **more: str):
    """A web config with basic auth for ``prometheus`` (and the ``more`` users: their passwords)."""
    users = {"prometheus": password, **more}
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n" + "".join(
        f"  {user}: '{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=rounds)).decode()}'\n"
        for user, pw in users.items()))
    return path


class Flood:
    """``count`` idle connections from ``source``, each opened again 0.1 s after the server
    closes it (the report's 520 reconnecting idle clients), until :meth:`stop`."""

    def __init__(self, port: int, count: int, source: str = ATTACKER) -> None:
        self.port, self.source = port, source
        self.sel = selectors.DefaultSelector()
        self.opened = 0
        self._stop = threading.Event()
        for _ in range(count):
            self._open()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((self.source, 0))
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        reopen: list[float] = []
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.02):
                s = key.fileobj
                try:
                    if s.recv(1) != b"":
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.sel.unregister(s)  # the server closed it: back in 0.1 s
                s.close()
                reopen.append(time.monotonic() + 0.1)
            now = time.monotonic()
            while reopen and reopen[0] <= now:
                reopen.pop(0)
                self._open()
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_idle_connections_from_one_address_leave_scrapers_their_slots(tmp_path):
    """Issue 15 item 3: 600 idle connections from one address, reopened when closed, with
    basic auth on: every scrape and health check from another address succeeds, under 1 s."""
    raise_fd_limit(4096, needed=800)
    agent = AgentProcess("demo", "--speed", "10", "--web.config.file", str(web_file(tmp_path)),
                         auth=("prometheus", "scrape-me"))
    flood = None
    try:
        agent.wait_ready()
        auth = {"Authorization": basic("prometheus", "scrape-me")}
        assert get(agent.port, headers=auth)[0] == 200
        flood = Flood(agent.port, 600)
        time.sleep(0.5)
        took, statuses = [], []
        for _ in range(30):
            start = time.monotonic()
            try:
                statuses.append(get(agent.port, headers=auth, timeout=2)[0])
                statuses.append(get(agent.port, "/healthz", headers=auth, timeout=2)[0])
            except OSError as exc:
                statuses.append(repr(exc))
            took.append(time.monotonic() - start)
            time.sleep(0.05)
        assert statuses == [200] * 60, statuses
        assert max(took) < 1.0, took
        assert flood.opened > 600  # the server did refuse most of them: they came back
    finally:
        if flood is not None:
            flood.stop()
        rc = agent.stop()
    assert rc == 0, agent.output
    # The refusals are logged, but not once per connection.
    refused = [ln for ln in agent.output.splitlines() if "refused a connection" in ln]
    assert 1 <= len(refused) <= 2, refused


class Endpoint:
    """A MetricsServer in-process over a fake GPU sampler (as tests/test_http.py's)."""

    def __init__(self, web=None, **kw) -> None:
        from fakes import FakeGpu, FakeSource, make_sampler

        self.src = FakeSource([FakeGpu(lambda t: 300.0)])
        self.sampler = make_sampler(self.src)
        registry = make_registry(lambda: self.sampler.snapshot)
        listener = Listener(bind("127.0.0.1:0"), "127.0.0.1:0", load_web_config(web) if web else None)
        self.server = MetricsServer("", 0, registry, lambda: (True, {"status": "ok"}),
                                    snapshot=lambda: self.sampler.snapshot, listener=listener, **kw)
        self.server.start()
        self.port = self.server.port

    def connect(self, source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0))


@pytest.fixture
def endpoint():
    made: list[Endpoint] = []

    def make(*args, **kw) -> Endpoint:
        made.append(Endpoint(*args, **kw))
        return made[-1]

    yield make
    for e in made:
        e.server.stop()


def closed_soon(sock: socket.socket, seconds: float = 2.0) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def refused(e: "Endpoint", source: str) -> bool:
    """A connection from ``source`` is reset at once: before ``connect`` returns (the reset can
    beat the connect's own check on a loaded machine) or right after."""
    try:
        sock = e.connect(source)
    except ConnectionResetError:
        return True
    try:
        return closed_soon(sock)
    finally:
        sock.close()


def test_one_address_holds_at_most_its_share_and_a_full_endpoint_makes_room(endpoint):
    """Item 3's rules: the connections one address may hold; when the endpoint is full, a
    newcomer from a smaller address takes the place of the longest-waiting connection of the
    address holding the most; one from the biggest address is refused instead."""
    e = endpoint(max_connections=20, max_per_address=15)
    big = [e.connect(ATTACKER) for _ in range(15)]
    small = [e.connect("127.0.0.3") for _ in range(5)]
    time.sleep(0.2)
    assert e.server.connections == 20
    assert refused(e, ATTACKER)  # a 16th from one address: reset at once
    # Full: a scraper from a third address is served; the oldest idle one of the big address goes.
    assert get(e.port, "/healthz")[0] == 200
    assert e.server.evicted == 1 and closed_soon(big[0])
    assert not closed_soon(small[0], 0.2) and not closed_soon(big[1], 0.1)
    # The smaller address may grow at the big one's expense until they hold as many
    # (the scraper's connection has gone: 14 + 5 open, one more fits without eviction).
    more = [e.connect("127.0.0.3") for _ in range(5)]
    time.sleep(0.2)
    assert e.server.evicted == 5
    assert len(e.server._by_client[ATTACKER]) == 10 and len(e.server._by_client["127.0.0.3"]) == 10
    assert refused(e, "127.0.0.3") and e.server.evicted == 5  # no address holds more than it would
    for s in big + small + more:
        s.close()


def test_clients_that_do_not_read_their_responses_make_room_too(endpoint):
    """A full endpoint of connections stuck writing to clients that never read (pipelined
    scrapes, a tiny receive buffer): they are waiting on their client as much as idle ones."""
    e = endpoint(max_connections=6, max_per_address=5)
    stuck = []
    for _ in range(5):
        s = e.connect(ATTACKER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        stuck.append(s)
    other = e.connect("127.0.0.3")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (
            e.server.connections == 6 and all(c.waiting for c in e.server._by_client[ATTACKER])):
        time.sleep(0.05)
    assert e.server.connections == 6
    start = time.monotonic()
    assert get(e.port, "/metrics")[0] == 200
    assert time.monotonic() - start < 1.0 and e.server.evicted == 1
    assert not closed_soon(other, 0.2)
    for s in stuck + [other]:
        s.close()


def test_a_connection_in_a_tls_handshake_counts_and_makes_room(endpoint, tmp_path):
    """Connections are counted before TLS: a client that never finishes its handshake holds
    a slot (until idle_timeout) and can be made to give it up like any waiting one."""
    from tlsutil import client_context, make_cert

    cert, key = make_cert(tmp_path, "server")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    e = endpoint(web, max_connections=4, max_per_address=4)
    silent = [e.connect(ATTACKER) for _ in range(4)]  # no ClientHello
    time.sleep(0.2)
    assert e.server.connections == 4
    conn = http.client.HTTPSConnection("127.0.0.1", e.port, context=client_context(cert), timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    assert e.server.evicted == 1
    for s in silent:
        s.close()


def test_over_long_password_is_a_401_with_at_most_one_log_line(tmp_path):
    """Issue 15 item 4: a password over bcrypt's 72 bytes was a dropped connection and a
    21-line traceback per request. Now a 401 (keep-alive, after AUTH_REFUSAL_DELAY), one log
    line for the lot, and the client's failure budget untouched (no bcrypt ran)."""
    agent = AgentProcess("demo", "--speed", "10", "--web.config.file", str(web_file(tmp_path)),
                         auth=("prometheus", "scrape-me"))
    statuses: list[int | str] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5, source_address=(ATTACKER, 0))
        try:
            for i in range(5):
                conn.request("GET", "/metrics", headers={"Authorization": basic("prometheus", f"{n}-{i}" + "x" * 97)})
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
        except (OSError, http.client.HTTPException) as exc:
            statuses.append(type(exc).__name__)
        finally:
            conn.close()

    try:
        agent.wait_ready()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [401] * 300, sorted(set(statuses), key=str)
        # 300 failures, yet the right password from the same address is let in: no check ran.
        assert get(agent.port, headers={"Authorization": basic("prometheus", "scrape-me")}, source=ATTACKER)[0] == 200
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output
    assert "Traceback" not in agent.output
    lines = [ln for ln in agent.output.splitlines() if "basic auth" in ln and "refused" in ln]
    assert len(lines) == 1 and "password over 72 bytes" in lines[0], lines


def test_wrong_password_floods_do_not_starve_scrapes(tmp_path):
    """Issue 15 item 5: each wrong password cost a bcrypt check (~65 ms at cost 10) on the two
    workers that also render /metrics, so a scrape needing a render waited behind them all.
    60 clients from 12 addresses sending new wrong passwords as fast as they are answered:
    every scrape from another address succeeds, none takes a second, and once every attacking
    address has failed a check, a scraper whose password was never checked (a new
    Prometheus) goes ahead of them all."""
    raise_fd_limit(4096, needed=300)
    web = web_file(tmp_path, rounds=10, late="new-one")
    agent = AgentProcess("demo", "--web.config.file", str(web), auth=("prometheus", "scrape-me"))
    stop = threading.Event()
    answers: dict[int | str, int] = {}
    failed: set[str] = set()  # attacking addresses that have had a 401
    lock = threading.Lock()

    def attack(n: int) -> None:
        source = f"127.0.1.{n % 12 + 1}"
        conn = None
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10, source_address=(source, 0))
                conn.request("GET", "/metrics", headers={"Authorization": basic("prometheus", f"guess-{n}-{i}")})
                r = conn.getresponse()
                r.read()
                key: int | str = r.status
            except (OSError, http.client.HTTPException) as exc:
                key = type(exc).__name__
                conn = None
            with lock:
                answers[key] = answers.get(key, 0) + 1
                if key == 401:
                    failed.add(source)

    try:
        agent.wait_ready()
        auth = {"Authorization": basic("prometheus", "scrape-me")}
        assert get(agent.port, headers=auth)[0] == 200  # checked once, then from the cache
        attackers = [threading.Thread(target=attack, args=(n,), daemon=True) for n in range(60)]
        for t in attackers:
            t.start()
        deadline = time.monotonic() + 30
        while len(failed) < 12 and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        late = get(agent.port, headers={"Authorization": basic("late", "new-one")}, source="127.0.0.3", timeout=10)
        late_took = time.monotonic() - start
        took, statuses = [], []
        end = time.monotonic() + 6.0  # six 1 s ticks: scrapes that need a fresh rendering
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                statuses.append(get(agent.port, headers=auth, timeout=10)[0])
            except OSError as exc:
                statuses.append(repr(exc))
            took.append(time.monotonic() - start)
            time.sleep(0.1)
        stop.set()
        for t in attackers:
            t.join(15)
    finally:
        stop.set()
        rc = agent.stop()
    assert rc == 0, agent.output
    assert set(statuses) == {200}, statuses
    assert max(took) < 1.0, f"median {statistics.median(took):.3f} s, max {max(took):.3f} s"
    assert late[0] == 200 and late_took < 1.0, (late[0], late_took)
    assert set(answers) <= {401, 429}, answers  # refused or throttled, never dropped
    assert "Traceback" not in agent.output


def test_the_password_gate_rules(endpoint, tmp_path, caplog, monkeypatch):
    """Item 5's rules, in-process: a repeated wrong password and an over-long one cost no
    bcrypt; an address that failed AUTH_FAILURE_BURST checks is answered 429 (Retry-After)
    without one, while another address and cached credentials are let in; one log line."""
    import agent.http as http_mod

    e = endpoint(web_file(tmp_path))
    auth = e.server._auth
    right = {"Authorization": basic("prometheus", "scrape-me")}
    caplog.set_level(logging.WARNING, logger="agent.http")
    assert get(e.port, headers=right, source=ATTACKER)[0] == 200
    assert auth.checks == 1
    wrong = {"Authorization": basic("prometheus", "nope")}
    start = time.monotonic()
    assert get(e.port, headers=wrong, source=ATTACKER)[0] == 401
    assert time.monotonic() - start >= http_mod.AUTH_REFUSAL_DELAY * 0.9  # refusals are answered late
    monkeypatch.setattr(http_mod, "AUTH_REFUSAL_DELAY", 0.0)
    assert [get(e.port, headers=wrong, source=ATTACKER)[0] for _ in range(10)] == [401] * 10
    assert auth.checks == 2  # the same wrong password: checked once
    assert get(e.port, headers={"Authorization": basic("prometheus", b"y" * 73)}, source=ATTACKER)[0] == 401
    assert auth.checks == 2
    burst = http_mod.AUTH_FAILURE_BURST
    answers = [get(e.port, headers={"Authorization": basic("prometheus", f"guess{i}")}, source=ATTACKER)
               for i in range(burst + 3)]
    assert [a[0] for a in answers] == [401] * (burst - 1) + [429] * 4
    assert 1 <= int(answers[-1][1]["Retry-After"]) <= http_mod.AUTH_FAILURE_REFILL + 1
    assert auth.checks == 2 + burst - 1
    # Throttled: still let in with cached credentials, and another address is checked as usual.
    assert get(e.port, headers=right, source=ATTACKER)[0] == 200
    assert get(e.port, headers={"Authorization": basic("prometheus", "other")}, source="127.0.0.3")[0] == 401
    # No credentials at all (a browser's first request): a 401 and no log line.
    assert get(e.port)[0] == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.http"]
    assert len(lines) == 1 and "basic auth refused for 127.0.0.2" in lines[0], lines


def test_password_checks_take_at_most_their_share_of_a_core(endpoint, tmp_path, monkeypatch):
    """However many addresses send new wrong passwords, bcrypt runs on one thread and rests
    between checks: at most AUTH_CPU_SHARE of one core; the excess is answered 429 at once."""
    import agent.http as http_mod

    e = endpoint(web_file(tmp_path, rounds=8))
    gate = e.server.auth
    stop = threading.Event()
    statuses: list[int] = []

    def attack(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                statuses.append(get(e.port, headers={"Authorization": basic("prometheus", f"g{n}-{i}")},
                                    source=f"127.0.2.{n + 1}")[0])
            except OSError:
                statuses.append(0)

    threads = [threading.Thread(target=attack, args=(n,)) for n in range(30)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - start
    one = gate.check_seconds / max(1, gate.checks)
    assert gate.checks > 5
    assert gate.check_seconds <= http_mod.AUTH_CPU_SHARE * elapsed + 2 * one, (gate.checks, gate.check_seconds)
    assert set(statuses) <= {401, 429} and 429 in statuses


def test_content_length_must_be_ascii_digits():
    """Issue 16 item 2: the head is read as Latin-1, where '²' (0xB2) is a digit to
    str.isdigit() that int() refuses: a traceback per request and no answer, before any
    authentication. Now a 400 (a number too long to read: 413), and no log line."""
    cases = [(b"\xb2", 400), (b"\xb3\xb9", 400), (b"1\xb9", 400), (b"+5", 400), (b"0x5", 400), (b"1" * 5000, 413)]
    agent = AgentProcess("demo", "--speed", "10")
    try:
        agent.wait_ready()
        for length, status in cases:
            with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
                try:
                    reply = s.recv(200)
                except ConnectionResetError:
                    reply = b"(reset)"
            assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (length[:10], reply)
        assert agent.get("/healthz")[0] == 200
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output
    assert "Traceback" not in agent.output and "ERROR" not in agent.output, agent.output


def test_an_accept_header_the_client_library_cannot_read_is_served_the_text_format(endpoint, caplog):
    """prometheus_client compares Accept versions unchecked (``version=²`` raises, once per
    request, an ERROR line and a 500) and caches a rendering per version it is given: the
    versions are reduced to those it renders."""
    e = endpoint()
    caplog.set_level(logging.WARNING)
    for version in ("²", "abc", "1..0"):
        status, headers, body = get(e.port, headers={"Accept": f"application/openmetrics-text; version={version}"})
        assert status == 200 and b"gpucost_gpu_power_watts" in body
    for n in range(50):
        status, headers, _ = get(e.port, headers={"Accept": f"application/openmetrics-text; version=1.0.{n}"})
        assert status == 200 and "version=1.0.0;" in headers["Content-Type"]
    assert len(e.server.exposition._entries) <= 3
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("address, key", [
    (("127.0.0.2", 5), "127.0.0.2"),
    (("::ffff:10.1.2.3", 5, 0, 0), "10.1.2.3"),  # IPv4 through a dual-stack socket: the same client
    (("2001:db8::1", 5, 0, 0), "2001:db8::/64"),  # one host's usual share of IPv6 addresses
    (("2001:db8::ffff:1", 5, 0, 0), "2001:db8::/64"),
    (("fe80::1%eth0", 5, 0, 1), "fe80::/64"),
])
def test_clients_are_counted_by_ipv4_address_or_ipv6_64(address, key):
    from agent.http import client_key

    assert client_key(address) == key
