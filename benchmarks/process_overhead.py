"""What the running agent costs the node, measured whole, next to a peer exporter.

    .venv/bin/python benchmarks/process_overhead.py [--gpus 8,64] [--scenario idle,busy] [--repeat 3]
    .venv/bin/python benchmarks/process_overhead.py --real-nvml [--load CMD]   # on a GPU node

For each scenario, GPU count and repetition, starts ``gpu-cost-agent run`` and nvitop-exporter
(the peer) as subprocesses over the same synthetic NVML (``tests/fakenvml``: a fake ``pynvml``
module first on PYTHONPATH, ``FAKE_NVML_GPUS`` GPUs), both ticking every second, and measures
each process from the outside, in the same windows:

* What NVML costs: by default every fake call spends, busy on the calling thread, the CPU the
  same call spent on a real H100 (``FAKE_NVML_COST=1``; the table is ``_COST_US`` in the fake:
  3.8 ms for the energy counter, 0.39 ms for the power-sample buffer, 1 to 10 µs for the cheap
  reads), so both tools pay the driver's bill; ``--free-nvml`` measures with free calls (only the
  fake's Python), the view before.
* Scenarios: ``idle``, no process on any GPU; ``busy``, one compute process on every GPU (a real
  ``sleep`` child per GPU, listed by the fake with 1 GiB of GPU memory), so per-process work
  (process lists, attribution, nvitop's per-process metrics) is paid.
* CPU per second of wall time, over a steady window after a warm-up, first unscraped, then
  scraped every ``--scrape-interval`` seconds (Prometheus' 15 s default). Read from the
  kernel's CPU-time clock of the process (ns, all threads, exited ones included:
  ``clock_gettime`` on the process's CPU clock, the precise ``sum_exec_runtime`` behind
  ``/proc/<pid>/stat``), cross-checked against ``utime + stime`` from ``/proc/<pid>/stat``
  (10 ms ticks, so ±0.3 ms/s on 60 s). With ``--repeat N`` each figure is the median of N
  runs (min and max beside it), and the ratio is nvitop-exporter's median over the agent's,
  scraped and unscraped.
* The per-GPU slope: (CPU at the largest GPU count - CPU at the smallest) / (difference in
  GPUs), from the medians, per tool, in µs of CPU per second per GPU.
* Resident memory (``VmRSS``, its ``RssAnon`` / ``RssFile`` parts, and the peak ``VmHWM``) and
  threads from ``/proc/<pid>/status``. The agent's and the fake's bytecode is compiled first, as
  ``pip install`` does: a module compiled from source at start leaves the compiler's memory in
  the process (about 1 MiB for the agent's modules).
* CPU per thread of the agent over the same windows, from ``/proc/<pid>/task/*/schedstat``
  (ns on the CPU): a ``sitecustomize`` put on the agent's ``PYTHONPATH`` gives each Python
  thread its name as the OS thread name (``prctl(PR_SET_NAME)``), so the kernel can tell
  ``sample`` (the tick), ``gpu-calls-N`` (NVML), ``http``, ``pacer``, ``APScheduler`` apart.
* The agent's energy-counter reads per second over both windows, from its own
  ``gpucost_agent_gpu_energy_reads_total``.
* Scrape latency: nearest-rank percentiles of ``--latency-scrapes`` scrapes per run, pooled over
  the repetitions, one new connection each, with Prometheus' request headers (gzip, OpenMetrics
  preferred), spaced ``--latency-spacing`` seconds apart so every scrape sees a new tick (the
  agent serves a cached body within one tick; Prometheus at 15 s never gets one). A percentile
  is printed only where the scrapes are enough for it (p99: 100 and more; p90: 10 and more).

``--real-nvml``: no fake; the real driver and every GPU of the machine, optionally under a load
(``--load CMD``, started before the warm-up and stopped after the windows). The report adds the
agent's CPU per GPU-second (ms of CPU per second per GPU, the counter reads included).

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


def metric_value(port: int, name: str) -> float | None:
    """One sample's value from a plain-text scrape (no gzip), or None where absent."""
    request = (f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as s:
        s.sendall(request)
        data = b"".join(iter(lambda: s.recv(65536), b""))
    for line in data.partition(b"\r\n\r\n")[2].decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


COUNTER_READS = "gpucost_agent_gpu_energy_reads_total"


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
    scenario: str = "idle"
    repetition: int = 0
    start_seconds: float = 0.0
    unscraped: Window | None = None
    scraped: Window | None = None
    rss_peak_bytes: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_n: int = 0
    latency_ms: list[float] = field(default_factory=list)
    body_bytes: int = 0
    #: The agent's energy-counter reads per second over both windows (None for the peer).
    counter_reads_per_s: float | None = None
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


def run_one(args: argparse.Namespace, gpus: int, peer_python: Path | None, workdir: Path,
            scenario: str = "idle", repetition: int = 0) -> list[Result]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUCOST_", "PYTHON", "FAKE_NVML_"))}
    env = {**base_env, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    run_dir = workdir / f"{scenario}-{gpus}gpu-{repetition}"
    run_dir.mkdir()
    sleepers: list[subprocess.Popen[bytes]] = []
    if not args.real_nvml:
        env.update({"PYTHONPATH": str(args.fake), "FAKE_NVML_GPUS": str(gpus),
                    "FAKE_NVML_COST": "0" if args.free_nvml else "1"})
        if scenario == "busy":
            # One real process per GPU (so /proc/<pid> answers both tools), listed by the fake.
            sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(gpus)]
            script = run_dir / "nvml-script.json"
            script.write_text(json.dumps({"gpus": {str(i): {"processes": [[p.pid, 1 << 30]]}
                                                  for i, p in enumerate(sleepers)}}))
            env["FAKE_NVML_SCRIPT"] = str(script)
    for extra in args.env:
        key, _, value = extra.partition("=")
        env[key] = value
    names_dir = run_dir / "thread-names"
    names_dir.mkdir()
    (names_dir / "sitecustomize.py").write_text(THREAD_NAMES)
    agent_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(names_dir)) if p)}
    port = free_port()
    exporters = [Exporter("agent", agent_argv(args, port, run_dir / "state"), agent_env, port, run_dir)]
    if peer_python is not None:
        port = free_port()
        argv = [str(peer_python), "-m", "nvitop_exporter", "--bind-address", "127.0.0.1", "--port", str(port),
                "--interval", str(args.interval), "--hostname", "bench"]
        exporters.append(Exporter("nvitop-exporter", argv, env, port, run_dir))
    results = [Result(e.name, gpus, scenario, repetition) for e in exporters]
    load = None
    try:
        if args.load:
            load = subprocess.Popen(args.load, shell=True, cwd=run_dir, start_new_session=True,
                                    stdout=open(run_dir / "load.log", "w"), stderr=subprocess.STDOUT)
        for e, r in zip(exporters, results):
            e.wait_ready()
            r.start_seconds = e.ready_seconds or 0.0
        time.sleep(args.warmup)
        reads0, t_reads0 = metric_value(exporters[0].port, COUNTER_READS), time.monotonic()
        for r, w in zip(results, measure_window(exporters, args.window, None)):
            r.unscraped = w
        for r, w in zip(results, measure_window(exporters, args.window, args.scrape_interval)):
            r.scraped = w
        reads1, t_reads1 = metric_value(exporters[0].port, COUNTER_READS), time.monotonic()
        if reads0 is not None and reads1 is not None:
            results[0].counter_reads_per_s = (reads1 - reads0) / (t_reads1 - t_reads0)
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
                r.latency_ms = values
                r.latency_p50_ms = statistics.median(values)
                r.latency_p99_ms = percentile(values, 99)
                r.latency_max_ms = max(values)
                r.body_bytes = sizes[e.name]
            if e.proc.poll() is not None:
                r.error = f"exited with {e.proc.returncode} during the run"
    finally:
        for e in exporters:
            e.stop()
        if load is not None and load.poll() is None:
            os.killpg(load.pid, signal.SIGTERM)
            load.wait(20)
        for p in sleepers:
            p.kill()
            p.wait()
    return results


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def fmt_pct(values: list[float]) -> str:
    """p50 / p90 / p99 (nearest rank) of scrape latencies, each only where there are enough."""
    if not values:
        return "–"
    parts = [f"{statistics.median(values):.1f}"]
    parts.append(f"{percentile(values, 90):.1f}" if len(values) >= 10 else "–")
    parts.append(f"{percentile(values, 99):.1f}" if len(values) >= 100 else "–")
    return " / ".join(parts) + f" (n={len(values)})"


