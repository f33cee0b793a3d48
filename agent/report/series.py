"""Exact increases of counters over a period, per series and per step, from the query API.

PromQL's ``increase()`` is wrong for a bill in the ways docs/attribution.md lists: it
extrapolates past a series' first and last samples, and a workload born inside the range
loses what it used before its first scrape. So the report does not use it. For every series
of a counter it asks for:

1. the value at the period's start: ``last_over_time(m[lookback])`` at the start (the last
   sample at or before it; none: the series was born inside the period);
2. the last value of every step: ``last_over_time(m[step])`` on a grid of steps (1 h) from
   the start to the end (one range query; steps align with the local days of the period);
3. where a counter reset may hide inside a step: ``resets(m[2 × step]) > 0`` on the same grid,
   and for those steps only, the raw samples (``m[step]`` at the step's end).

and adds up, per step, the difference of consecutive last values. That is exact: between two
samples the counter grew by their difference, unless it dropped (a reset: the agent restarted
without its state), in which case it grew by the value after the drop (counters start at 0,
as the README says) — which for a step with a reset inside it is worked out from its raw
samples. Nothing is extrapolated: what the agent counted after the last scrape before the
period's start belongs to the period, what it counted after the last scrape before the end
belongs to the next one, so consecutive bills add up to the whole.

A series born inside the period (no sample before the start within ``lookback``): a
*workload* series counts its first value whole (the workload's series appears at its first
share, docs/attribution.md), a node series starts from its first value (its first sample is
0 on a fresh agent, and a node's lifetime total that history before ``lookback`` holds is not
this period's). A series that rises after a gap (Prometheus was down) continues; one that
drops was reset.

Queries: 3 per counter, plus one per step that holds a reset (rare: agent restarts without
state). Query size: one point per series per step, 745 for a month; ranges longer than
10,000 steps are asked in pieces (Prometheus answers at most 11,000 points per series).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .promapi import PrometheusAPI

#: Points per range query (Prometheus refuses more than 11,000 per series).
MAX_POINTS = 10_000

LabelKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Grid:
    """Steps of ``step`` seconds from ``start`` to ``end``; step ``i`` (1..n) is (t(i-1), t(i)]."""

    start: float
    end: float
    step: float

    @property
    def n(self) -> int:
        return int(round((self.end - self.start) / self.step))

    def t(self, i: int) -> float:
        return self.start + i * self.step

    def index(self, t: float) -> int:
        return int(round((t - self.start) / self.step))


def choose_step(seconds: float, preferred: float = 3600.0) -> float:
    """The largest of ``preferred``, 15 min, 5 min, 1 min, 1 s that divides the period."""
    for s in (preferred, 900.0, 300.0, 60.0, 1.0):
        if s <= preferred and abs(seconds / s - round(seconds / s)) < 1e-9:
            return s
    return 1.0


@dataclass
class Series:
    labels: dict[str, str]
    #: step index → increase in that step
    steps: dict[int, float] = field(default_factory=dict)
    born: bool = False
    resets: int = 0

    @property
    def total(self) -> float:
        return math.fsum(self.steps.values())


def key_of(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


def selector(metric: str, matchers: str) -> str:
    m = matchers.strip()
    if m.startswith("{") and m.endswith("}"):
        m = m[1:-1].strip()
    return f"{metric}{{{m}}}" if m else metric


Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"gpu-cost-agent report: {msg}", file=sys.stderr, flush=True)


def increments(
    api: PrometheusAPI,
    metric: str,
    grid: Grid,
    *,
    matchers: str = "",
    lookback: float = 62 * 86400.0,
    birth_counts_whole: bool = False,
    progress: Progress | None = _stderr,
) -> list[Series]:
    """Every series of counter ``metric`` (with ``matchers``) and its exact increase per step.

    For a node's counters, which live as long as the agent: a drop is a reset; a series born
    inside the period starts from its first value (``birth_counts_whole``: counts it whole)."""
    began = time.monotonic()
    sel = selector(metric, matchers)
    n, step = grid.n, grid.step
    queries = 0
    kind, result = api.instant(f"last_over_time({sel}[{_dur(lookback)}])", grid.start)
    queries += 1
    base: dict[LabelKey, float] = {key_of(r["metric"]): float(r["value"][1]) for r in result}
    points, labels, q = _points(api, f"last_over_time({sel}[{_dur(step)}])", grid, 1)
    flagged, q2 = _flags(api, sel, grid)
    queries += q + q2
    raw: dict[tuple[int, LabelKey], list[tuple[float, float]]] = {}
    for i in sorted(i for i in flagged if 1 <= i <= n):
        kind, result = api.instant(f"{sel}[{_dur(step)}]", grid.t(i))
        queries += 1
        for r in result:
            k = key_of(r["metric"])
            if k in flagged[i]:
                raw[(i, k)] = [(float(ts), float(v)) for ts, v in r["values"] if float(ts) > grid.t(i - 1)]
    out = []
    for k, pts in points.items():
        s = Series(labels[k])
        prev = base.get(k)
        s.born = prev is None
        for i in range(1, n + 1):
            samples = raw.get((i, k))
            if samples is None:
                v = pts.get(i)
                samples = [] if v is None else [(grid.t(i), v)]
            inc = 0.0
            for _, v in samples:
                inc, prev, reset = _advance(inc, prev, v, birth_counts_whole)
                s.resets += reset
            if inc:
                s.steps[i] = inc
        out.append(s)
    if progress is not None:
        progress(f"{metric}: {len(out)} series, {sum(s.resets for s in out)} reset(s), {queries} queries, "
                 f"{time.monotonic() - began:.1f} s")
    return out


def workload_increments(
    api: PrometheusAPI,
    metrics: list[str],
    grid: Grid,
    *,
    reference: str = "gpucost_node_it_energy_joules_total",
    matchers: str = "",
    lookback: float = 62 * 86400.0,
    progress: Progress | None = _stderr,
) -> dict[str, list[Series]]:
    """Exact increases of the workload counters ``metrics``, incarnation by incarnation.

    A workload's series is exported from its first share until it expires; if the same
    workload comes back later, its series comes back from 0 with the same labels. So a series
    that was missing from a scrape in which its GPU was scraped (the ``reference`` series of
    that GPU, ``component="gpu"``, has a sample there) died, and its next sample begins a new
    life, counted whole — even where it is higher than where the last life ended. A series
    missing together with its GPU's (Prometheus or the agent was down) simply continues. Steps
    where a series was there in only some of its GPU's scrapes are read sample by sample."""
    began = time.monotonic()
    n, step = grid.n, grid.step
    queries = 0
    ref_sel = selector(reference, join_matchers(matchers, 'component="gpu"'))
    ref_count, _, q = _points(api, f"count_over_time({ref_sel}[{_dur(step)}])", grid, 0)
    queries += q
    ref_of_gpu = {gpu_key(dict(k)): c for k, c in ref_count.items()}
    per: dict[str, tuple] = {}
    for metric in metrics:
        sel = selector(metric, matchers)
        _, result = api.instant(f"last_over_time({sel}[{_dur(lookback)}])", grid.start)
        base = {key_of(r["metric"]): float(r["value"][1]) for r in result}
        points, labels, q1 = _points(api, f"last_over_time({sel}[{_dur(step)}])", grid, 0)
        counts, _, q2 = _points(api, f"count_over_time({sel}[{_dur(step)}])", grid, 0)
        flagged, q3 = _flags(api, sel, grid, first=0)
        queries += 1 + q1 + q2 + q3
        per[metric] = (base, points, labels, counts, flagged)
    # steps to read sample by sample: a reset inside, or the series in only some of its GPU's scrapes
    need: dict[int, set[tuple[str, LabelKey]]] = {}
    for metric, (base, points, labels, counts, flagged) in per.items():
        for i, keys in flagged.items():
            for k in keys:
                need.setdefault(i, set()).add((metric, k))
        for k, c in counts.items():
            ref = ref_of_gpu.get(gpu_key(labels[k]), {})
            for i, cnt in c.items():
                if 0 <= i <= n and cnt < ref.get(i, 0):
                    need.setdefault(i, set()).add((metric, k))
    raw: dict[tuple[int, str, LabelKey], list[tuple[float, float]]] = {}
    ref_raw: dict[tuple[int, tuple], list[float]] = {}
    for i in sorted(need):
        if not 0 <= i <= n:
            continue
        wanted = need[i]
        names = sorted({m for m, _ in wanted})
        wl = sorted({dict(k).get("workload", "") for _, k in wanted})
        inst = sorted({dict(k).get("instance", "") for _, k in wanted})
        narrow = join_matchers(matchers, f'__name__=~"{_alt(names + [reference])}"', f'workload=~"(?:{_alt(wl)})?"',
                       'component=~"gpu|"', f'instance=~"{_alt(inst)}"' if all(inst) else "")
        _, result = api.instant(f"{{{narrow}}}[{_dur(step)}]", grid.t(i))
        queries += 1
        lo = grid.t(i - 1)
        for r in result:
            name = r["metric"].get("__name__", "")
            samples = [(float(ts), float(v)) for ts, v in r["values"] if float(ts) > lo]
            k = key_of(r["metric"])
            if name == reference:
                ref_raw[(i, gpu_key(dict(k)))] = [t for t, _ in samples]
            elif (name, k) in wanted:
                raw[(i, name, k)] = samples
    out: dict[str, list[Series]] = {}
    for metric, (base, points, labels, counts, flagged) in per.items():
        series = []
        for k, pts in points.items():
            s = Series(labels[k])
            gk = gpu_key(labels[k])
            ref = ref_of_gpu.get(gk, {})
            c = counts.get(k, {})
            prev = base.get(k)
            absent = False
            for i in range(0, n + 1):
                samples = raw.get((i, metric, k))
                inc = 0.0
                if samples is not None:  # sample by sample, against the GPU's scrapes
                    if i == 0:
                        prev = None  # the base is this step's last sample: walk the step from its first
                    have = {t: v for t, v in samples}
                    times = sorted(set(ref_raw.get((i, gk), [])) | set(have))
                    for t in times:
                        if t not in have:
                            absent = True
                            continue
                        if absent:
                            prev, absent = None, False
                        inc, prev, reset = _advance(inc, prev, have[t], True)
                        s.resets += reset
                elif i in pts:
                    if absent:
                        prev, absent = None, False
                    inc, prev, reset = _advance(0.0, prev, pts[i], True)
                    s.resets += reset
                elif ref.get(i, 0) > 0:
                    absent = True  # its GPU was scraped in this step, it was not: it had died
                if i == 0:
                    s.born = prev is None or absent
                    continue  # step 0 ends at the start: it only says where the series stands then
                if inc:
                    s.steps[i] = inc
            series.append(s)
        out[metric] = series
        if progress is not None:
            progress(f"{metric}: {len(series)} series, {sum(x.resets for x in series)} reset(s)")
    if progress is not None:
        progress(f"workload counters: {queries} queries ({len(need)} steps read sample by sample), "
                 f"{time.monotonic() - began:.1f} s")
    return out


