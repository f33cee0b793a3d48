"""The bill of a period: rows per group and currency, idle capacity, reconciliation to the meter.

Rows. Every workload series of the agent (``gpucost_workload_*``) goes to one row per
currency, by the values of the ``--by`` labels — workload labels (``user``, ``slurm_job``,
``namespace``, ``pod``…), target labels a scrape config attaches (``team``, ``cluster``), and
two derived ones: ``node`` (the ``instance`` label) and ``gpu_model`` (``gpucost_gpu_info``'s
``name``). Each row is one of:

- ``allocated``: a group's own cost;
- ``idle``: **idle capacity**, ``workload="unallocated"`` — GPUs nobody held (their
  amortisation, running costs and idle energy); its workload labels are empty, its target
  labels (team, node, gpu_model) kept, so each team sees its own idle capacity;
- ``unallocated``: workloads whose ``--by`` workload labels are all empty (grouping by
  ``user``: processes whose owner could not be read, ``other``; by ``namespace``: Slurm jobs).

So, per currency and cost kind, the rows add up to the fleet's metered total: the sum of the
node counters (``gpucost_energy_cost_total`` over all components, ``gpucost_hardware_cost_total``,
``gpucost_running_cost_total``), and the reconciliation says by how much they differ.

Energy in kWh is the workload's GPU energy (``gpucost_workload_gpu_energy_joules_total``, IT);
its facility energy and emissions are that energy times its GPU's facility/IT and
grams/joule ratios in the same step (PUE and grid intensity as the agent applied them). The
host's energy is charged to workloads in money (``cost_kind="energy"``) but not split in kWh:
the reconciliation lists it beside the GPUs'.

Several currencies never add up: one section per currency.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .period import Period
from .series import (AGENT_LABELS, NODES_PER_QUERY, Grid, Series, choose_step, increments, join_matchers, latest,
                     node_selections, workload_increments)

COST_KINDS = ("energy", "hardware", "running")
#: Workload identity labels (agent.attribution.workloads.IDENTITY_LABELS, not imported: that
#: module is the daemon's) plus the workload key and MIG instance.
IDENTITY = ("kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit")
WORKLOAD_LEVEL = frozenset(("workload", "gpu_instance", *IDENTITY))
#: Workloads that are not someone's use: ``busy`` GPU-hours leave them out (docs/cost.md).
NOT_BUSY = ("unallocated", "unknown")
DERIVED = ("node", "gpu_model")

ALLOCATED, IDLE, UNALLOCATED = "allocated", "idle", "unallocated"
J_PER_KWH = 3.6e6

NODE_COST = {"energy": "gpucost_energy_cost_total", "hardware": "gpucost_hardware_cost_total",
             "running": "gpucost_running_cost_total"}


class ReportError(Exception):
    """The bill cannot be made (no data, a label nobody has). ``str()`` is one line."""


@dataclass
class Row:
    currency: str
    allocation: str
    group: tuple[str, ...]
    node: str = ""
    gpu_hours: float = 0.0
    busy_gpu_hours: float = 0.0
    it_kwh: float = 0.0
    facility_kwh: float | None = 0.0
    emissions_g: float | None = 0.0
    cost: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COST_KINDS, 0.0))
    #: (provider, offering) → what renting the busy GPU-hours would have cost
    cloud: dict[tuple[str, str], float] = field(default_factory=dict)
    workloads: int = 0

    @property
    def total(self) -> float:
        return math.fsum(self.cost.values())

    def add(self, other: "Row") -> None:
        self.gpu_hours += other.gpu_hours
        self.busy_gpu_hours += other.busy_gpu_hours
        self.it_kwh += other.it_kwh
        self.facility_kwh = _add(self.facility_kwh, other.facility_kwh)
        self.emissions_g = _add(self.emissions_g, other.emissions_g)
        for k, v in other.cost.items():
            self.cost[k] = self.cost.get(k, 0.0) + v
        for k, v in other.cloud.items():
            self.cloud[k] = self.cloud.get(k, 0.0) + v
        self.workloads += other.workloads


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


@dataclass
class Check:
    """One line of the reconciliation: what the rows add up to against the meter."""

    what: str
    unit: str
    report: float
    metered: float
    #: a figure shown beside the others, not a sum the rows must reach
    info: bool = False

    @property
    def difference(self) -> float:
        return self.report - self.metered

    @property
    def relative(self) -> float | None:
        return self.difference / self.metered if self.metered else (0.0 if not self.report else None)


@dataclass
class Section:
    currency: str
    rows: list[Row]
    #: the rows split per node (FOCUS: one allocated charge per node, group and cost kind)
    detail: list[Row]
    #: local day → row label → cost (all kinds)
    daily: dict[str, dict[str, float]]
    checks: list[Check]
    #: (provider, offering) → price per GPU-hour (as configured on the nodes; several: the mean)
    cloud_prices: dict[tuple[str, str], float] = field(default_factory=dict)

    def total(self) -> Row:
        t = Row(self.currency, "total", ())
        for r in self.rows:
            t.add(r)
        return t


@dataclass
class Bill:
    period: Period
    by: list[str]
    sections: list[Section]
    source: str
    notes: list[str] = field(default_factory=list)
    generated: float = field(default_factory=time.time)
    #: How the figures were obtained (queries, series, resets), for the reader of the JSON.
    stats: dict[str, Any] = field(default_factory=dict)

    def label(self, row: Row) -> str:
        return row_label(self.by, row)


def row_label(by: list[str], row: Row) -> str:
    parts = [f"{b}={v}" for b, v in zip(by, row.group) if v]
    if row.allocation == IDLE:
        return "idle capacity" + (f" ({', '.join(parts)})" if parts else "")
    if row.allocation == UNALLOCATED:
        return "unallocated" + (f" ({', '.join(parts)})" if parts else "")
    return ", ".join(f"{b}={v or '(none)'}" for b, v in zip(by, row.group)) or "all"


def classify(by: list[str], values: tuple[str, ...], workload: str) -> tuple[str, tuple[str, ...]]:
    if workload == "unallocated":
        return IDLE, tuple("" if b in WORKLOAD_LEVEL else v for b, v in zip(by, values))
    own = [v for b, v in zip(by, values) if b in WORKLOAD_LEVEL]
    if own and not any(own):
        return UNALLOCATED, values
    return ALLOCATED, values


def target_key(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The labels a scrape config attached (instance, job, team…): those of the node."""
    return tuple(sorted((k, v) for k, v in labels.items() if k not in AGENT_LABELS and not k.startswith("__")))


