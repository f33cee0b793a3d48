"""A month of realistic history for the report tests, from the agent's own exposition.

Two nodes, each its own team and currency, run the agent's real sampler, ledger, attribution
stage and exporter over October 2026 (Europe/Berlin: DST ends on the 25th, 745 hours) and a
half day either side, on a fake clock:

- ``node-a`` (team ``ml``, EUR, the demo's Berlin time-of-use tariff): Slurm jobs of ann, ben
  and cat on two GPUs; a job across the month's start, one shorter than a scrape interval, one
  across the DST change; the agent restarts on the 14th having lost its state (every counter
  starts again at 0: a reset in every series).
- ``node-b`` (team ``vision``, USD, a New York time-of-use tariff): Slurm jobs of ann, dan and
  eve, dan's interactive session (a ``user`` workload), a job across the month's end.

Every 120 s (and at every job start and end) the sampler ticks; at each 120 s mark the
registry the agent serves (:func:`agent.exporter.make_registry`) is collected and its
samples written as OpenMetrics with the target labels a scrape config adds (``instance``,
``job``, ``team``, ``cluster``) — what Prometheus would have scraped — ready for
``promtool tsdb create-blocks-from openmetrics``. The agent's own totals are kept beside it:
per workload, what it was charged in the month (from the ledger at the month's first and last
scrape, at the restart, and when each workload expired), and the node counters' growth.
The per-job records the real writer (agent/jobrecords.py) appends are kept too.

The nodes run in two processes (CI has two cores); about 15-25 s each.
"""

from __future__ import annotations

import bisect
import json
import math
import multiprocessing
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

TZ = "Europe/Berlin"
MONTH = "2026-10"
BERLIN = ZoneInfo(TZ)
MONTH_START = datetime(2026, 10, 1, tzinfo=BERLIN).timestamp()
MONTH_END = datetime(2026, 11, 1, tzinfo=BERLIN).timestamp()
START = MONTH_START - 12 * 3600
END = MONTH_END + 12 * 3600
SCRAPE = 120.0
RETENTION = 300.0
JOB = "gpu-cost-agent"
FAMILIES = (
    "gpucost_workload_cost", "gpucost_workload_gpu_seconds", "gpucost_workload_gpu_energy_joules",
    "gpucost_energy_cost", "gpucost_hardware_cost", "gpucost_running_cost", "gpucost_node_it_energy_joules",
    "gpucost_node_facility_energy_joules", "gpucost_emissions_grams", "gpucost_gpu_info",
    "gpucost_cloud_price_per_gpu_hour",
)
NODE_COST = {"energy": "gpucost_energy_cost", "hardware": "gpucost_hardware_cost", "running": "gpucost_running_cost"}
LABELS = ("kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit")
GIB = 1 << 30