def _points(api: PrometheusAPI, expr: str, grid: Grid, first: int
            ) -> tuple[dict[LabelKey, dict[int, float]], dict[LabelKey, dict[str, str]], int]:
    """A range query on the grid's step ends from step ``first`` to n: series → step → value."""
    points: dict[LabelKey, dict[int, float]] = {}
    labels: dict[LabelKey, dict[str, str]] = {}
    q = 0
    for lo, hi in _chunks(grid.n, first):
        for r in api.range(expr, grid.t(lo), grid.t(hi), grid.step):
            k = key_of(r["metric"])
            labels.setdefault(k, {a: b for a, b in r["metric"].items() if a != "__name__"})
            pts = points.setdefault(k, {})
            for ts, v in r["values"]:
                pts[grid.index(float(ts))] = float(v)
        q += 1
    return points, labels, q


def _flags(api: PrometheusAPI, sel: str, grid: Grid, first: int = 1) -> tuple[dict[int, set[LabelKey]], int]:
    """Steps that may hold a reset: ``resets()`` over the step and the one before (a drop
    between the last sample of one step and the first of the next is in the later step)."""
    flagged: dict[int, set[LabelKey]] = {}
    q = 0
    for lo, hi in _chunks(grid.n, first):
        for r in api.range(f"resets({sel}[{_dur(2 * grid.step)}]) > 0", grid.t(lo), grid.t(hi), grid.step):
            k = key_of(r["metric"])
            for ts, _ in r["values"]:
                flagged.setdefault(grid.index(float(ts)), set()).add(k)
        q += 1
    return flagged, q