def node_of(labels: dict[str, str]) -> str:
    return labels.get("instance") or labels.get("node") or ",".join(f"{k}={v}" for k, v in target_key(labels)) or "node"


# -- from Prometheus -----------------------------------------------------------


@dataclass
class Fetched:
    """What the query API gave for a period: every counter's increase per series and step."""

    period: Period
    grid: Grid
    cost: list[Series]
    seconds: list[Series]
    joules: list[Series]
    node_cost: dict[str, list[Series]]
    it: list[Series]
    fac: list[Series]
    em: list[Series]
    info: list[dict]
    cloud: list[dict]
    source: str
    notes: list[str]
    stats: dict[str, Any]
    #: some counter grew in the period
    grew: bool = False
    #: some series has a sample before the period's start
    history: bool = True


def fetch(api: Any, period: Period, *, matchers: str = "", step: float | None = None,
          lookback: float = 62 * 86400.0, progress: Callable[[str], None] | None = None,
          require_data: bool = True) -> Fetched:
    """Ask the query API for everything a bill of ``period`` needs (any grouping), for the
    series ``matchers`` select (all of them at once: see :func:`from_prometheus` for a fleet)."""
    grid = _grid(period, step)
    kw: dict[str, Any] = {"matchers": matchers, "lookback": lookback, "progress": progress}
    queries0 = api.queries
    names = ["gpucost_workload_cost_total", "gpucost_workload_gpu_seconds_total",
             "gpucost_workload_gpu_energy_joules_total"]
    wl = workload_increments(api, names, grid, **kw)
    cost, seconds, joules = (wl[n] for n in names)
    node_cost = {k: increments(api, m, grid, **kw) for k, m in NODE_COST.items()}
    it = increments(api, "gpucost_node_it_energy_joules_total", grid, **kw)
    fac = increments(api, "gpucost_node_facility_energy_joules_total", grid, **kw)
    em = increments(api, "gpucost_emissions_grams_total", grid, **kw)
    window = period.seconds + 3600.0
    info = latest(api, "gpucost_gpu_info", period.end, window, matchers)
    cloud = latest(api, "gpucost_cloud_price_per_gpu_hour", period.end, window, matchers)
    allseries = cost + seconds + joules + it + fac + em + [x for v in node_cost.values() for x in v]
    stats = {"step_seconds": grid.step, "steps": grid.n, "queries": api.queries - queries0,
             "series": len(allseries), "workload_series": len(cost) + len(seconds) + len(joules),
             "resets": sum(s.resets for s in allseries),
             "born_in_period": sum(1 for s in cost + seconds + joules if s.born)}
    f = Fetched(period, grid, cost, seconds, joules, node_cost, it, fac, em, info, cloud,
                f"prometheus {api.url}", [], stats)
    f.grew = any(s.steps for s in allseries)
    f.history = any(not s.born for s in it + seconds)
    if require_data:
        f.notes = _data_notes(period, matchers, f.grew, f.history)
    return f


