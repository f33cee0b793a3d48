"""Can attackers take the scrapers' places? Connection and password floods against the real agent.

    python benchmarks/endpoint_starvation.py [--duration 60] [--idle 1000] [--reconnecting 500]
        [--password-clients 200] [--password-addresses 200] [--rounds 10] [--root PATH]

Starts ``gpu-cost-agent demo`` (1 s ticks) with basic auth (a bcrypt hash of cost
``--rounds``, 10 as ``htpasswd -nBC 10`` makes) on a free loopback port, with the file
descriptor limit a systemd service gets (1024), then for ``--duration`` seconds:

* from 127.0.0.2, ``--idle`` connections that send nothing, each opened again 0.1 s
  after the server closes it, and ``--reconnecting`` connections that are closed and
  opened again every 0.1 s (attack process 1, asyncio);
* ``--password-clients`` clients sending a new wrong password on a keep-alive connection
  as fast as they are answered, spread over ``--password-addresses`` addresses from
  127.0.1.1 (attack process 2, asyncio);
* from 127.0.0.1, as Prometheus and the kubelet do: a scraper on one keep-alive
  connection and one on a new connection per scrape, each every ``--interval`` s (right
  password, Prometheus' Accept and gzip, 10 s timeout), and a liveness probe (``/healthz``
  with the password, new connection, 5 s timeout, as deploy/kubernetes/daemonset.yaml)
  every ``--interval`` s.

A scrape fails on a connection error, a status other than 200 or the timeout. Printed:
success rate and latency percentiles of scrapes and probes, what the attackers got
(connections opened, answers by status), and the agent's CPU use. ``--root`` runs the
agent from another checkout (``git worktree add /tmp/wt HEAD``: the code before a change).
All of 127.0.0.0/8 is loopback on Linux, so no setup is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing as mp
import os
import resource
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
USER, PASSWORD = "prometheus", "scrape-me"
ATTACKER = "127.0.0.2"
LINGER_RESET = struct.pack("ii", 1, 0)
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: choose the port at connect(), not bind()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- attackers (each in a process of its own) ------------------------------------


def _client_socket(source: str) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)  # no TIME_WAIT on our side
    try:
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    except OSError:
        pass
    s.bind((source, 0))
    return s


async def _idle(port: int, stop_at: float, counts: dict[str, int]) -> None:
    """Connect, send nothing; when the server closes it, open again 0.1 s later."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop_at:
        s = _client_socket(ATTACKER)
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            counts["connected"] += 1
            await asyncio.wait_for(loop.sock_recv(s, 1), max(0.01, stop_at - time.monotonic()))
            counts["closed_by_server"] += 1
        except (asyncio.TimeoutError, TimeoutError):
            pass
        except ConnectionResetError:
            counts["reset_by_server"] += 1
        except OSError:
            counts["connect_failed"] += 1
        finally:
            s.close()
        await asyncio.sleep(0.1)


