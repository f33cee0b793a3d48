"""A fleet of gpu-cost-agent nodes, simulated into Prometheus and VictoriaMetrics, and measured.

The exposition is the agent's own: ``benchmarks/fleet/template.prom`` is one scrape of
``gpu-cost-agent demo`` (rewrite it with ``--capture-template``), without the demo's
``gpucost_replay_*`` families. Each simulated node serves the template's node series once,
its GPU series once per GPU (``gpu``, ``uuid`` rewritten) and its workload series (5 per
workload: GPU energy, GPU seconds, cost by kind) for ``unallocated`` and for each job while it
runs and ``[attribution] retention_seconds`` (300 s) after. Jobs arrive per GPU as a Slurm
cluster's do (``--jobs-per-gpu-day``, exponential durations, 80 % of the time busy; labels
``kind="slurm_job"``, ``slurm_job``, ``user``) or as Kubernetes pods (``--mode kubernetes``:
``namespace``, ``pod``, ``pod_uid``, ``container``). Counters grow with each GPU's power
(busy 300-700 W, idle 70 W), gauges move with it.

The samples are written to both stores: VictoriaMetrics through ``/api/v1/import/prometheus``,
Prometheus through ``promtool tsdb create-blocks-from openmetrics``. Then the recording rules
of deploy/prometheus/rules/ are evaluated over the dense end of the data (VictoriaMetrics
range queries, group by group, the results imported into both stores as a ruler would have
written them), and the script measures, on each store: series, series created per day, bytes
on disk, every rule group's evaluation time (its rules' instant queries, one after another, as
a ruler evaluates a group), every fleet-dashboard panel's query time, the bill by team
(``gpu-cost-agent report --by team`` over the whole period) and the store's RSS.

Time: ``--days`` of history at ``--history-step`` (coarse: series and churn are exact at any
step, since every job is written at its start and its end), then ``--dense-minutes`` at
``--dense-step`` ending at the last sample, where rules and panels are timed.
``--scrape-step 15s --days 0.25`` with no coarse part is the full-resolution run that gives
bytes per sample. Prints one JSON object; ``--markdown`` also a table row.

    nice -n 10 .venv/bin/python benchmarks/fleet/simulate.py --nodes 100 --days 7
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("template.prom")
RULES = ROOT / "deploy" / "prometheus" / "rules"
RETENTION_S = 300.0          # [attribution] retention_seconds default
BUSY_SHARE = 0.8
PRICE_PER_J = 0.30 / 3.6e6   # 0.30 EUR/kWh
LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
CONSTANT = re.compile(r"^up$|info|limit|total_bytes|max_fds|price|pue|period_|start_time|carbon|_up$|build")


# -- the template --------------------------------------------------------------------


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    value: float


def read_template(path: Path = TEMPLATE) -> tuple[list[Series], list[Series], list[Series], float]:
    """(node series, GPU 0's series, one workload's 5 series, seconds the template's agent ran)."""
    node, gpu, workload = [], [], []
    ticks = 1.0
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        s = Series(m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3)))
        if s.name == "gpucost_agent_ticks_total":
            ticks = s.value
        if s.name.startswith("gpucost_workload_"):
            if s.labels.get("workload") == "unallocated":
                workload.append(s)
        elif s.labels.get("gpu") == "0":
            gpu.append(s)
        else:
            node.append(s)
    return node, gpu, workload, ticks * 5.0