def _grid(period: Period, step: float | None) -> Grid:
    step = step or choose_step(period.seconds)
    if abs(period.seconds / step - round(period.seconds / step)) > 1e-9:
        raise ReportError(f"--step {step:g} s does not divide the period ({period.seconds:g} s)")
    return Grid(period.start, period.end, step)


def _data_notes(period: Period, matchers: str, grew: bool, history: bool) -> list[str]:
    """Refuse a bill of nothing; the note for a bill whose series all began inside the period."""
    if not grew:
        raise ReportError(
            f"no data for {period.label} ({period.utc_iso(period.start)} to {period.utc_iso(period.end)}): "
            f"no gpucost_* counter{' matching ' + matchers if matchers else ''} grew in it — did Prometheus "
            "scrape gpu-cost-agent then?")
    if not history:
        return ["no series has a sample before the period's start: the agents began inside it, or "
                "Prometheus keeps less history than the period (then the bill is too small)"]
    return []


def from_prometheus(api: Any, period: Period, by: list[str], *, matchers: str = "", step: float | None = None,
                    lookback: float = 62 * 86400.0, progress: Callable[[str], None] | None = None,
                    nodes_per_query: int = NODES_PER_QUERY) -> Bill:
    """The bill of ``period`` from the query API, ``nodes_per_query`` nodes at a time.

    A fleet's series are asked for node set by node set (:func:`node_selections`) and each
    set's figures added to the bill before the next is asked for, so neither the store nor
    this process holds more than one set's series: the bill is the same as one made from all
    series at once (each node's figures depend on its own series only; tests/test_report_exact.py
    compares the two)."""
    grid = _grid(period, step)
    sets = node_selections(api, grid, matchers, nodes_per_query)
    tally = Tally(period, grid, by)
    stats: dict[str, Any] = {}
    grew = history = False
    for n, extra in enumerate(sets, 1):
        if progress is not None and len(sets) > 1:
            progress(f"node set {n} of {len(sets)}")
        f = fetch(api, period, matchers=join_matchers(matchers, extra), step=grid.step, lookback=lookback,
                  progress=progress, require_data=False)
        tally.add(f)
        grew, history = grew or f.grew, history or f.history
        for k, v in f.stats.items():
            stats[k] = v if k in ("step_seconds", "steps") else stats.get(k, 0) + v
        del f
    bill = tally.bill(f"prometheus {api.url}", _data_notes(period, matchers, grew, history))
    bill.stats = {**stats, "node_sets": len(sets)}
    return bill


def bill_of(f: Fetched, by: list[str]) -> Bill:
    tally = Tally(f.period, f.grid, by)
    tally.add(f)
    bill = tally.bill(f.source, f.notes)
    bill.stats = dict(f.stats)
    return bill


@dataclass
class _Workload:
    """One workload's series in a node set: cost by (kind, currency), seconds held, joules."""

    labels: dict[str, str]
    cost: dict[tuple[str, str], Series] = field(default_factory=dict)
    sec: Series | None = None
    j: Series | None = None