async def _reconnecting(port: int, stop_at: float, counts: dict[str, int]) -> None:
    """Connect, send nothing, close after 0.1 s (or when the server does), open again."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop_at:
        s = _client_socket(ATTACKER)
        try:
            await loop.sock_connect(s, ("127.0.0.1", port))
            counts["connected"] += 1
            await asyncio.wait_for(loop.sock_recv(s, 1), 0.1)
            counts["closed_by_server"] += 1
        except (asyncio.TimeoutError, TimeoutError):
            pass
        except ConnectionResetError:
            counts["reset_by_server"] += 1
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.1)
        finally:
            s.close()


async def _connections(port: int, idle: int, reconnecting: int, duration: float) -> dict[str, int]:
    stop_at = time.monotonic() + duration
    counts = {"connected": 0, "closed_by_server": 0, "reset_by_server": 0, "connect_failed": 0}
    tasks = [_idle(port, stop_at, counts) for _ in range(idle)]
    tasks += [_reconnecting(port, stop_at, counts) for _ in range(reconnecting)]
    await asyncio.gather(*tasks)
    return counts


async def _password_client(port: int, source: str, n: int, stop_at: float, counts: dict[str, int]) -> None:
    """A new wrong password per request on a keep-alive connection, as fast as answered."""
    i = 0
    writer = None
    while time.monotonic() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            i += 1
            writer.write(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(USER, f'guess-{n}-{i}')}"
                         f"\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(0.01, stop_at - time.monotonic()))
            status = head.split(b" ", 2)[1].decode()
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts[status] = counts.get(status, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (asyncio.TimeoutError, TimeoutError):
            break
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            counts["dropped"] = counts.get("dropped", 0) + 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.1)
    if writer is not None:
        writer.close()


async def _passwords(port: int, clients: int, addresses: int, duration: float) -> dict[str, int]:
    stop_at = time.monotonic() + duration
    counts: dict[str, int] = {}
    await asyncio.gather(*(_password_client(port, f"127.0.1.{1 + n % addresses}", n, stop_at, counts)
                           for n in range(clients)))
    return counts


def _attack(kind: str, args: tuple, out: mp.Queue) -> None:
    raise_fd_limit(16384)
    coro = _connections(*args) if kind == "connections" else _passwords(*args)
    out.put((kind, asyncio.run(coro)))


# -- scrapers (this process) --------------------------------------------------------


class Prober:
    """Requests from 127.0.0.1 every ``interval`` s; latencies and failures."""

    def __init__(self, port: int, path: str, interval: float, timeout: float, keep_alive: bool) -> None:
        self.port, self.path, self.interval, self.timeout, self.keep_alive = port, path, interval, timeout, keep_alive
        self.t0 = time.monotonic()
        self.took: list[float] = []
        self.slowest: list[tuple[float, float]] = []  # (latency, seconds into the run)
        self.failures: list[str] = []
        self.headers = {"Authorization": basic(USER, PASSWORD)}
        if path == "/metrics":
            self.headers |= {"Accept": ACCEPT, "Accept-Encoding": "gzip"}

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout,
                                          source_address=("127.0.0.1", 0))

    def run(self, stop_at: float) -> None:
        conn = None
        next_at = time.monotonic()
        while next_at < stop_at:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.interval
            start = time.monotonic()
            try:
                if conn is None:
                    conn = self._connect()
                conn.request("GET", self.path, headers=self.headers)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    self.failures.append(f"status {r.status}")
                    conn.close()
                    conn = None
                    continue
                self.took.append(time.monotonic() - start)
                self.slowest = sorted(self.slowest + [(self.took[-1], start)], reverse=True)[:3]
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if not self.keep_alive:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def summary(self) -> dict:
        n = len(self.took) + len(self.failures)
        took = sorted(self.took)
        pct = (lambda p: took[min(len(took) - 1, int(p / 100 * len(took)))] if took else float("nan"))
        return {"requests": n, "ok": len(self.took), "success": len(self.took) / n if n else 0.0,
                "p50": pct(50), "p99": pct(99), "max": took[-1] if took else float("nan"),
                "failures": sorted(set(self.failures)),
                "slowest": [(round(took, 3), round(at - self.t0, 1)) for took, at in self.slowest]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--reconnecting", type=int, default=500)
    ap.add_argument("--password-clients", type=int, default=200)
    ap.add_argument("--password-addresses", type=int, default=200, help="spread over this many (at most 254)")
    ap.add_argument("--rounds", type=int, default=10, help="bcrypt cost of the scraper's hash")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes and between probes")
    ap.add_argument("--agent-fds", type=int, default=1024, help="the agent's file descriptor limit")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose agent runs")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()
    import bcrypt

    raise_fd_limit(16384)
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="gpucost-starve-")
    web = Path(tmp, "web.yml")
    web.write_text(f"basic_auth_users:\n  {USER}: '"
                   f"{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=args.rounds)).decode()}'\n")
    cmd = [sys.executable, "-m", "agent", "demo", "--web.config.file", str(web), "--listen", f"127.0.0.1:{port}"]

    def agent_limits() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.agent_fds, hard))

    log = open(Path(tmp, "agent.log"), "w+")
    proc = subprocess.Popen(cmd, cwd=args.root, env={**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": tmp},
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=agent_limits)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz", headers={"Authorization": basic(USER, PASSWORD)})
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        ctx = mp.get_context("fork")
        out: mp.Queue = ctx.Queue()
        attackers = [
            ctx.Process(target=_attack, args=("connections", (port, args.idle, args.reconnecting, args.duration), out)),
            ctx.Process(target=_attack, args=("passwords", (port, args.password_clients, args.password_addresses,
                                                            args.duration), out)),
        ]
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        for a in attackers:
            a.start()
        time.sleep(min(2.0, args.duration / 10))  # the floods are under way
        stop_at = time.monotonic() + args.duration - min(2.0, args.duration / 10) - 0.5
        probers = {
            "scrape, keep-alive": Prober(port, "/metrics", args.interval, 10.0, True),
            "scrape, new connection": Prober(port, "/metrics", args.interval, 10.0, False),
            "liveness probe": Prober(port, "/healthz", args.interval, 5.0, False),
        }
        for p in probers.values():
            p.t0 = wall0
        threads = [threading.Thread(target=p.run, args=(stop_at,)) for p in probers.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = dict(out.get(timeout=args.duration + 60) for _ in attackers)
        for a in attackers:
            a.join(30)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - wall0)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.seek(0)
    lines = log.read().splitlines()
    figures = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "probers": {name: p.summary() for name, p in probers.items()},
        "attackers": got,
        "agent_cpu_cores": round(cpu, 2),
        "agent_alive": alive,
        "agent_log_lines": len(lines),
        "agent_tracebacks": sum("Traceback" in ln for ln in lines),
    }
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"agent from {args.root}: {args.duration:.0f} s, bcrypt cost {args.rounds}, fd limit {args.agent_fds}")
    print(f"attack: {args.idle} idle + {args.reconnecting} reconnecting connections from {ATTACKER}; "
          f"{args.password_clients} wrong-password clients over {args.password_addresses} address(es)")
    for name, s in figures["probers"].items():
        print(f"  {name:24} {s['ok']:4}/{s['requests']:<4} ok ({100 * s['success']:.1f} %)  "
              f"p50 {1000 * s['p50']:7.1f} ms  p99 {1000 * s['p99']:7.1f} ms  max {1000 * s['max']:7.1f} ms"
              + (f"  failures: {', '.join(s['failures'])}" if s["failures"] else "")
              + ("  slowest (s, at s): " + ", ".join(f"{t:.2f}@{at:.0f}" for t, at in s["slowest"])
                 if s["slowest"] and s["slowest"][0][0] > 0.5 else ""))
    conns = got.get("connections", {})
    pw = got.get("passwords", {})
    connected = conns.get("connected", 0)
    print(f"  connection flood: {connected} connected ({connected / args.duration:.0f}/s), "
          f"{conns.get('reset_by_server', 0)} reset and {conns.get('closed_by_server', 0)} closed by the server, "
          f"{conns.get('connect_failed', 0)} failed to connect")
    print(f"  password flood: {sum(pw.values())} answers ({sum(pw.values()) / args.duration:.0f}/s): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(pw.items())))
    print(f"  agent: {cpu:.2f} cores, {'alive' if alive else 'DEAD'}, {len(lines)} log lines "
          f"({sum(' http: ' in ln for ln in lines)} from the endpoint), {figures['agent_tracebacks']} tracebacks; "
          f"log: {log.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