#: Nodes per selection when a fleet is billed in parts (``report --nodes-per-query``).
NODES_PER_QUERY = 25


def node_selections(api: PrometheusAPI, grid: Grid, matchers: str = "", per_query: int = NODES_PER_QUERY,
                    metrics: Iterable[str] = ("gpucost_node_it_energy_joules_total",
                                              "gpucost_workload_gpu_seconds_total")) -> list[str]:
    """Matchers that split the fleet into sets of at most ``per_query`` nodes (``instance``).

    Every query of a bill reads every series it selects over the whole period; at a thousand
    nodes a week of per-workload series is millions of series in one query, more than a store
    answers in memory (docs/capacity.md). Each node's figures depend on that node's series only
    (its GPUs' ratios, its workloads' scrapes, its currencies), so a bill made node set by node
    set and added up is the bill of the whole. The nodes are the ``instance`` values of the
    ``metrics`` with samples in the period (the store's index, no samples read); one set: ``[""]``
    (no extra matcher). Series without an ``instance`` label get a set of their own."""
    if per_query <= 0:
        return [""]
    found = set(api.label_values("instance", [selector(m, matchers) for m in metrics], grid.start - grid.step, grid.end))
    if len(found) <= per_query:
        return [""]
    nodes = sorted(found)
    sets = [f'instance=~"{_alt(nodes[i:i + per_query])}"' for i in range(0, len(nodes), per_query)]
    return sets + ['instance=""']