def spread(values: list[float]) -> str:
    """Median, with min–max beside it when there are several."""
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}–{max(values):.2f})"


def table(results: list[Result], scrape_every: float, real: bool = False) -> str:
    """One table per scenario: medians over the repetitions, then the ratios and the slope."""
    ok = [r for r in results if r.unscraped is not None and r.scraped is not None]
    out: list[str] = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        rows = [r for r in ok if r.scenario == scenario]
        groups: dict[tuple[int, str], list[Result]] = {}
        for r in rows:
            groups.setdefault((r.gpus, r.name), []).append(r)
        reps = max((len(v) for v in groups.values()), default=0)
        out += [f"scenario {scenario}: {reps} run(s) each; CPU in ms per second of wall time, median (min–max)", ""]
        per_gpu = " | agent CPU per GPU-second (ms, scraped)" if real else ""
        out.append(f"| GPUs | exporter | CPU unscraped | CPU scraped every {scrape_every:g} s | counter reads/s "
                   f"| RSS (MiB) | threads | scrape p50 / p90 / p99 (ms){per_gpu} |")
        out.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if real else ""))
        for (n, name), rs in groups.items():
            un = [r.unscraped.cpu_ms_per_s for r in rs]  # type: ignore[union-attr]
            sc = [r.scraped.cpu_ms_per_s for r in rs]  # type: ignore[union-attr]
            reads = [r.counter_reads_per_s for r in rs if r.counter_reads_per_s is not None]
            lat = [x for r in rs for x in r.latency_ms]
            extra = f" | {statistics.median(sc) / n:.3f}" if real and name == "agent" else (" | –" if real else "")
            reads_text = f"{statistics.median(reads):.2f}" if reads else "–"
            rss = mib(int(statistics.median(r.scraped.rss_bytes for r in rs)))  # type: ignore[union-attr]
            out.append(f"| {n} | {name} | {spread(un)} | {spread(sc)} | {reads_text} | {rss} "
                       f"| {rs[-1].scraped.threads} | {fmt_pct(lat)}{extra} |")  # type: ignore[union-attr]
        failed = [r for r in results if r.scenario == scenario and (r.unscraped is None or r.scraped is None)]
        for r in failed:
            out.append(f"| {r.gpus} | {r.name} | failed: {r.error} | | | | | |")
        out.append("")
        counts = sorted({n for n, _ in groups})
        for n in counts:
            a, p = groups.get((n, "agent")), groups.get((n, "nvitop-exporter"))
            if not a or not p:
                continue
            med = {k: statistics.median(getattr(r, k).cpu_ms_per_s for r in a) for k in ("unscraped", "scraped")}
            pmed = {k: statistics.median(getattr(r, k).cpu_ms_per_s for r in p) for k in ("unscraped", "scraped")}
            per_run = [f"{rp.scraped.cpu_ms_per_s / ra.scraped.cpu_ms_per_s:.1f}"  # type: ignore[union-attr]
                       for ra, rp in zip(sorted(a, key=lambda r: r.repetition), sorted(p, key=lambda r: r.repetition))]
            out.append(f"{n} GPUs: nvitop-exporter / agent CPU: scraped {pmed['scraped'] / med['scraped']:.1f}×, "
                       f"unscraped {pmed['unscraped'] / med['unscraped']:.1f}× (medians; scraped, run by run: "
                       f"{', '.join(per_run)})")
        if len(counts) >= 2:
            lo, hi = counts[0], counts[-1]
            for name in ("agent", "nvitop-exporter"):
                if (lo, name) in groups and (hi, name) in groups:
                    slope = [(statistics.median(getattr(r, k).cpu_ms_per_s for r in groups[(hi, name)])
                              - statistics.median(getattr(r, k).cpu_ms_per_s for r in groups[(lo, name)]))
                             / (hi - lo) * 1e3 for k in ("unscraped", "scraped")]
                    out.append(f"per-GPU slope {lo}→{hi} GPUs, {name}: {slope[0]:.0f} µs/s per GPU unscraped, "
                               f"{slope[1]:.0f} scraped")
        out.append("")
    return "\n".join(out)