class Tally:
    """A bill's rows, daily costs and reconciliation, added up from one or more node sets.

    Everything :meth:`add` takes from a node set is that set's own (per GPU ratios, prices,
    the currencies of a node), so adding sets one by one gives the figures of all at once."""

    def __init__(self, period: Period, grid: Grid, by: list[str]) -> None:
        self.period, self.grid, self.by = period, grid, list(by)
        self.seen_labels: set[str] = set()
        self.rows: dict[tuple, Row] = {}
        self.detail: dict[tuple, Row] = {}
        self.daily: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        #: (currency, cost kind) → the node counters' increases
        self.metered: dict[tuple[str, str], list[float]] = defaultdict(list)
        #: (currency, family, component) → node energy counters' increases (family: it, fac, em)
        self.energy: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        self.currencies: set[str] = set()
        #: currency → (provider, offering) → each GPU's price
        self.prices: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
        self.has_fac = self.has_em = False
        self.day_of = _days(period, grid)

    def add(self, f: Fetched) -> None:
        by = self.by
        for s in f.cost + f.seconds + f.joules:
            self.seen_labels.update(s.labels)
        model = {(target_key(r), r.get("uuid", "")): str(r.get("name", "")) for r in f.info}

        def value(b: str, labels: dict[str, str]) -> str:
            if b == "node" and "node" not in labels:
                return node_of(labels)
            if b == "gpu_model":
                return model.get((target_key(labels), labels.get("uuid", "")), "")
            return labels.get(b, "")

        # per GPU: facility/IT and grams/J ratios per step
        def by_gpu(series: list[Series]) -> dict[tuple, Series]:
            return {(target_key(s.labels), s.labels.get("uuid", "")): s for s in series
                    if s.labels.get("component") == "gpu"}

        gpu_it, gpu_fac, gpu_em = by_gpu(f.it), by_gpu(f.fac), by_gpu(f.em)

        def scaled(j: Series | None, gk: tuple, num: dict[tuple, Series]) -> float | None:
            if j is None:
                return 0.0
            d, n = gpu_it.get(gk), num.get(gk)
            if n is None or d is None:
                return None
            overall = n.total / d.total if d.total else None
            acc = 0.0
            for i, v in j.steps.items():
                di, ni = d.steps.get(i), n.steps.get(i)
                r = ni / di if di and ni is not None else overall
                if r is None:
                    return None
                acc += v * r
            return acc

        # workloads: identity → its series
        ws: dict[tuple, _Workload] = {}

        def w(labels: dict[str, str]) -> _Workload:
            ident = {k: v for k, v in labels.items() if k not in ("cost_kind", "currency")}
            key = tuple(sorted(ident.items()))
            if key not in ws:
                ws[key] = _Workload(ident)
            return ws[key]

        for s in f.cost:
            w(s.labels).cost[(s.labels.get("cost_kind", "energy"), s.labels.get("currency", ""))] = s
        for s in f.seconds:
            w(s.labels).sec = s
        for s in f.joules:
            w(s.labels).j = s
        prices: dict[tuple, list[tuple[str, str, str, float]]] = defaultdict(list)
        for r in f.cloud:
            prices[(target_key(r), str(r.get("uuid", "")))].append(
                (str(r.get("provider", "")), str(r.get("offering", "")), str(r.get("currency", "")), float(r["__value__"])))

        rows, detail, daily, day_of = self.rows, self.detail, self.daily, self.day_of
        for item in ws.values():
            labels = item.labels
            currencies = sorted({c for _, c in item.cost}) or [""]
            allocation, group = classify(by, tuple(value(b, labels) for b in by), labels.get("workload", ""))
            gk = (target_key(labels), labels.get("uuid", ""))
            held = item.sec.total / 3600.0 if item.sec else 0.0
            busy = 0.0 if labels.get("workload") in NOT_BUSY else held
            energy_j = item.j.total if item.j else 0.0
            facility = scaled(item.j, gk, gpu_fac)
            grams = scaled(item.j, gk, gpu_em)
            node = node_of(labels)
            for cur in currencies:
                self.currencies.add(cur)
                part = Row(cur, allocation, group, node, held, busy, energy_j / J_PER_KWH,
                           None if facility is None else facility / J_PER_KWH, grams, workloads=1)
                for (kind, c), s in item.cost.items():
                    if c == cur:
                        part.cost[kind] = part.cost.get(kind, 0.0) + s.total
                for prov, off, pc, price in prices.get(gk, ()):
                    if pc == cur:
                        part.cloud[(prov, off)] = part.cloud.get((prov, off), 0.0) + busy * price
                rows.setdefault((cur, allocation, group), Row(cur, allocation, group)).add(part)
                detail.setdefault((cur, allocation, group, node), Row(cur, allocation, group, node)).add(part)
                label = row_label(by, part)
                for (kind, c), s in item.cost.items():
                    if c == cur:
                        for i, v in s.steps.items():
                            daily[cur][day_of(i)][label] += v

        # the meter, per currency (a node's energy goes to the currencies its costs are in)
        node_currencies: dict[tuple, set[str]] = defaultdict(set)
        for kind, series in f.node_cost.items():
            for s in series:
                cur = s.labels.get("currency", "")
                node_currencies[target_key(s.labels)].add(cur)
                self.metered[(cur, kind)].append(s.total)
        self.currencies.update(c for cs in node_currencies.values() for c in cs)
        for family, series in (("it", f.it), ("fac", f.fac), ("em", f.em)):
            for s in series:
                for cur in node_currencies.get(target_key(s.labels)) or {""}:
                    self.energy[(cur, family, s.labels.get("component", ""))].append(s.total)
        self.has_fac = self.has_fac or bool(f.fac)
        self.has_em = self.has_em or bool(f.em)
        for lst in prices.values():
            for prov, off, pc, price in lst:
                self.prices[pc][(prov, off)].append(price)

    def bill(self, source: str, notes: list[str] | None = None) -> Bill:
        by = self.by
        for b in by:
            if b not in DERIVED and b not in self.seen_labels:
                raise ReportError(f"--by {b}: no workload series has that label (they have: "
                                  f"{', '.join(sorted(self.seen_labels)) or 'none'})")
        order = {ALLOCATED: 0, UNALLOCATED: 1, IDLE: 2}
        sections = []
        for cur in sorted(self.currencies):
            mine = [r for k, r in self.rows.items() if k[0] == cur]
            mine.sort(key=lambda r: (order[r.allocation], -r.total, r.group))
            det = sorted((r for k, r in self.detail.items() if k[0] == cur),
                         key=lambda r: (r.node, order[r.allocation], -r.total, r.group))
            total = Row(cur, "total", ())
            for r in mine:
                total.add(r)
            checks = []
            for kind in COST_KINDS:
                checks.append(Check(f"{kind} cost", cur, total.cost.get(kind, 0.0),
                                    math.fsum(self.metered.get((cur, kind), ()))))
            checks.append(Check("total cost", cur, total.total, math.fsum(c.metered for c in checks)))

            def energy(family: str, component: str) -> float:
                return math.fsum(self.energy.get((cur, family, component), ()))

            checks.append(Check("GPU energy (IT)", "kWh", total.it_kwh, energy("it", "gpu") / J_PER_KWH))
            if total.facility_kwh is not None and self.has_fac:
                checks.append(Check("GPU energy (facility)", "kWh", total.facility_kwh, energy("fac", "gpu") / J_PER_KWH))
            if total.emissions_g is not None and self.has_em:
                checks.append(Check("GPU emissions", "kg CO2e", total.emissions_g / 1000, energy("em", "gpu") / 1000))
            for comp in ("host", "other"):
                e = energy("it", comp)
                if e:
                    checks.append(Check(f"{comp} energy (IT; in the energy cost, not in the rows' kWh)", "kWh", 0.0,
                                        e / J_PER_KWH, info=True))
            sections.append(Section(
                cur, mine, det,
                {d: dict(v) for d, v in sorted(self.daily.get(cur, {}).items())}, checks,
                {k: sum(v) / len(v) for k, v in self.prices.get(cur, {}).items()}))
        return Bill(self.period, list(by), sections, source, list(notes or []))


def _days(period: Period, grid: Grid) -> Callable[[int], str]:
    days = period.days()
    starts = [a for _, a, _ in days]
    names = [d for d, _, _ in days]
    cache: dict[int, str] = {}

    def day_of(i: int) -> str:
        if i not in cache:
            t = grid.t(i - 1)  # the step's start
            cache[i] = names[max(0, bisect.bisect_right(starts, t + 1e-6) - 1)] if names else ""
        return cache[i]

    return day_of


def totals_by(sections: Iterable[Section]) -> dict[tuple[str, str, tuple[str, ...]], Row]:
    """(currency, allocation, group) → row: for comparisons in tests and scripts."""
    return {(s.currency, r.allocation, r.group): r for s in sections for r in s.rows}