#: Labels the agent puts on its series; the rest (instance, job, team…) come from the scrape config.
AGENT_LABELS = frozenset((
    "workload", "gpu_instance", "kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit",
    "gpu", "uuid", "cost_kind", "currency", "component", "item", "source", "provider", "offering", "name",
    "pci_bus_id", "driver_version", "serial", "energy_method", "band", "period",
))


def gpu_key(labels: dict[str, str]) -> tuple:
    """A GPU across the fleet: the target labels of its node and its UUID."""
    return (tuple(sorted((k, v) for k, v in labels.items() if k not in AGENT_LABELS and k != "__name__")),
            labels.get("uuid", ""))


def join_matchers(*parts: str) -> str:
    """Matchers (each with or without braces) as one list, for :func:`selector`."""
    out = []
    for p in parts:
        p = p.strip()
        if p.startswith("{") and p.endswith("}"):
            p = p[1:-1].strip()
        if p:
            out.append(p)
    return ",".join(out)


def _alt(values: list[str]) -> str:
    """A RE2 alternation matching exactly these values, as the text of a PromQL "…" string."""
    def esc(c: str) -> str:
        if c.isalnum() or c == "_":
            return c
        # RE2 takes \ before any punctuation as that character; in a PromQL string \ is \\ and " is \"
        return "\\\\\\\"" if c == '"' else "\\\\" + c
    return "|".join("".join(esc(c) for c in v) for v in values)


def _advance(inc: float, prev: float | None, v: float, birth_whole: bool) -> tuple[float, float, int]:
    """Add the sample ``v`` after ``prev`` (None: the series' first) to ``inc``."""
    if prev is None:
        return inc + (v if birth_whole else 0.0), v, 0
    if v < prev:
        return inc + v, v, 1
    return inc + (v - prev), v, 0


def _chunks(n: int, first: int = 1) -> Iterable[tuple[int, int]]:
    lo = first
    while lo <= n:
        hi = min(n, lo + MAX_POINTS - 1)
        yield lo, hi
        lo = hi + 1


def _dur(seconds: float) -> str:
    """A PromQL duration: whole seconds, or milliseconds."""
    if abs(seconds - round(seconds)) < 1e-9:
        return f"{int(round(seconds))}s"
    return f"{int(round(seconds * 1000))}ms"


def latest(api: PrometheusAPI, metric: str, t: float, window: float, matchers: str = "") -> list[dict[str, str | float]]:
    """A gauge's last value at or before ``t`` within ``window``, per series: labels + ``__value__``."""
    kind, result = api.instant(f"last_over_time({selector(metric, matchers)}[{_dur(window)}])", t)
    return [{**{a: b for a, b in r["metric"].items() if a != "__name__"}, "__value__": float(r["value"][1])}
            for r in result]