_RUNNING = [
    {"name": "colocation", "amount": 400, "period": "month"},
    {"name": "support", "amount": 1500, "period": "year", "scope": "gpu"},
]
SETTINGS: dict[str, dict[str, Any]] = {
    "node-a": {
        "tariff": {"currency": "EUR", "timezone": "Europe/Berlin", "bands": [
            {"name": "peak", "price_per_kwh": 0.285, "days": ["weekday"], "start": "06:00", "end": "22:00"},
            {"name": "offpeak", "price_per_kwh": 0.215, "days": ["weekday"], "start": "22:00", "end": "06:00"},
            {"name": "weekend", "price_per_kwh": 0.195, "days": ["weekend"], "start": "00:00", "end": "00:00"}]},
        "pue": {"value": 1.3}, "carbon": {"grams_per_kwh": 380},
        "hardware": {"gpu_price": 25000, "node_price": 40000},
        "running_costs": _RUNNING,
        "cloud_prices": [{"model": "H100", "price_per_gpu_hour": 2.9, "currency": "EUR"}],
    },
    "node-b": {
        "tariff": {"currency": "USD", "timezone": "America/New_York", "bands": [
            {"name": "peak", "price_per_kwh": 0.19, "days": ["weekday"], "start": "08:00", "end": "20:00"},
            {"name": "offpeak", "price_per_kwh": 0.12, "days": ["weekday"], "start": "20:00", "end": "08:00"},
            {"name": "weekend", "price_per_kwh": 0.11, "days": ["weekend"], "start": "00:00", "end": "00:00"}]},
        "pue": {"value": 1.2}, "carbon": {"grams_per_kwh": 420},
        "hardware": {"gpu_price": 27000, "node_price": 45000},
        "running_costs": _RUNNING,
        "cloud_prices": [{"model": "H100", "price_per_gpu_hour": 3.5, "currency": "USD"}],
    },
}
NODES = {
    "node-a": {"team": "ml", "users": {"ann": 1001, "ben": 1002, "cat": 1003}, "host_watts": 300.0,
               "restart": datetime(2026, 10, 14, 10, 0, tzinfo=BERLIN).timestamp(), "seed": 17},
    "node-b": {"team": "vision", "users": {"ann": 1001, "dan": 1004, "eve": 1005}, "host_watts": 250.0,
               "restart": None, "seed": 23},
}
#: Special jobs: (node, gpu, job id, user, start, end, watts)
SPECIAL = [
    ("node-a", 0, "7001", "ann", MONTH_START - 3 * 3600, MONTH_START + 4 * 3600, 450.0),  # across the start
    ("node-a", 1, "7002", "ben", datetime(2026, 10, 10, 12, 0, 10, tzinfo=BERLIN).timestamp(),
     datetime(2026, 10, 10, 12, 0, 35, tzinfo=BERLIN).timestamp(), 600.0),  # 25 s: shorter than a scrape
    ("node-a", 0, "7003", "cat", datetime(2026, 10, 25, 1, 0, tzinfo=BERLIN).timestamp(),
     datetime(2026, 10, 25, 5, 0, tzinfo=BERLIN).timestamp(), 500.0),  # across the DST change (5 h)
    ("node-b", 1, "7004", "eve", MONTH_END - 2 * 3600, MONTH_END + 3 * 3600, 550.0),  # across the end
]
SHORT_JOB = "7002"
CROSSING_JOBS = ("7001", "7004")


@dataclass
class Job:
    gpu: int
    pid: int
    key: str
    labels: dict[str, str]
    start: float
    end: float
    watts: float
    mem: int


def jobs_for(node: str) -> list[Job]:
    spec = NODES[node]
    rng = random.Random(spec["seed"])
    users = spec["users"]
    jobs: list[Job] = []
    pid = 10_000 if node == "node-a" else 20_000
    jid = 1000 if node == "node-a" else 5000
    for gpu in range(2):
        t = START + rng.uniform(0, 3600)
        while t < END:
            dur = min(10 * 3600, max(300.0, rng.expovariate(1 / 9000)))
            user = rng.choice(sorted(users))
            jid += 1
            pid += 1
            jobs.append(Job(gpu, pid, f"slurm:{jid}", _labels("slurm", user, str(jid)), t, t + dur,
                            rng.choice((250.0, 350.0, 450.0, 600.0)), rng.choice((10, 20, 40, 70)) * GIB))
            t += dur + rng.expovariate(1 / 5400)
    for n, gpu, jid_s, user, a, b, watts in SPECIAL:
        if n == node:
            pid += 1
            jobs.append(Job(gpu, pid, f"slurm:{jid_s}", _labels("slurm", user, jid_s), a, b, watts, 30 * GIB))
    if node == "node-b":  # dan's interactive session, three afternoons a week: a `user` workload
        for day in range(-1, 33):
            if day % 7 in (1, 3, 5):
                a = MONTH_START + day * 86400 + 13 * 3600
                pid += 1
                jobs.append(Job(0, pid, f"user:{users['dan']}", _labels("user", "dan", ""), a, a + 4 * 3600,
                                150.0, 8 * GIB))
    jobs.sort(key=lambda j: j.start)
    return jobs


def _labels(kind: str, user: str, job: str) -> dict[str, str]:
    labels = dict.fromkeys(LABELS, "")
    labels.update(kind=kind, user=user, slurm_job=job)
    return labels