def capture_template(path: Path) -> None:
    """One scrape of a demo agent, 6 s after its start, without the replay's own families."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tempfile.mkdtemp()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "demo", "--speed", "5", "--tick", "5", "--state-dir", state,
                             "--listen", f"127.0.0.1:{port}", "--log-level", "warning"], cwd=ROOT)
    try:
        time.sleep(6)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        shutil.rmtree(state, ignore_errors=True)
    path.write_text("".join(line + "\n" for line in text.splitlines() if "gpucost_replay_" not in line))


# -- the fleet ---------------------------------------------------------------------------


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


@dataclass
class Job:
    start: float
    end: float
    labels: dict[str, str]


@dataclass
class Fleet:
    nodes: int
    gpus: int
    mode: str
    jobs_per_gpu_day: float
    workloads: bool
    start: float
    end: float
    seed: int = 1
    jobs: list[list[list[Job]]] = field(default_factory=list)   # [node][gpu] -> jobs

    def __post_init__(self) -> None:
        self.node_t, self.gpu_t, self.wl_t, self.template_s = read_template()
        self.node_t.append(Series("up", {}, 1.0))   # what the scraper adds per target
        rng = random.Random(self.seed)
        mean = 86400.0 / self.jobs_per_gpu_day
        n = 0
        for i in range(self.nodes):
            per_node = []
            for g in range(self.gpus):
                t, jobs = self.start - rng.expovariate(1 / mean) * BUSY_SHARE, []
                while t < self.end:
                    run = rng.expovariate(1 / (mean * BUSY_SHARE))
                    n += 1
                    jobs.append(Job(t, t + run, self.job_labels(rng, n, i)))
                    t += run + rng.expovariate(1 / (mean * (1 - BUSY_SHARE)))
                per_node.append(jobs)
            self.jobs.append(per_node)

    def job_labels(self, rng: random.Random, n: int, node: int) -> dict[str, str]:
        base = {"container": "", "gpu_instance": "", "kind": "", "namespace": "", "pod": "", "pod_uid": "",
                "slurm_job": "", "unit": "", "user": f"u{rng.randrange(400)}"}
        if self.mode == "slurm":
            base.update(kind="slurm_job", slurm_job=str(1_000_000 + n), workload=f"slurm_job:{1_000_000 + n}")
        else:
            ns = f"team-{rng.randrange(40)}"
            pod = f"train-{n:08x}-{rng.randrange(1 << 20):05x}"
            base.update(kind="pod", namespace=ns, pod=pod, pod_uid=f"{n:08x}-0000-4000-8000-{node:012x}",
                        container="main", user="", workload=f"pod:{ns}/{pod}")
        return base

    def target(self, i: int) -> dict[str, str]:
        return {"job": "gpu-cost-agent", "instance": f"gpu-node-{i:05d}:9842", "cluster": f"c{i % 4}",
                "team": f"team-{i % 10}"}

    def prefixes(self, i: int) -> tuple[list[tuple[str, Series]], list[list[tuple[str, Series]]]]:
        """The node's own series and each GPU's, as ``name{labels}`` prefixes with their template."""
        tgt = self.target(i)
        node = [(f"{s.name}{{{labels_text({**s.labels, **tgt})}}}", s) for s in self.node_t]
        gpus = []
        for g in range(self.gpus):
            uuid = f"GPU-{i:08x}-{g:04x}-4000-8000-000000000000"
            gpus.append([(f"{s.name}{{{labels_text({**s.labels, 'gpu': str(g), 'uuid': uuid, **tgt})}}}", s)
                         for s in self.gpu_t])
        return node, gpus

    def busy(self, i: int, g: int, t: float) -> Job | None:
        for job in self.jobs[i][g]:
            if job.start <= t < job.end:
                return job
        return None

    def job_power(self, i: int, g: int, job: Job) -> float:
        """A job's mean power, 300-700 W: what its energy counters grow by."""
        return 300.0 + 400.0 * ((hash((i, g, int(job.start))) % 1000) / 1000)

    def power(self, i: int, g: int, t: float) -> float:
        """The power gauge: the job's mean ± 20 W, 70 W idle."""
        job = self.busy(i, g, t)
        if job is None:
            return 70.0
        return self.job_power(i, g, job) + 20 * math.sin(t / 97.0 + g)

    def state(self, i: int, g: int, t: float) -> tuple[float, float]:
        """(joules, idle seconds) of the GPU from the simulation's start to ``t``: each job at
        its mean power, 70 W between jobs. Both only grow with ``t``."""
        e, idle, last = 0.0, 0.0, self.start
        for job in self.jobs[i][g]:
            if job.start >= t:
                break
            a, b = max(job.start, self.start), min(job.end, t)
            if b > a:
                idle += max(0.0, a - last)
                e += 70.0 * max(0.0, a - last) + self.job_power(i, g, job) * (b - a)
                last = b
        idle += max(0.0, t - last)
        return e + 70.0 * max(0.0, t - last), idle


