"""What the running agent costs the node, measured whole, next to a peer exporter.

    .venv/bin/python benchmarks/process_overhead.py [--gpus 1,8,64] [--warmup 10] [--window 60]

For each GPU count, starts ``gpu-cost-agent run`` and nvitop-exporter (the peer) as
subprocesses over the same synthetic NVML (``tests/fakenvml``: a fake ``pynvml``
module first on PYTHONPATH, ``FAKE_NVML_GPUS`` GPUs), both ticking every second,
and measures each process from the outside, in the same windows:

* CPU per second of wall time, over a steady window after a warm-up, first
  unscraped, then scraped every ``--scrape-interval`` seconds (Prometheus' 15 s
  default). Read from the kernel's CPU-time clock of the process (ns, all threads,
  exited ones included: ``clock_gettime`` on the process's CPU clock, the precise
  ``sum_exec_runtime`` behind ``/proc/<pid>/stat``), cross-checked against
  ``utime + stime`` from ``/proc/<pid>/stat`` (10 ms ticks, so ±0.3 ms/s on 60 s).
* Resident memory (``VmRSS``, its ``RssAnon`` / ``RssFile`` parts, and the peak ``VmHWM``) and
  threads from ``/proc/<pid>/status``. The agent's and the fake's bytecode is compiled first, as
  ``pip install`` does: a module compiled from source at start leaves the compiler's memory in
  the process (about 1 MiB for the agent's modules).
* CPU per thread of the agent over the same windows, from ``/proc/<pid>/task/*/schedstat``
  (ns on the CPU): a ``sitecustomize`` put on the agent's ``PYTHONPATH`` gives each Python
  thread its name as the OS thread name (``prctl(PR_SET_NAME)``), so the kernel can tell
  ``sample`` (the tick), ``gpu-calls-N`` (NVML), ``http``, ``pacer``, ``APScheduler`` apart.
* Scrape latency: p50 / p99 of ``--latency-scrapes`` scrapes, one new connection
  each, with Prometheus' request headers (gzip, OpenMetrics preferred), spaced
  ``--latency-spacing`` seconds apart so every scrape sees a new tick (the agent
  serves a cached body within one tick; Prometheus at 15 s never gets one).

The peer is installed at benchmark time into its own virtual environment
(``--peer-venv``, default ``/tmp/gpucost-bench-nvitop``), never into the project's:
``python -m venv DIR && DIR/bin/pip install nvitop-exporter``. ``--no-peer`` skips it.
The agent runs with ``deploy/config.tou.toml`` (time-of-use tariff, PUE, carbon,
amortisation, demand charge, host power) unless ``--config`` says otherwise.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_DIR = ROOT / "tests" / "fakenvml"
PEER_VENV = Path("/tmp/gpucost-bench-nvitop")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: What Prometheus 2.x sends with every scrape.
PROM_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
               "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_clock_ns(pid: int) -> int:
    """CPU time of every thread the process ever had (the kernel's per-process CPU clock). Units: ns."""
    clock_id = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), as clock_getcpuclockid(3)
    return time.clock_gettime_ns(clock_id)


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/<pid>/stat. Units: s (10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


#: Benchmark only: names each Python thread's OS thread after it (comm, 15 bytes), so per-thread
#: CPU can be read from /proc. Loaded through PYTHONPATH by the agent under test, nowhere else.
THREAD_NAMES = """import ctypes, threading
_prctl = ctypes.CDLL(None).prctl
def _name(n):
    try:
        _prctl(15, ctypes.c_char_p(n.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass
_inner = threading.Thread._bootstrap_inner
def _bootstrap_inner(self):
    _name(self.name)
    return _inner(self)
threading.Thread._bootstrap_inner = _bootstrap_inner
"""


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU time of each live thread of ``pid`` by name (gpu-calls-N summed), from schedstat. Units: ns."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        if name.startswith("gpu-calls-"):
            name = "gpu-calls-*"
        out[name] = out.get(name, 0) + ns
    return out


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM (bytes) and Threads from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


def scrape(port: int, timeout: float = 10.0) -> tuple[float, int]:
    """One Prometheus-like scrape on a new connection: (seconds to the last byte, body bytes)."""
    request = (f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {PROM_ACCEPT}\r\n"
               "Accept-Encoding: gzip\r\nUser-Agent: Prometheus/2.42.0\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n"
               "Connection: close\r\n\r\n").encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    elapsed = time.perf_counter() - started
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status_line + b" ":
        raise RuntimeError(f"scrape of port {port} answered {status_line!r}")
    return elapsed, len(body)


@dataclass
class Window:
    seconds: float
    cpu_ms_per_s: float  # from the process CPU clock (ns)
    stat_ms_per_s: float  # from utime+stime (10 ms ticks)
    rss_bytes: int
    rss_anon_bytes: int
    rss_file_bytes: int
    threads: int
    scrapes: list[float] = field(default_factory=list)
    #: CPU per thread name over the window (threads alive at both ends). Units: ms/s.
    thread_ms_per_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    gpus: int
    start_seconds: float = 0.0
    unscraped: Window | None = None
    scraped: Window | None = None
    rss_peak_bytes: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_n: int = 0
    body_bytes: int = 0
    error: str = ""


class Exporter:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.log = open(workdir / f"{name}.log", "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.ready_seconds: float | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (see {self.log.name})")
            try:
                scrape(self.port, timeout=2.0)
                self.ready_seconds = time.monotonic() - self.started
                return
            except (OSError, RuntimeError):
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not serve /metrics within {timeout:.0f} s (see {self.log.name})")

    def sample(self) -> tuple[int, float]:
        return cpu_clock_ns(self.pid), stat_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def measure_window(exporters: list[Exporter], seconds: float, scrape_every: float | None) -> list[Window]:
    """CPU of every exporter over the same ``seconds``; scrapes all of them every ``scrape_every`` s."""
    latencies: dict[str, list[float]] = {e.name: [] for e in exporters}
    threads_before = [thread_cpu_ns(e.pid) for e in exporters]
    before = [e.sample() for e in exporters]
    t0 = time.monotonic()
    if scrape_every:
        next_scrape = t0 + scrape_every / 2  # mid-phase: never right at the window's edges
        while True:
            now = time.monotonic()
            if next_scrape >= t0 + seconds:
                break
            time.sleep(max(0.0, next_scrape - now))
            for e in exporters:
                latencies[e.name].append(scrape(e.port)[0])
            next_scrape += scrape_every
    time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    after = [e.sample() for e in exporters]
    elapsed = time.monotonic() - t0
    threads_after = [thread_cpu_ns(e.pid) for e in exporters]
    out = []
    for e, (c0, s0), (c1, s1), tb, ta in zip(exporters, before, after, threads_before, threads_after):
        if e.proc.poll() is not None:
            raise RuntimeError(f"{e.name} exited with {e.proc.returncode} during the window (see {e.log.name})")
        st = status(e.pid)
        out.append(Window(
            seconds=elapsed,
            cpu_ms_per_s=(c1 - c0) / 1e6 / elapsed,
            stat_ms_per_s=(s1 - s0) * 1e3 / elapsed,
            rss_bytes=st["VmRSS"],
            rss_anon_bytes=st["RssAnon"],
            rss_file_bytes=st["RssFile"],
            threads=st["Threads"],
            scrapes=[x * 1e3 for x in latencies[e.name]],
            thread_ms_per_s={k: (v - tb[k]) / 1e6 / elapsed for k, v in sorted(ta.items()) if k in tb},
        ))
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def ensure_peer(venv: Path) -> Path:
    """The peer's Python, installing nvitop-exporter into its own venv on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import nvitop_exporter"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing nvitop-exporter into {venv} (benchmark only) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "nvitop-exporter"], check=True)
    return python


def version_of(python: Path | str, package: str) -> str:
    code = f"from importlib.metadata import version; print(version({package!r}))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def agent_argv(args: argparse.Namespace, port: int, state_dir: Path) -> list[str]:
    script = Path(sys.executable).with_name("gpu-cost-agent")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
    argv = [*head, "run", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state_dir)]
    if args.config:
        argv += ["--config", args.config]
    return argv


def run_one(args: argparse.Namespace, gpus: int, peer_python: Path | None, workdir: Path) -> list[Result]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCOST_", "PYTHON"))}
    env = {**base_env, "PYTHONPATH": str(args.fake), "FAKE_NVML_GPUS": str(gpus), "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    for extra in args.env:
        key, _, value = extra.partition("=")
        env[key] = value
    run_dir = workdir / f"{gpus}gpu"
    run_dir.mkdir()
    names_dir = run_dir / "thread-names"
    names_dir.mkdir()
    (names_dir / "sitecustomize.py").write_text(THREAD_NAMES)
    agent_env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{names_dir}"}
    port = free_port()
    exporters = [Exporter("agent", agent_argv(args, port, run_dir / "state"), agent_env, port, run_dir)]
    if peer_python is not None:
        port = free_port()
        argv = [str(peer_python), "-m", "nvitop_exporter", "--bind-address", "127.0.0.1", "--port", str(port),
                "--interval", str(args.interval), "--hostname", "bench"]
        exporters.append(Exporter("nvitop-exporter", argv, env, port, run_dir))
    results = [Result(e.name, gpus) for e in exporters]
    try:
        for e, r in zip(exporters, results):
            e.wait_ready()
            r.start_seconds = e.ready_seconds or 0.0
        time.sleep(args.warmup)
        for r, w in zip(results, measure_window(exporters, args.window, None)):
            r.unscraped = w
        for r, w in zip(results, measure_window(exporters, args.window, args.scrape_interval)):
            r.scraped = w
        lat: dict[str, list[float]] = {e.name: [] for e in exporters}
        sizes: dict[str, int] = {}
        for _ in range(args.latency_scrapes):
            t = time.monotonic()
            for e in exporters:
                seconds, size = scrape(e.port)
                lat[e.name].append(seconds * 1e3)
                sizes[e.name] = size
            time.sleep(max(0.0, t + args.latency_spacing - time.monotonic()))
        for e, r in zip(exporters, results):
            st = status(e.pid)
            r.rss_peak_bytes = st["VmHWM"]
            values = lat[e.name]
            if values:
                r.latency_n = len(values)
                r.latency_p50_ms = statistics.median(values)
                r.latency_p99_ms = percentile(values, 99)
                r.latency_max_ms = max(values)
                r.body_bytes = sizes[e.name]
            if e.proc.poll() is not None:
                r.error = f"exited with {e.proc.returncode} during the run"
    finally:
        for e in exporters:
            e.stop()
    return results


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(results: list[Result], scrape_every: float) -> str:
    head = (f"| GPUs | exporter | CPU unscraped (ms/s) | CPU scraped every {scrape_every:g} s (ms/s) | RSS (MiB) | threads "
            "| scrape p50 / p99 (ms) | body (gzip bytes) |")
    lines = [head, "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.unscraped is None or r.scraped is None:
            lines.append(f"| {r.gpus} | {r.name} | failed: {r.error} | | | | | |")
            continue
        lat = f"{r.latency_p50_ms:.1f} / {r.latency_p99_ms:.1f}" if r.latency_p50_ms is not None else "–"
        lines.append(
            f"| {r.gpus} | {r.name} | {r.unscraped.cpu_ms_per_s:.2f} | {r.scraped.cpu_ms_per_s:.2f} "
            f"| {mib(r.scraped.rss_bytes)} | {r.scraped.threads} | {lat} | {r.body_bytes} |"
        )
    by_gpus: dict[int, dict[str, Result]] = {}
    for r in results:
        by_gpus.setdefault(r.gpus, {})[r.name] = r
    ratios = []
    for n, named in by_gpus.items():
        a, p = named.get("agent"), named.get("nvitop-exporter")
        if a and p and a.unscraped and p.unscraped and a.unscraped.cpu_ms_per_s > 0:
            ratios.append(f"{n} GPUs: nvitop-exporter / agent CPU unscraped = "
                          f"{p.unscraped.cpu_ms_per_s / a.unscraped.cpu_ms_per_s:.1f}×")
    return "\n".join(lines + ([""] + ratios if ratios else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,8,64", help="comma-separated GPU counts (default 1,8,64)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after both serve, before measuring")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of each steady window")
    ap.add_argument("--scrape-interval", type=float, default=15.0, help="seconds between scrapes (scraped window)")
    ap.add_argument("--latency-scrapes", type=int, default=100, help="scrapes for the latency percentiles")
    ap.add_argument("--latency-spacing", type=float, default=1.1, help="seconds between latency scrapes")
    ap.add_argument("--interval", type=float, default=1.0, help="nvitop-exporter's update interval (s)")
    ap.add_argument("--config", default=str(ROOT / "deploy" / "config.tou.toml"),
                    help="the agent's config (default deploy/config.tou.toml; '' for none)")
    ap.add_argument("--fake", default=str(FAKE_DIR), help="folder holding the fake pynvml module")
    ap.add_argument("--peer-venv", type=Path, default=PEER_VENV, help="venv for nvitop-exporter (created if absent)")
    ap.add_argument("--no-peer", action="store_true", help="measure the agent alone")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for both")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = ap.parse_args()
    if not (Path(args.fake) / "pynvml.py").exists():
        print(f"process_overhead: no fake pynvml in {args.fake}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.gpus.split(",") if x.strip()]
    peer = None if args.no_peer else ensure_peer(args.peer_venv)
    for folder in (ROOT / "agent", Path(args.fake)):  # the site-packages were compiled by pip
        compileall.compile_dir(folder, quiet=1)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpucost-overhead-") as tmp:
        for n in counts:
            print(f"{n} GPUs: warm-up {args.warmup:g} s, unscraped {args.window:g} s, scraped {args.window:g} s, "
                  f"{args.latency_scrapes} latency scrapes ...", file=sys.stderr, flush=True)
            try:
                results += run_one(args, n, peer, Path(tmp))
            except RuntimeError as exc:
                print(f"process_overhead: {n} GPUs: {exc}", file=sys.stderr)
                for name in ["agent"] + ([] if peer is None else ["nvitop-exporter"]):
                    log = Path(tmp) / f"{n}gpu" / f"{name}.log"
                    if log.exists():
                        print(f"--- {name} log (tail) ---\n" + "".join(log.read_text().splitlines(True)[-15:]),
                              file=sys.stderr)
                return 1
    peer_text = "" if peer is None else (f", nvitop-exporter {version_of(peer, 'nvitop-exporter')} "
                                         f"(interval {args.interval:g} s)")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"agent config {Path(args.config).name if args.config else '(none)'}, tick 1 s{peer_text}; "
          f"windows {args.window:g} s after {args.warmup:g} s warm-up; latency over {args.latency_scrapes} scrapes "
          f"{args.latency_spacing:g} s apart")
    print()
    print(table(results, args.scrape_interval))
    for r in results:
        if r.unscraped and r.scraped:
            if r.name == "agent":
                busy = sorted(r.unscraped.thread_ms_per_s.items(), key=lambda kv: -kv[1])
                print(f"  {r.gpus:>3} agent per thread, unscraped (ms/s): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in busy if v >= 0.0005))
            print(f"  {r.gpus:>3} {r.name}: utime+stime {r.unscraped.stat_ms_per_s:.2f} / "
                  f"{r.scraped.stat_ms_per_s:.2f} ms/s, RSS anon {mib(r.scraped.rss_anon_bytes)} + file "
                  f"{mib(r.scraped.rss_file_bytes)} MiB, peak RSS {mib(r.rss_peak_bytes)} MiB, "
                  f"serving after {r.start_seconds:.1f} s, scrape max {r.latency_max_ms or 0:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