def _fake_source(node: str, jobs: list[Job], t0: float) -> Any:
    from fakes import FakeGpu, FakeSource
    from agent.sources.gpu import GpuInfo

    per_gpu = {g: [j for j in jobs if j.gpu == g] for g in range(2)}

    class MonthSource(FakeSource):
        """GPUs whose power steps when jobs start and end; the energy counter in closed form."""

        def __init__(self) -> None:
            gpus = [FakeGpu(lambda t: 70.0, samples=False) for _ in range(2)]
            super().__init__(gpus, t0)
            self.segments = []
            for g, gpu in enumerate(gpus):
                gpu.util_samples = None  # per-process SM samples not supported: split by memory
                pts = sorted({t0 - 100.0, *(j.start for j in per_gpu[g]), *(j.end for j in per_gpu[g])})
                watts = [self._watts(g, (a + b) / 2) for a, b in zip(pts, pts[1:])] + [70.0]
                cum = [0.0]
                for k, (a, b) in enumerate(zip(pts, pts[1:])):
                    cum.append(cum[-1] + watts[k] * (b - a))
                self.segments.append((pts, watts, cum))
                gpu.watts = (lambda g: lambda t: self.power(g, t))(g)
                gpu.procs = (lambda g: lambda t: self.running(g, t))(g)

        def devices(self) -> list[GpuInfo]:
            return [GpuInfo(index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", power_limit_watts=700.0)
                    for i in range(len(self.gpus))]

        def _watts(self, g: int, t: float) -> float:
            return min(700.0, 70.0 + sum(j.watts for j in per_gpu[g] if j.start <= t < j.end))

        def power(self, g: int, t: float) -> float:
            pts, watts, _ = self.segments[g]
            return watts[max(0, bisect.bisect_right(pts, t) - 1)]

        def running(self, g: int, t: float) -> list[tuple[int, int]]:
            return [(j.pid, j.mem) for j in per_gpu[g] if j.start <= t < j.end]

        def energy_mj(self, index: int) -> int:
            pts, watts, cum = self.segments[index]
            k = max(0, bisect.bisect_right(pts, self.t) - 1)
            return int(round((cum[k] + watts[k] * (self.t - pts[k])) * 1000))

    return MonthSource()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Agent:
    """One life of the agent on a node: ledger, attribution, sampler, the registry it serves."""

    def __init__(self, node: str, source: Any, jobs: list[Job], records_dir: Path, on_final: Any) -> None:
        from agent.accounting import Ledger
        from agent.attribution.split import Attributor
        from agent.config import Settings
        from agent.exporter import make_registry
        from agent.jobrecords import JobRecords
        from agent.sampler import Sampler

        by_pid = {j.pid: j for j in jobs}
        self.ledger = Ledger.from_settings(Settings(**SETTINGS[node]))
        self.ledger.workloads.configure(100, RETENTION)
        writer = JobRecords(records_dir, host=node, clock=lambda: source.t)

        def on_expire(totals: Any, keys: list) -> None:
            on_final(totals, keys, source.t)
            writer(totals, keys)

        self.ledger.workloads.on_expire = on_expire
        self.writer = writer
        stage = Attributor(self.ledger.workloads, lambda pid: (by_pid[pid].key, by_pid[pid].labels))
        self.sampler = Sampler(source, clock=source.clock, ledger=self.ledger, attribution=stage,
                               tick_seconds=SCRAPE, counter_interval=5.0)
        self.registry = make_registry(lambda: self.sampler.snapshot, process_metrics=False)
        self.sampler.tick()  # the baseline tick, as Service.start() does


def simulate(node: str, out: Path) -> dict[str, Any]:
    """Run ``node`` over the history; write its samples under ``out``; return the agent's totals."""
    import logging

    logging.getLogger("agent").setLevel(logging.ERROR)
    spec = NODES[node]
    jobs = jobs_for(node)
    source = _fake_source(node, jobs, START)
    target = {"instance": f"{node}:9842", "job": JOB, "team": spec["team"], "cluster": "lab"}
    tlabels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(target.items()))
    fam_files = {f: open(out / f"{node}.{f}.om", "w") for f in FAMILIES}
    help_type: dict[str, tuple[str, str]] = {}
    records_dir = out / "records" / node
    # the agent's own figures: (life, uuid, workload) → value at the month's start, its final value
    at_start: dict[tuple, dict] = {}
    #: every incarnation of each workload key (it expires and comes back): (when it ended, values)
    final: dict[tuple, list[tuple[float, dict]]] = defaultdict(list)
    node_start: dict[tuple, float] = {}
    node_final: dict[tuple, float] = {}
    life = 0

    def values(totals: Any, k: tuple) -> dict:
        v = {"joules": totals.energy.get(k, 0.0), "seconds": totals.seconds.get(k, 0.0),
             "labels": dict(totals.labels.get(k, {}))}
        for (u, w, kind, cur), x in totals.cost.items():
            if (u, w) == k:
                v[(kind, cur)] = x
        return v

    def on_final(totals: Any, keys: list, t: float) -> None:
        if t > MONTH_END:
            return  # alive at the month's end: taken from the last scrape of the month
        for k in keys:
            final[(life, *k)].append((t, values(totals, k)))

    def node_totals(led: Any) -> dict[tuple, float]:
        d: dict[tuple, float] = defaultdict(float)
        for (comp, cur), v in led.energy_cost.items():
            d[("energy", cur)] += v
        for (comp, cur), v in led.hardware_cost.items():
            d[("hardware", cur)] += v
        for (comp, item, cur), v in led.running_cost.items():
            d[("running", cur)] += v
        for comp, v in led.it_energy.items():
            d[("it_joules", comp)] += v
        return d

    def snapshot_workloads(agent: Agent, into: dict, t: float | None = None) -> None:
        w = agent.ledger.workloads
        for k in list(w.energy):
            if t is None:
                into[(life, *k)] = values(w, k)
            else:
                final[(life, *k)].append((t, values(w, k)))

    def scrape(agent: Agent, t: float) -> None:
        ts = f"{t:.3f}"
        for fam in agent.registry.collect():
            if fam.name not in fam_files:
                continue
            help_type.setdefault(fam.name, (fam.type, fam.documentation))
            fh = fam_files[fam.name]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()) if v)
                fh.write(f"{s.name}{{{tlabels}{',' if labels else ''}{labels}}} {s.value!r} {ts}\n")

    agent = Agent(node, source, jobs, records_dir, on_final)
    agents = [agent]
    starts = sorted({j.start for j in jobs} | {j.end for j in jobs})
    events = [t + 1.0 for t in starts if START < t + 1.0 < END]
    scrapes = [START + SCRAPE * i for i in range(1, int((END - START) / SCRAPE) + 1)]
    times = sorted(set(events) | set(scrapes))
    scrape_set = set(scrapes)
    prev = START
    restart = spec["restart"]
    ticks = 0
    for t in times:
        if restart is not None and t > restart >= prev:
            # stopped right after the scrape at `restart`, state lost; back 30 s later from zero
            snapshot_workloads(agent, final, restart)
            for k, v in node_totals(agent.ledger).items():
                node_final[(life, *k)] = v
            life += 1
            source.t = restart + 30.0
            agent = Agent(node, source, jobs, records_dir, on_final)
            agents.append(agent)
            prev = source.t
        source.t = t
        agent.ledger.add_host("platform", "model", prev, t, spec["host_watts"] * (t - prev))
        agent.sampler.tick()
        ticks += 1
        prev = t
        if t in scrape_set:
            scrape(agent, t)
            if t == MONTH_START:
                snapshot_workloads(agent, at_start)
                for k, v in node_totals(agent.ledger).items():
                    node_start[(life, *k)] = v
            if t == MONTH_END:
                snapshot_workloads(agent, final, t)
                for k, v in node_totals(agent.ledger).items():
                    node_final[(life, *k)] = v
    for fh in fam_files.values():
        fh.close()

    # what each workload was charged in the month, by the agent's own totals
    month: dict[str, dict] = {}
    for key, lives in final.items():
        first = True
        for n, (t_end, v) in enumerate(sorted(lives, key=lambda x: x[0])):
            if t_end <= MONTH_START:
                continue  # ended (and was recorded) before the month
            base = at_start.get(key, {}) if first else {}
            first = False
            d = {"node": node, "life": key[0], "uuid": key[1], "workload": key[2], "labels": v["labels"],
                 "joules": v["joules"] - base.get("joules", 0.0), "seconds": v["seconds"] - base.get("seconds", 0.0),
                 "cost": {f"{k[0]}/{k[1]}": x - base.get(k, 0.0) for k, x in v.items() if isinstance(k, tuple)}}
            month["|".join(map(str, (*key, n)))] = d
    meter = {}
    for key, v in node_final.items():
        meter["|".join(map(str, key))] = v - node_start.get(key, 0.0)
    return {"node": node, "ticks": ticks, "workloads": month, "meter": meter, "help_type": help_type,
            "restart": restart, "records_written": sum(a.writer.written for a in agents)}