def real_gpu_count() -> int:
    """GPUs the real driver sees (the project's nvidia-ml-py, no fake on the path)."""
    code = "import pynvml as n; n.nvmlInit(); print(n.nvmlDeviceGetCount())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"--real-nvml: NVML does not answer here: {r.stderr.strip().splitlines()[-1:]}")
    return int(r.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="8,64", help="comma-separated GPU counts (default 8,64; ignored with --real-nvml)")
    ap.add_argument("--scenario", default="idle,busy",
                    help="comma-separated: idle (no process), busy (one process per GPU); default both")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each scenario and GPU count (medians reported)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after both serve, before measuring")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of each steady window")
    ap.add_argument("--scrape-interval", type=float, default=15.0, help="seconds between scrapes (scraped window)")
    ap.add_argument("--latency-scrapes", type=int, default=100, help="latency scrapes per run (pooled over --repeat)")
    ap.add_argument("--latency-spacing", type=float, default=1.1, help="seconds between latency scrapes")
    ap.add_argument("--interval", type=float, default=1.0, help="nvitop-exporter's update interval (s)")
    ap.add_argument("--config", default=str(ROOT / "deploy" / "config.tou.toml"),
                    help="the agent's config (default deploy/config.tou.toml; '' for none)")
    ap.add_argument("--fake", default=str(FAKE_DIR), help="folder holding the fake pynvml module")
    ap.add_argument("--free-nvml", action="store_true",
                    help="fake NVML calls cost nothing (only the fake's Python): the view before the costed fake")
    ap.add_argument("--real-nvml", action="store_true",
                    help="the real driver and every GPU of this machine, no fake (reports CPU per GPU-second)")
    ap.add_argument("--load", metavar="CMD", default="",
                    help="shell command started before the warm-up and stopped after the windows (a GPU load)")
    ap.add_argument("--peer-venv", type=Path, default=PEER_VENV, help="venv for nvitop-exporter (created if absent)")
    ap.add_argument("--no-peer", action="store_true", help="measure the agent alone")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for both")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = ap.parse_args()
    if args.real_nvml:
        try:
            counts = [real_gpu_count()]
        except RuntimeError as exc:
            print(f"process_overhead: {exc}", file=sys.stderr)
            return 2
        scenarios = ["real"]
    else:
        if not (Path(args.fake) / "pynvml.py").exists():
            print(f"process_overhead: no fake pynvml in {args.fake}", file=sys.stderr)
            return 2
        counts = [int(x) for x in args.gpus.split(",") if x.strip()]
        scenarios = [x.strip() for x in args.scenario.split(",") if x.strip()]
        if not set(scenarios) <= {"idle", "busy"}:
            print(f"process_overhead: unknown scenario in {args.scenario!r} (idle, busy)", file=sys.stderr)
            return 2
    peer = None if args.no_peer else ensure_peer(args.peer_venv)
    for folder in (ROOT / "agent", Path(args.fake)):  # the site-packages were compiled by pip
        compileall.compile_dir(folder, quiet=1)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpucost-overhead-") as tmp:
        for rep in range(args.repeat):
            for scenario in scenarios:
                for n in counts:
                    print(f"run {rep + 1}/{args.repeat}, {scenario}, {n} GPUs: warm-up {args.warmup:g} s, unscraped "
                          f"{args.window:g} s, scraped {args.window:g} s, {args.latency_scrapes} latency scrapes ...",
                          file=sys.stderr, flush=True)
                    try:
                        results += run_one(args, n, peer, Path(tmp), scenario, rep)
                    except RuntimeError as exc:
                        print(f"process_overhead: {n} GPUs: {exc}", file=sys.stderr)
                        for name in ["agent"] + ([] if peer is None else ["nvitop-exporter"]):
                            log = Path(tmp) / f"{scenario}-{n}gpu-{rep}" / f"{name}.log"
                            if log.exists():
                                print(f"--- {name} log (tail) ---\n" + "".join(log.read_text().splitlines(True)[-15:]),
                                      file=sys.stderr)
                        return 1
    peer_text = "" if peer is None else (f", nvitop-exporter {version_of(peer, 'nvitop-exporter')} "
                                         f"(interval {args.interval:g} s)")
    nvml = ("real NVML" if args.real_nvml else
            "fake NVML, calls free (--free-nvml)" if args.free_nvml else "fake NVML, each call costing its H100 CPU")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, {nvml}, "
          f"agent config {Path(args.config).name if args.config else '(none)'}, tick 1 s{peer_text}; "
          f"windows {args.window:g} s after {args.warmup:g} s warm-up; latency over {args.latency_scrapes} scrapes "
          f"{args.latency_spacing:g} s apart per run")
    print()
    print(table(results, args.scrape_interval, real=args.real_nvml))
    for r in results:
        if r.unscraped and r.scraped:
            if r.name == "agent":
                busy = sorted(r.unscraped.thread_ms_per_s.items(), key=lambda kv: -kv[1])
                print(f"  {r.scenario} {r.gpus:>3} run {r.repetition + 1} agent per thread, unscraped (ms/s): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in busy if v >= 0.0005))
            print(f"  {r.scenario} {r.gpus:>3} run {r.repetition + 1} {r.name}: CPU {r.unscraped.cpu_ms_per_s:.2f} / "
                  f"{r.scraped.cpu_ms_per_s:.2f} ms/s, utime+stime {r.unscraped.stat_ms_per_s:.2f} / "
                  f"{r.scraped.stat_ms_per_s:.2f} ms/s, RSS anon {mib(r.scraped.rss_anon_bytes)} + file "
                  f"{mib(r.scraped.rss_file_bytes)} MiB, peak RSS {mib(r.rss_peak_bytes)} MiB, "
                  f"serving after {r.start_seconds:.1f} s, scrape max {r.latency_max_ms or 0:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