def value_of(s: Series, t: float, since: float, template_s: float, scale: float, gauge_factor: float) -> float:
    """A template series' value at ``t``: counters grow ``scale`` times as fast as in the
    template, gauges move with the power, constants stay, timestamps are ``t``."""
    if s.name.endswith("_timestamp_seconds") and "period" not in s.name:
        return round(t, 3)
    if s.name.endswith("_total") or s.name.endswith("_seconds_total"):
        return round(s.value / template_s * (t - since) * scale, 6) if s.value else 0.0
    if CONSTANT.search(s.name):
        return s.value
    return round(s.value * gauge_factor, 4)


def samples(fleet: Fleet, times: list[float], nodes: Iterable[int] | None = None):
    """Yield (name{labels}, value, t) of every sample of the fleet (or of ``nodes``) at ``times``
    (and of every job at its start and its end, whatever the step)."""
    since = fleet.start
    demo_gpu_j = 300.0 * fleet.template_s
    for i in (range(fleet.nodes) if nodes is None else nodes):
        node, gpus = fleet.prefixes(i)
        tgt = fleet.target(i)
        for t in times:
            energies = [fleet.state(i, g, t)[0] for g in range(fleet.gpus)]
            node_scale = sum(energies) / max(demo_gpu_j, 1.0) / max((t - since), 1.0) * fleet.template_s
            factor = 1.0 + 0.1 * math.sin(t / 600.0 + i)
            for prefix, s in node:
                yield prefix, value_of(s, t, since, fleet.template_s, node_scale, factor), t
            for g, series in enumerate(gpus):
                scale = energies[g] / max(demo_gpu_j, 1.0) / max((t - since), 1.0) * fleet.template_s
                p = fleet.power(i, g, t) / 300.0
                for prefix, s in series:
                    if s.name == "gpucost_gpu_energy_joules_total" and s.labels.get("source") == "counter":
                        v = round(energies[g], 3)
                    else:
                        v = value_of(s, t, since, fleet.template_s, scale, p)
                    yield prefix, v, t
        if not fleet.workloads:
            continue
        for g in range(fleet.gpus):
            uuid = f"GPU-{i:08x}-{g:04x}-4000-8000-000000000000"
            # `unallocated` at every step: the GPU's time between jobs, at idle power
            for t in times:
                idle = fleet.state(i, g, t)[1]
                for s in fleet.wl_t:
                    lab = {**s.labels, "gpu": str(g), "uuid": uuid, **tgt}
                    yield f"{s.name}{{{labels_text(lab)}}}", wl_value(s, idle, 70.0 * idle), t
            for job in fleet.jobs[i][g]:
                shown = job.end + RETENTION_S
                if shown < times[0] or job.start > times[-1]:
                    continue
                at = sorted({max(job.start, times[0]), *(t for t in times if job.start <= t <= shown),
                             min(shown, times[-1])})
                for s in fleet.wl_t:
                    lab = {**s.labels, **job.labels, "gpu": str(g), "uuid": uuid, **tgt}
                    prefix = f"{s.name}{{{labels_text(lab)}}}"
                    for t in at:
                        secs = max(0.0, min(t, job.end) - job.start)
                        yield prefix, wl_value(s, secs, secs * fleet.job_power(i, g, job)), t


def wl_value(s: Series, seconds: float, joules: float) -> float:
    if s.name == "gpucost_workload_gpu_seconds_total":
        return round(seconds, 3)
    if s.name == "gpucost_workload_gpu_energy_joules_total":
        return round(joules, 3)
    kind = s.labels.get("cost_kind")
    per = {"energy": PRICE_PER_J * 1.4, "hardware": 0.0001, "running": 0.00002}[kind]
    return round((joules if kind == "energy" else seconds) * per, 9)