def build(out: Path, *, parallel: bool = True) -> dict[str, Any]:
    """Simulate both nodes; write ``out/history.om``; the agent's totals per node."""
    out.mkdir(parents=True, exist_ok=True)
    nodes = sorted(NODES)
    if parallel:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(len(nodes)) as pool:
            results = pool.starmap(simulate, [(n, out) for n in nodes])
    else:
        results = [simulate(n, out) for n in nodes]
    help_type: dict[str, tuple[str, str]] = {}
    for r in results:
        help_type.update(r.pop("help_type"))
    with open(out / "history.om", "w") as fh:
        for fam in FAMILIES:
            if fam not in help_type:
                continue
            typ, doc = help_type[fam]
            fh.write(f"# HELP {fam} {doc}\n# TYPE {fam} {typ}\n")
            for n in nodes:
                with open(out / f"{n}.{fam}.om") as part:
                    while chunk := part.read(1 << 20):
                        fh.write(chunk)
        fh.write("# EOF\n")
    for n in nodes:
        for fam in FAMILIES:
            (out / f"{n}.{fam}.om").unlink(missing_ok=True)
    return {r["node"]: r for r in results}


def expected_by(results: dict[str, Any], label: str) -> dict[tuple[str, str], dict[str, float]]:
    """The agent's own month totals per (currency, value of ``label``): cost per kind, seconds, joules.

    ``label``: ``team`` (the node's), or an identity label; idle capacity (``unallocated``)
    is left out, as the report lists it apart."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for node, r in results.items():
        for w in r["workloads"].values():
            if w["workload"] == "unallocated":
                continue
            value = NODES[node]["team"] if label == "team" else w["labels"].get(label, "")
            currencies = {k.split("/")[1] for k in w["cost"]}
            for cur in currencies:
                d = out[(cur, value)]
                for k, x in w["cost"].items():
                    kind, c = k.split("/")
                    if c == cur:
                        d[kind] += x
                d["seconds"] += w["seconds"]
                d["joules"] += w["joules"]
    return {k: dict(v) for k, v in out.items()}


if __name__ == "__main__":  # a quick look: python tests/billhistory.py /tmp/hist
    import sys
    import time

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    t = time.monotonic()
    res = build(Path(sys.argv[1]))
    print(json.dumps({n: {"ticks": r["ticks"], "workloads": len(r["workloads"]),
                          "records": r["records_written"]} for n, r in res.items()}), f"{time.monotonic() - t:.1f} s")
    print(math.fsum(v for k, v in res["node-a"]["meter"].items() if "energy|EUR" in k))


# -- a real Prometheus over the backfilled history ------------------------------


def backfill(om: Path, data: Path) -> str:
    """``promtool tsdb create-blocks-from openmetrics`` into ``data``; promtool's table."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        raise FileNotFoundError("promtool not found (apt install prometheus)")
    # one block for the whole history: promtool reads its input once per block
    proc = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=1458h",
                           str(om), str(data)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"promtool failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def backfilled_server(om: Path) -> Any:
    """A :class:`promserver.PrometheusServer` serving the history in ``om`` (backfilled first),
    with a retention long enough to keep it (the harness's 1 h would delete it at start)."""
    from promserver import PrometheusServer

    class Backfilled(PrometheusServer):
        retention = "100y"

        def start(self, timeout: float = 30.0) -> "Backfilled":
            self.backfill_table = backfill(om, self.dir / "data")
            super().start(timeout)
            return self

    # scrapes nothing that answers (port 9: discard): the TSDB holds only the backfilled history
    return Backfilled("127.0.0.1:9", scrape_interval="1h", evaluation_interval="1h")
