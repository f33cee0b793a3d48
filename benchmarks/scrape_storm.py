"""A scrape storm against the real agent process: do scrapes fail, how slow are they, do ticks keep time?

    python benchmarks/scrape_storm.py [--scrapers 200] [--duration 20] [--interval 0] [--new-connections]

Starts ``gpu-cost-agent demo`` (the bundled H100 trace replayed in real time,
1 s ticks; ``--agent run`` for the node's own GPUs) on a free loopback port, then runs ``--scrapers`` concurrent
scrapers for ``--duration`` seconds from this process (asyncio, raw sockets,
so the client costs as little as it can on the same machine). Each scraper
sends Prometheus' own ``Accept`` and ``Accept-Encoding: gzip`` headers and
reads the whole response; it scrapes back to back (``--interval 0``, the
harshest case) or every ``--interval`` seconds, over one keep-alive connection
as Prometheus does, or a new connection per scrape (``--new-connections``). A
scrape fails on a connection error, a status other than 200, or after 10 s
(Prometheus' default scrape timeout).

Ticks are judged from ``gpucost_agent_ticks_total``,
``gpucost_agent_last_sample_timestamp_seconds`` and the ``tick_skipped``
error counter, read before and after the storm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def agent_state(port: int) -> dict[str, float | None]:
    text = scrape_text(port)
    return {
        "wall": time.time(),
        "ticks": sample(text, "gpucost_agent_ticks_total"),
        "last": sample(text, "gpucost_agent_last_sample_timestamp_seconds"),
        "skipped": sample(text, "gpucost_agent_errors_total", '{kind="tick_skipped"}') or 0.0,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Connection(asyncio.Protocol):
    """One scraper's connection, as a bare protocol: the scrapers share the agent's two cores,
    so they should cost as little CPU as they can. ``request`` resolves to (status, body bytes,
    server closes) once the whole response is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.expected: int | None = None
        self.head: tuple[int, int, bool] = (0, 0, False)
        self.lost = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buffer.clear()
        self.expected = None
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.expected is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = int(re.search(rb"\r\ncontent-length: (\d+)", head).group(1))
            self.head = (int(head.split(b" ", 2)[1]), length, b"\r\nconnection: close" in head)
            self.expected = end + 4 + length
        if len(self.buffer) >= self.expected and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("closed by the agent"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Storm:
    def __init__(self, port: int, scrapers: int, duration: float, interval: float, new_connections: bool) -> None:
        self.port = port
        self.scrapers = scrapers
        self.duration = duration
        self.interval = interval
        self.new_connections = new_connections
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}
        self.bytes = 0
        self.tick_stamps: list[float] = []
        self.request = (f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: scrape-storm\r\n"
                        f"Accept: {ACCEPT}\r\nAccept-Encoding: gzip\r\n"
                        + ("Connection: close\r\n" if new_connections else "") + "\r\n").encode()

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    async def one(self, conn: _Connection | None) -> _Connection | None:
        """One scrape; returns the connection to reuse (None to open a new one)."""
        if conn is None or conn.lost:
            _, conn = await asyncio.get_running_loop().create_connection(_Connection, "127.0.0.1", self.port)
        status, length, close = await conn.request(self.request)
        self.bytes += length
        if status != 200:
            raise RuntimeError(f"status {status}")
        if self.new_connections or close:
            conn.close()
            return None
        return conn

    async def scraper(self, stop_at: float, offset: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(offset)
        conn = None
        while loop.time() < stop_at:
            start = loop.time()
            try:
                async with asyncio.timeout(TIMEOUT):
                    conn = await self.one(conn)
                self.latencies.append(loop.time() - start)
            except TimeoutError:
                self.fail("timeout")
                conn = self._drop(conn)
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.fail(type(exc).__name__)
                conn = self._drop(conn)
            except Exception as exc:
                self.fail(str(exc) or type(exc).__name__)
                conn = self._drop(conn)
            if self.interval:
                await asyncio.sleep(max(0.0, self.interval - (loop.time() - start)))
        self._drop(conn)

    @staticmethod
    def _drop(conn: _Connection | None) -> None:
        if conn is not None:
            conn.close()
        return None

    async def monitor(self, stop_at: float) -> None:
        """Every 0.2 s, the agent's last tick time: gaps between ticks show whether they kept time."""
        loop = asyncio.get_running_loop()
        request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        while loop.time() < stop_at:
            try:
                async with asyncio.timeout(TIMEOUT):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.write(request)
                    text = (await reader.read()).decode()
                    writer.close()
                stamp = sample(text.split("\r\n\r\n", 1)[-1], "gpucost_agent_last_sample_timestamp_seconds")
                if stamp is not None and (not self.tick_stamps or stamp != self.tick_stamps[-1]):
                    self.tick_stamps.append(stamp)
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.2)

    async def run(self) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        stop_at = start + self.duration
        # Spread the first scrapes over one interval, as Prometheus spreads its targets.
        spread = self.interval or 0.0
        await asyncio.gather(self.monitor(stop_at),
                             *(self.scraper(stop_at, spread * i / self.scrapers) for i in range(self.scrapers)))
        return loop.time() - start


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scrapers", type=int, default=200)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.0,
                    help="seconds between one scraper's scrapes (0: back to back)")
    ap.add_argument("--new-connections", action="store_true", help="a new TCP connection per scrape")
    ap.add_argument("--agent", default="demo", help="the agent's command and arguments (default: demo; "
                    "'run' samples this node's GPUs)")
    args = ap.parse_args()

    port = free_port()
    state = tempfile.mkdtemp(prefix="scrape-storm-")  # `run` persists: never the machine's own state
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *shlex.split(args.agent), "--listen", f"127.0.0.1:{port}",
         "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": state},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                scrape_text(port)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(f"agent did not start: {proc.stderr.read() if proc.stderr else ''}", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        time.sleep(2.5)  # a few ticks in
        before = agent_state(port)
        cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
        storm = Storm(port, args.scrapers, args.duration, args.interval, args.new_connections)
        elapsed = asyncio.run(storm.run())
        cpu1, client1 = cpu_seconds(proc.pid), time.process_time()
        after = agent_state(port)
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(state, ignore_errors=True)

    lat = storm.latencies
    failed = sum(storm.failures.values())
    wall = after["wall"] - before["wall"]
    ticks = (after["ticks"] or 0) - (before["ticks"] or 0)
    print(f"{args.scrapers} scrapers for {elapsed:.1f} s, "
          f"{'back to back' if not args.interval else f'every {args.interval:g} s'}, "
          f"{'a new connection per scrape' if args.new_connections else 'keep-alive'}, loopback, "
          f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"scrapes: {len(lat)} ok ({len(lat) / elapsed:.0f}/s, {storm.bytes / max(1, len(lat)) / 1024:.1f} KiB "
          f"each), {failed} failed" + (f" {storm.failures}" if failed else ""))
    if lat:
        print(f"latency: p50 {statistics.median(lat) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms, "
              f"max {max(lat) * 1000:.1f} ms")
    print(f"CPU during the storm, s per s: agent {(cpu1 - cpu0) / elapsed:.2f}, "
          f"these scrapers {(client1 - client0) / elapsed:.2f}")
    late = after["wall"] - (after["last"] or 0)
    print(f"ticks: {ticks:.0f} in {wall:.1f} s of wall time (1 s tick: {wall:.0f} expected), "
          f"{(after['skipped'] - before['skipped']):.0f} skipped; last sample {late:.2f} s before the final scrape")
    gaps = [b - a for a, b in zip(storm.tick_stamps, storm.tick_stamps[1:])]
    if gaps:
        print(f"tick spacing seen during the storm: {len(gaps)} gaps, median {statistics.median(gaps):.3f} s, "
              f"max {max(gaps):.3f} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