# -- the stores ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    def __init__(self, name: str, args: list[str], port: int, data: Path) -> None:
        self.name, self.port, self.data = name, port, data
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(data.parent / f"{name}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        ready = "/-/ready" if name == "prometheus" else "/health"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(self.url + ready, timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not start")

    def get(self, path: str, timeout: float = 300, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)

    def timed(self, path: str, **params) -> tuple[float, dict]:
        t0 = time.perf_counter()
        try:
            body = self.get(path, **params)
        except urllib.error.HTTPError as e:
            body = {"status": "error", "error": e.read().decode()[:300]}
        return time.perf_counter() - t0, body

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bill_by_team(store: Store, start: float, end: float, out: Path, args: argparse.Namespace) -> dict:
    """``gpu-cost-agent report --by team`` over the whole period, the real command: its time,
    its own peak RSS and the store's while it asks, and what the bill says (totals, the
    worst reconciliation difference) so the two stores' bills can be compared."""
    cmd = [sys.executable, "-m", "agent", "report", "--prometheus", store.url,
           "--from", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
           "--to", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)), "--timezone", "UTC", "--by", "team",
           "--timeout", "600", "--nodes-per-query", str(args.nodes_per_query), "--json", str(out)]
    err = out.with_suffix(".stderr")
    peak = {"store": store.rss_mib()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            try:
                peak["store"] = max(peak["store"], store.rss_mib())
            except OSError:
                return

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.time()
    with open(err, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh)
        timer = threading.Timer(args.report_timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    stop.set()
    res: dict = {"nodes_per_query": args.nodes_per_query, "report_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                 "store_peak_rss_mib": round(peak["store"], 1)}
    if proc.returncode != 0:
        tail = err.read_text(errors="replace")[-300:]
        res["seconds"] = (f"> {args.report_timeout} (stopped)" if seconds >= args.report_timeout
                          else f"failed: {tail}")
        return res
    bill = json.loads(out.read_text())
    res["seconds"] = round(seconds, 1)
    res["stats"] = bill["stats"]
    res["rows"] = sum(len(s["rows"]) for s in bill["sections"])
    res["total_cost"] = {s["currency"]: s["total"]["total_cost"] for s in bill["sections"]}
    res["gpu_hours"] = {s["currency"]: s["total"]["gpu_hours"] for s in bill["sections"]}
    # the check: every GPU-hour of the fleet is in the bill once (the simulated money follows
    # no ledger, so its rows are not reconciled to the simulated node counters)
    res["fleet_gpu_hours"] = round(args.nodes * args.gpus * (end - start) / 3600.0, 6)
    return res


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rule_groups() -> list[tuple[str, list[dict]]]:
    out = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.append((group["name"], group["rules"]))
    # A ruler evaluates the instance groups before the fleet group reads their records.
    order = {"gpucost-instance": 0, "gpucost-workloads": 1, "gpucost-budget": 2}
    return sorted(out, key=lambda g: order.get(g[0], 3))


def fleet_queries(end_range: str) -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))
    from grafana.generate import dashboard_queries

    values = {"job": "gpu-cost-agent", "cluster": ".*", "instance": ".*", "gpu": ".*", "currency": "EUR",
              "__rate_interval": "5m", "__range": end_range, "__interval": "1m"}
    return [(q.panel, q.expr) for q in dashboard_queries(values) if q.dashboard == "gpucost-fleet"]


# -- the run -------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([smhd])", text)
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--history-step", default="6h", help="sample spacing before the dense end")
    ap.add_argument("--dense-minutes", type=float, default=30.0)
    ap.add_argument("--dense-step", default="1m")
    ap.add_argument("--scrape-step", help="one step for the whole period (full resolution), e.g. 15s")
    ap.add_argument("--mode", choices=("slurm", "kubernetes"), default="slurm")
    ap.add_argument("--jobs-per-gpu-day", type=float, default=8.0)
    ap.add_argument("--no-workloads", action="store_true", help="drop gpucost_workload_* (relabelling or [attribution] off)")
    ap.add_argument("--stores", default="victoriametrics,prometheus")
    ap.add_argument("--skip-report", action="store_true")
    ap.add_argument("--report-timeout", type=int, default=3600, help="stop the bill after this many seconds")
    ap.add_argument("--nodes-per-query", type=int, default=100, help="the report's --nodes-per-query")
    ap.add_argument("--keep", help="keep the stores' data in this directory")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--capture-template", action="store_true", help=f"rewrite {TEMPLATE.name} from a demo agent and exit")
    args = ap.parse_args(argv)
    if args.capture_template:
        capture_template(TEMPLATE)
        return 0

    end = float(int(time.time() // 3600 * 3600) - 3600)
    start = end - args.days * 86400
    if args.scrape_step:
        step = parse_duration(args.scrape_step)
        times = [start + k * step for k in range(int((end - start) / step) + 1)]
        dense_from = max(start, end - args.dense_minutes * 60)
    else:
        hstep, dstep = parse_duration(args.history_step), parse_duration(args.dense_step)
        dense_from = end - args.dense_minutes * 60
        times = [start + k * hstep for k in range(int((dense_from - start) / hstep))]
        times += [dense_from + k * dstep for k in range(int((end - dense_from) / dstep) + 1)]
    fleet = Fleet(args.nodes, args.gpus, args.mode, args.jobs_per_gpu_day, not args.no_workloads, start, end)
    stores = args.stores.split(",")
    work = Path(args.keep or tempfile.mkdtemp(prefix="gpucost-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"nodes": args.nodes, "gpus": args.gpus, "days": args.days, "start": start, "end": end,
                    "mode": args.mode,
                    "workloads": not args.no_workloads, "jobs_per_gpu_day": args.jobs_per_gpu_day,
                    "steps": len(times), "scrape_step": args.scrape_step,
                    "history_step": None if args.scrape_step else args.history_step}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    # 1. generate: VictoriaMetrics import chunks and the OpenMetrics file for promtool
    vm = prom = None
    om = work / "fleet.om.gz"
    if "victoriametrics" in stores:
        vm_data = work / "vm"
        port = free_port()
        vm = Store("victoriametrics", ["victoria-metrics", f"-storageDataPath={vm_data}", f"-httpListenAddr=127.0.0.1:{port}",
                                       "-retentionPeriod=100y", "-search.latencyOffset=0s", "-search.disableCache",
                                       "-search.maxUniqueTimeseries=10000000", "-search.maxSamplesPerQuery=10000000000",
                                       "-search.maxQueryDuration=600s", "-search.maxSeries=100000000"], port, vm_data)
    t0 = time.time()
    n_samples, series = 0, set()
    chunk: list[str] = []
    out = gzip.open(om, "wt", compresslevel=1) if "prometheus" in stores else None

    def flush() -> None:
        if vm is not None and chunk:
            body = "".join(chunk).encode()
            urllib.request.urlopen(urllib.request.Request(f"{vm.url}/api/v1/import/prometheus", data=body), timeout=600).read()
        chunk.clear()

    for prefix, v, t in samples(fleet, times):
        n_samples += 1
        series.add(prefix)
        chunk.append(f"{prefix} {v!r} {int(t * 1000)}\n")
        if out is not None:
            out.write(f"{prefix} {v!r} {t:.3f}\n")
        if len(chunk) >= 200_000:
            flush()
    flush()
    if out is not None:
        out.write("# EOF\n")
        out.close()
    result["samples"] = n_samples
    result["series"] = len(series)
    del series
    result["generate_s"] = round(time.time() - t0, 1)
    per_day = sum(1 for node in fleet.jobs for gpu in node for j in gpu if start <= j.start < end) / max(args.days, 1e-9)
    result["jobs_per_day"] = round(per_day)
    result["series_created_per_day"] = round(per_day * len(fleet.wl_t)) if fleet.workloads else 0
    log(f"generated {n_samples:,} samples of {result['series']:,} series in {result['generate_s']} s")

    # 2. the records: every recording rule over the dense end, group by group, through VictoriaMetrics
    rec_lines: list[str] = []
    if vm is not None:
        urllib.request.urlopen(f"{vm.url}/internal/force_flush").read()
        time.sleep(2)
        # Passes until no rule gains data: a record that reads another (in its group or an
        # earlier one) finds it once the earlier pass's results are imported and searchable.
        pending = [rule for _, rules in rule_groups() for rule in rules if "record" in rule]
        for _ in range(5):
            imported: list[str] = []
            still = []
            for rule in pending:
                body = vm.get("/api/v1/query_range", query=rule["expr"], start=dense_from, end=end, step=60)
                if not body["data"]["result"]:
                    still.append(rule)
                for s in body["data"]["result"]:
                    lab = {**s["metric"], **rule.get("labels", {}), "__name__": rule["record"]}
                    imported.append(json.dumps({"metric": lab, "values": [float(v) for _, v in s["values"]],
                                                "timestamps": [int(ts * 1000) for ts, _ in s["values"]]}) + "\n")
                    sel = labels_text({k: v for k, v in lab.items() if k != "__name__"})
                    rec_lines.extend(f"{rule['record']}{{{sel}}} {v} {ts:.3f}\n" for ts, v in s["values"])
            if not imported:
                break
            urllib.request.urlopen(urllib.request.Request(f"{vm.url}/api/v1/import", data="".join(imported).encode()),
                                   timeout=600).read()
            urllib.request.urlopen(f"{vm.url}/internal/force_flush").read()
            time.sleep(11)   # a new series is searchable ~10 s after its first sample (1.79)
            log(f"recorded {len(pending) - len(still)} rules, {len(still)} without data yet")
            pending = still
        result["records_without_data"] = [r["record"] for r in pending]
        result["record_samples"] = len(rec_lines)

    # 3. Prometheus: backfill the raw samples and the records
    if "prometheus" in stores:
        prom_data = work / "prom"
        t1 = time.time()
        raw = work / "fleet.om"
        with gzip.open(om, "rt") as src, open(raw, "w") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=24h",
                        str(raw), str(prom_data)], check=True, stdout=subprocess.DEVNULL)
        raw.unlink()
        result["prometheus_backfill_s"] = round(time.time() - t1, 1)
        result["prometheus_raw_bytes"] = du(prom_data)
        if rec_lines:
            recs = work / "records.om"
            recs.write_text("".join(rec_lines) + "# EOF\n")
            subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(recs), str(prom_data)],
                           check=True, stdout=subprocess.DEVNULL)
            recs.unlink()
        port = free_port()
        prom_dir = work / "promcfg"
        prom_dir.mkdir(exist_ok=True)
        (prom_dir / "prometheus.yml").write_text("global: {scrape_interval: 15s}\n")
        prom = Store("prometheus", ["prometheus", f"--config.file={prom_dir / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={prom_data}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--storage.tsdb.retention.time=100y", "--log.level=warn",
                                    "--query.max-samples=2000000000", "--query.timeout=10m"], port, prom_data)
        log(f"prometheus backfilled in {result['prometheus_backfill_s']} s")
    om.unlink(missing_ok=True)

    # 4. measure each store
    for store in (s for s in (vm, prom) if s is not None):
        key = store.name
        if store is vm:
            urllib.request.urlopen(f"{vm.url}/internal/force_flush").read()
            result[f"{key}_raw_bytes"] = du(vm.data / "data") + du(vm.data / "indexdb")
        groups = {}
        for name, rules in rule_groups():
            total, errors, empty = 0.0, 0, 0
            for rule in rules:
                best = []
                for _ in range(3):
                    dt, body = store.timed("/api/v1/query", query=rule["expr"], time=end)
                    best.append(dt)
                errors += body.get("status") != "success"
                empty += body.get("status") == "success" and not body["data"]["result"] and "record" in rule
                total += statistics.median(best)
            groups[name] = {"seconds": round(total, 3), "rules": len(rules), "errors": errors, "records_empty": empty}
        result[f"{key}_rule_groups"] = groups
        panels, slowest = [], ("", 0.0)
        for title, expr in fleet_queries(f"{int(args.dense_minutes)}m"):
            dt, body = store.timed("/api/v1/query_range", query=expr, start=dense_from, end=end, step=60)
            ok = body.get("status") == "success" and bool(body["data"]["result"])
            panels.append((title, dt, ok))
            if dt > slowest[1]:
                slowest = (title, dt)
        result[f"{key}_fleet_panels"] = {"count": len(panels), "total_s": round(sum(p[1] for p in panels), 3),
                                         "slowest": [slowest[0], round(slowest[1], 3)],
                                         "without_data": [p[0] for p in panels if not p[2]]}
        if not args.skip_report and fleet.workloads:
            result[f"{key}_bill"] = bill_by_team(store, start, end, work / f"bill-{key}.json", args)
            result[f"{key}_bill_by_team_s"] = result[f"{key}_bill"]["seconds"]
        result[f"{key}_rss_mib"] = round(store.rss_mib(), 1)
        log(f"measured {key}")
    for store in (s for s in (vm, prom) if s is not None):
        store.stop()
    if vm is not None:
        result["victoriametrics_bytes_after_stop"] = du(vm.data)
    if prom is not None:
        result["prometheus_bytes"] = du(prom.data)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
