"""Running totals built from energy slices: energy, facility energy, cost, emissions.

The ledger is the single place where energy turns into totals. Every slice is
priced when it arrives, at the tariff band, PUE and grid intensity in force
during the slice's own wall-time stretch (a slice that straddles a band
boundary is split), so a tariff change applies from the moment it is loaded
and never to energy already counted. :meth:`Ledger.state` is what is persisted
across restarts; GPUs are keyed by UUID, so a renumbering after a reboot does
not move totals between GPUs.

Nothing non-finite or negative ever enters a total: a slice with NaN, infinite
or negative energy (a source gone wrong) is dropped and counted under
``errors{kind="invalid_energy"}``, and :meth:`Ledger.load_state` takes a
persisted state all or nothing, after checking every value.

Component keys: ``gpu:<uuid>`` for each GPU, ``host`` (CPU, DRAM, platform),
``other`` (BMC wall power not seen by the components, when cost is computed
from the wall reading), ``node`` (hardware amortisation and running costs of the host).

Cost kinds: ``energy`` (facility energy at the tariff), ``hardware`` (amortisation of
purchase prices) and ``running`` (``[[running_costs]]`` items). Every amount the ledger adds
that is not a GPU's own energy — host and ``other`` energy, amortisation and running costs —
is also held as *capacity* to be charged to the workloads (:meth:`Ledger.take_capacity`):
per GPU for the GPU's own items, per node for the node's, so that the attribution stage can
hand out exactly what the node's totals grew by.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Callable, Iterable, Mapping
from zoneinfo import ZoneInfo

from .cost import Amortization, CostModel, DemandTracker, IdleConfig, RunningCosts, is_idle
from .cost.model import JOULES_PER_KWH
from .cost.timeutil import get_zone, local_date, wall_to_utc
from . import statecheck
from .attribution.workloads import ENERGY, HARDWARE, RUNNING, WorkloadTotals
from .energy import EnergySlice

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: Periods of ``cost_to_date``, in the tariff's time zone.
PERIODS = ("day", "month")

# Sanity bounds of a persisted total (agent/statecheck.py says why these).
#: Units: J (IT and facility energy).
MAX_STATE_JOULES = statecheck.MAX_JOULES
#: Units: currency.
MAX_STATE_MONEY = statecheck.MAX_MONEY
#: Units: g CO2e.
MAX_STATE_GRAMS = statecheck.MAX_GRAMS

#: The error kind under which a rejected slice is counted.
INVALID_ENERGY = "invalid_energy"

#: The capacity key of the node's own amounts in :meth:`Ledger.take_capacity`.
NODE = ""


def gpu_key(uuid: str) -> str:
    return f"gpu:{uuid}"


@dataclass(frozen=True)
class PriceNow:
    """What a kWh costs right now, and the schedules' current values."""

    currency: str | None
    price_per_kwh: float | None
    band: str | None
    pue: float
    grams_per_kwh: float | None


class Ledger:
    """Totals since the agent's totals began (including earlier runs). Only ever grows."""

    def __init__(
        self,
        *,
        cost: CostModel | None = None,
        demand: DemandTracker | None = None,
        amortization: Amortization | None = None,
        hardware_currency: str | None = None,
        idle: IdleConfig | None = None,
        gpu_uuids: dict[int, str] | None = None,
        gpu_names: dict[int, str] | None = None,
    ) -> None:
        self.cost = cost or CostModel(None)
        self.demand = demand
        self.amortization = amortization if amortization is not None and amortization.enabled else None
        self.hardware_currency = hardware_currency
        self.idle = idle or IdleConfig()
        self.gpu_uuids = dict(gpu_uuids or {})
        self.gpu_names = dict(gpu_names or {})
        #: (gpu uuid, measurement source) → J
        self.gpu_energy: dict[tuple[str, str], float] = defaultdict(float)
        #: (host component, measurement source) → J; components cpu, dram, platform
        self.host_energy: dict[tuple[str, str], float] = defaultdict(float)
        #: component key → J
        self.it_energy: dict[str, float] = defaultdict(float)
        self.facility_energy: dict[str, float] = defaultdict(float)
        #: (component key, currency) → currency units
        self.energy_cost: dict[tuple[str, str], float] = defaultdict(float)
        self.idle_cost: dict[tuple[str, str], float] = defaultdict(float)
        self.hardware_cost: dict[tuple[str, str], float] = defaultdict(float)
        #: (component key, item, currency) → currency units of ``[[running_costs]]``
        self.running_cost: dict[tuple[str, str, str], float] = defaultdict(float)
        self.running: RunningCosts | None = None
        #: ``[[cloud_prices]]`` (agent.cost.CloudPrice)
        self.cloud: list[Any] = []
        #: GPU uuid, or NODE → (cost kind, currency) → amount added since the last take_capacity
        self._capacity: dict[str, dict[tuple[str, str], float]] = {}
        #: component key → g CO2e
        self.emissions: dict[str, float] = defaultdict(float)
        #: (period, kind, currency) → currency units since the period began; kind is
        #: ``energy``, ``hardware`` or ``running``, period ``day`` or ``month`` in the tariff's zone.
        self.period_cost: dict[tuple[str, str, str], float] = defaultdict(float)
        #: (period, provider, offering, currency) → what renting this node's GPUs for the hours
        #: workloads held them would have cost since the period began (``[[cloud_prices]]``)
        self.cloud_to_date: dict[tuple[str, str, str, str], float] = defaultdict(float)
        #: period → its key now ("2026-11-24" for day, "2026-11" for month)
        self.periods: dict[str, str] = {}
        #: GPU energy and cost split among workloads (filled by agent.attribution.split)
        self.workloads = WorkloadTotals()
        tariff = self.cost.tariff
        self._zone: ZoneInfo = get_zone(tariff.config.timezone) if tariff is not None else get_zone("UTC")
        self._period_cache: tuple[float, float, dict[str, str]] | None = None
        #: See period_bounds: ((zone, periods), bounds).
        self._bounds_cache: tuple[Any, dict[str, tuple[float, float]]] | None = None
        #: See _hardware_rates: (amortisation, currency, gpu_uuids, gpu_names, rates).
        self._rates: tuple[Any, ...] | None = None
        #: See _running_rates: (running costs, gpu_uuids, gpu_names, rates).
        self._running_cache: tuple[Any, ...] | None = None
        #: See cloud_prices: (prices, gpu_uuids, gpu_names, answer).
        self._cloud_cache: tuple[Any, ...] | None = None
        #: Called with an error kind when a slice is refused (the sampler counts it).
        self.on_error: Callable[[str], None] = lambda kind: None
        self._invalid_logged = False

    @classmethod
    def from_settings(cls, settings: Any) -> "Ledger":
        """A ledger priced by ``settings`` (:class:`agent.config.Settings`)."""
        led = cls()
        led.reconfigure(settings)
        return led

    def reconfigure(self, settings: Any) -> None:
        """Price energy from now on by ``settings``; totals already counted keep their prices.

        The month's demand peak carries on when the demand window and zone stay the same.
        """
        t = settings.tariff
        self.cost = CostModel(t, settings.pue, settings.carbon)
        new_demand = DemandTracker.from_tariff(t) if t is not None else DemandTracker()
        old = self.demand
        if old is not None and (old.window_s, old.zone) == (new_demand.window_s, new_demand.zone):
            old.price_per_kw_month = new_demand.price_per_kw_month
        else:
            self.demand = new_demand
        amort = Amortization(settings.hardware)
        self.amortization = amort if amort.enabled else None
        a = getattr(settings, "attribution", None)
        if a is not None:
            self.workloads.configure(a.max_workloads, a.retention_seconds)
        self.hardware_currency = settings.hardware_currency
        running = RunningCosts(getattr(settings, "running_costs", []), settings.hardware_currency)
        self.running = running if running.enabled else None
        self.cloud = list(getattr(settings, "cloud_prices", []))
        self._rates = None
        self.idle = settings.idle
        self._zone = get_zone(t.timezone) if t is not None else get_zone("UTC")
        self._period_cache = None

    def open_accounts(self, gpu_sources: dict[str, Iterable[str]], *, host: bool = True, other: bool = False) -> None:
        """Create every total this node can have, at its true value: 0, or what was loaded.

        So each counter series exists from the first scrape and Prometheus'
        ``increase()`` sees the first joule, cent and gram, not a series that
        appears at 2,000 J. ``gpu_sources``: GPU uuid → the sources its energy
        can be measured by (its method and the polled fallback).
        """
        keys = [gpu_key(u) for u in gpu_sources] + (["host"] if host else []) + (["other"] if other else [])
        for uuid, sources in gpu_sources.items():
            for src in sources:
                self.gpu_energy[(uuid, src)] += 0.0
        cur = self.cost.currency
        for k in keys:
            self.it_energy[k] += 0.0
            self.facility_energy[k] += 0.0
            if cur:
                self.energy_cost[(k, cur)] += 0.0
            if self.cost.carbon is not None:
                self.emissions[k] += 0.0
        if cur:
            for uuid in gpu_sources:
                self.idle_cost[(gpu_key(uuid), cur)] += 0.0
            for p in PERIODS:
                self.period_cost[(p, "energy", cur)] += 0.0
        if self.amortization is not None and self.hardware_currency:
            for uuid in gpu_sources:
                self.hardware_cost[(gpu_key(uuid), self.hardware_currency)] += 0.0
            self.hardware_cost[("node", self.hardware_currency)] += 0.0
            for p in PERIODS:
                self.period_cost[(p, "hardware", self.hardware_currency)] += 0.0
        for (_, provider, offering, cur) in self.cloud_prices():
            for p in PERIODS:
                self.cloud_to_date[(p, provider, offering, cur)] += 0.0
        if self.running is not None:
            rates = [("node", r) for r in self.running.node_rates()]
            for index, uuid in self.gpu_uuids.items():
                if uuid in gpu_sources:
                    rates += [(gpu_key(uuid), r) for r in self.running.gpu_rates(index, self.gpu_names.get(index))]
            for key, (item, cur, _) in rates:
                self.running_cost[(key, item, cur)] += 0.0
                for p in PERIODS:
                    self.period_cost[(p, RUNNING, cur)] += 0.0

    def open_host_component(self, component: str, source: str) -> None:
        """Create a host component's energy total at its true value (see :meth:`open_accounts`)."""
        self.host_energy[(component, source)] += 0.0

    # -- periods (today, this month) ---------------------------------------

    def _period_keys(self, t: float) -> dict[str, str]:
        """{"day": "YYYY-MM-DD", "month": "YYYY-MM"} of instant ``t`` in the tariff's zone."""
        c = self._period_cache
        if c is not None and c[0] <= t < c[1]:
            return c[2]
        d = local_date(self._zone, t)
        start = wall_to_utc(self._zone, datetime(d.year, d.month, d.day))
        nxt = d + timedelta(days=1)
        end = wall_to_utc(self._zone, datetime(nxt.year, nxt.month, nxt.day))
        keys = {"day": d.isoformat(), "month": d.isoformat()[:7]}
        self._period_cache = (start, end, keys)
        return keys

    def period_bounds(self) -> dict[str, tuple[float, float]]:
        """period → (start, end) in unix seconds of the day and month the period totals are in
        now (:attr:`periods`), in the tariff's zone: what ``gpucost_cost_to_date`` counts since,
        and when it restarts. A month or day with a DST change is an hour shorter or longer.

        The recording rules project the month on this calendar (hours left = (end - time()) /
        3600), never on PromQL's UTC one.
        """
        key = (self._zone, tuple(sorted(self.periods.items())))
        cached = self._bounds_cache
        if cached is not None and cached[0] == key:
            return dict(cached[1])
        out: dict[str, tuple[float, float]] = {}
        for period, name in self.periods.items():
            try:
                if period == "day":
                    first = date.fromisoformat(name)
                    nxt = first + timedelta(days=1)
                elif period == "month":
                    year, month = (int(x) for x in name.split("-"))
                    first = date(year, month, 1)
                    nxt = date(year + month // 12, month % 12 + 1, 1)
                else:
                    continue
            except ValueError:  # a key this version does not know how to read: no bounds
                continue
            out[period] = (
                wall_to_utc(self._zone, datetime(first.year, first.month, first.day)),
                wall_to_utc(self._zone, datetime(nxt.year, nxt.month, nxt.day)),
            )
        self._bounds_cache = (key, out)
        return dict(out)

    def roll_periods(self, t: float) -> None:
        """Start a new day or month at instant ``t`` when it has begun: its totals restart at 0."""
        for period, key in self._period_keys(t).items():
            current = self.periods.get(period)
            if current is None or key > current:
                if current is not None:
                    for k in self.period_cost:
                        if k[0] == period:
                            self.period_cost[k] = 0.0
                    for c in self.cloud_to_date:
                        if c[0] == period:
                            self.cloud_to_date[c] = 0.0
                self.periods[period] = key

    def _add_to_periods(self, t: float, kind: str, currency: str, amount: float) -> None:
        """Add cost incurred at instant ``t`` to the periods it falls in (a closed period takes nothing)."""
        c = self._period_cache
        if c is not None and c[0] <= t < c[1] and self.periods == c[2]:
            # The periods in force are those of t (nearly every call): nothing to roll, all take it.
            for period in c[2]:
                self.period_cost[(period, kind, currency)] += amount
            return
        self.roll_periods(t)
        for period, key in self._period_keys(t).items():
            if key == self.periods[period]:
                self.period_cost[(period, kind, currency)] += amount

    # -- adding energy ----------------------------------------------------

    def add(self, slices: Iterable[EnergySlice]) -> list[tuple[EnergySlice, float | None]]:
        """GPU energy slices. Returns those counted, each with its cost (None without a tariff),
        for the attribution stage to split among workloads in the same proportions."""
        counted: list[tuple[EnergySlice, float | None]] = []
        for s in slices:
            j, t0, t1 = s.joules, s.t0, s.t1
            if not self._valid(j, t0, t1, "GPU %s (%s)", s.gpu, s.source):
                continue
            uuid = self.gpu_uuids.get(s.gpu, f"index-{s.gpu}")
            self.gpu_energy[(uuid, s.source)] += j
            key = gpu_key(uuid)
            cost = self._price(key, t0, t1, j)
            if cost is not None and s.utilization is not None and is_idle(s.utilization, self.idle):
                self.idle_cost[(key, self.cost.currency)] += cost  # type: ignore[index]
            counted.append((s, cost))
        return counted

    def add_host(self, component: str, source: str, t0: float, t1: float, joules: float) -> None:
        """Host energy of one component over [t0, t1] (wall time). Units: J."""
        if self._valid(joules, t0, t1, "host %s (%s)", component, source):
            self.host_energy[(component, source)] += joules
            self._node_energy(self._price("host", t0, t1, joules))

    def add_other(self, t0: float, t1: float, joules: float) -> None:
        """Wall energy the BMC saw beyond GPUs + host (PSU losses, fans). Units: J."""
        if self._valid(joules, t0, t1, "other"):
            self._node_energy(self._price("other", t0, t1, joules))

    def _node_energy(self, cost: float | None) -> None:
        """The cost of node energy (host, other) is capacity of the node, shared by its GPUs."""
        if cost is not None and self.cost.currency:
            self._hold(NODE, ENERGY, self.cost.currency, cost)

    def _hold(self, who: str, kind: str, currency: str, amount: float) -> None:
        held = self._capacity.get(who)
        if held is None:
            held = self._capacity[who] = {}
        held[(kind, currency)] = held.get((kind, currency), 0.0) + amount

    def take_capacity(self) -> dict[str, dict[tuple[str, str], float]]:
        """What the totals grew by, other than GPU energy, since the last call: GPU uuid (its own
        amortisation and running costs) or :data:`NODE` (host and other energy, the node's
        amortisation and running costs) → (kind, currency) → amount. Emptied by the call."""
        taken, self._capacity = self._capacity, {}
        return taken

    def _valid(self, joules: float, t0: float, t1: float, what: str, *args: Any) -> bool:
        """Whether a slice may enter the totals: finite, positive energy over a finite, forward
        stretch. Zero is skipped quietly; anything else refused is counted and logged (once),
        naming the slice by ``what % args`` (formatted only then)."""
        if joules == 0:
            return False
        if joules > 0 and math.isfinite(joules) and math.isfinite(t0) and math.isfinite(t1) and t1 >= t0:
            return True
        self.on_error(INVALID_ENERGY)
        log.log(
            logging.DEBUG if self._invalid_logged else logging.WARNING,
            what + ": refused %r J over [%r, %r]: energy must be finite and not negative "
            "(counted as errors{kind=\"%s\"}; further ones are logged at debug level)",
            *args, joules, t0, t1, INVALID_ENERGY,
        )
        self._invalid_logged = True
        return False

    def _price(self, key: str, t0: float, t1: float, joules: float) -> float | None:
        parts = self.cost.price(t0, t1, joules)
        cost_sum: float | None = None
        currency = self.cost.currency
        for p in parts:
            self.it_energy[key] += p.it_joules
            self.facility_energy[key] += p.facility_joules
            if p.cost is not None:
                cost_sum = (cost_sum or 0.0) + p.cost
                if currency:
                    self._add_to_periods((p.t0 + p.t1) / 2, "energy", currency, p.cost)
            if p.emissions_g is not None:
                self.emissions[key] += p.emissions_g
            if self.demand is not None:
                self.demand.add(p.t0, p.t1, p.facility_joules)
        if cost_sum is not None and self.cost.currency:
            self.energy_cost[(key, self.cost.currency)] += cost_sum
        return cost_sum

    def accrue_capacity(self, t0: float, t1: float) -> None:
        """Amortisation and running costs of every present GPU and of the node for the wall
        time [t0, t1]: they cost the same whether the hardware works or idles."""
        if t1 <= t0:
            return
        dt = t1 - t0
        mid = (t0 + t1) / 2
        a = self.amortization
        if a is not None and self.hardware_currency:
            cur = self.hardware_currency
            total = a.node_cost_per_second() * dt
            self.hardware_cost[("node", cur)] += total
            self._hold(NODE, HARDWARE, cur, total)
            for (key, _), uuid, rate in self._hardware_rates(a, cur):
                part = rate * dt
                self.hardware_cost[(key, cur)] += part
                self._hold(uuid, HARDWARE, cur, part)
                total += part
            self._add_to_periods(mid, HARDWARE, cur, total)
        if self.running is not None:
            by_currency: dict[str, float] = {}
            for who, key, item, cur, rate in self._running_rates(self.running):
                part = rate * dt
                self.running_cost[(key, item, cur)] += part
                self._hold(who, RUNNING, cur, part)
                by_currency[cur] = by_currency.get(cur, 0.0) + part
            for cur, total in by_currency.items():  # the periods once a currency, as for hardware
                self._add_to_periods(mid, RUNNING, cur, total)

    def _hardware_rates(self, a: Amortization, cur: str) -> list[tuple[tuple[str, str], str, float]]:
        """Each GPU's (hardware_cost key, uuid, currency per second), in ``gpu_uuids`` order;
        built again only when the amortisation, currency or GPUs change (every tick asks)."""
        known = self._rates
        if known is not None and known[0] is a and known[1] == cur and known[2] == self.gpu_uuids \
                and known[3] == self.gpu_names:
            return known[4]
        rates = [((gpu_key(uuid), cur), uuid, a.gpu_cost_per_second(index, self.gpu_names.get(index)))
                 for index, uuid in self.gpu_uuids.items()]
        self._rates = (a, cur, dict(self.gpu_uuids), dict(self.gpu_names), rates)
        return rates

    def _running_rates(self, r: RunningCosts) -> list[tuple[str, str, str, str, float]]:
        """Every running-cost rate: (capacity key, component key, item, currency, per second),
        the node's first; kept until the items or GPUs change (every tick asks)."""
        known = self._running_cache
        if known is not None and known[0] is r and known[1] == self.gpu_uuids and known[2] == self.gpu_names:
            return known[3]
        rates = [(NODE, "node", item, cur, rate) for item, cur, rate in r.node_rates()]
        for index, uuid in self.gpu_uuids.items():
            rates += [(uuid, gpu_key(uuid), item, cur, rate)
                      for item, cur, rate in r.gpu_rates(index, self.gpu_names.get(index))]
        self._running_cache = (r, dict(self.gpu_uuids), dict(self.gpu_names), rates)
        return rates

    def crosses_boundary(self, t0: float, t1: float) -> bool:
        """Whether the tariff band, PUE or carbon intensity changes within [t0, t1)."""
        return t1 > t0 and len(self.cost.price(t0, t1, 0.0)) > 1

    # -- reading ----------------------------------------------------------

    def price_now(self, t: float) -> PriceNow:
        c = self.cost
        price = band = None
        if c.tariff is not None:
            price, band = c.tariff.price_at(t)
        grams = c.carbon.value_at(t) if c.carbon is not None else None
        return PriceNow(c.currency, price, band, c.pue.value_at(t), grams)

    def gpu_energy_by_source(self, uuid: str) -> dict[str, float]:
        return {src: j for (u, src), j in self.gpu_energy.items() if u == uuid}

    def gpu_energy_by_gpu(self) -> dict[str, dict[str, float]]:
        """Every GPU's :meth:`gpu_energy_by_source` in one pass (a snapshot per tick: one scan,
        not one per GPU). Units: J."""
        out: dict[str, dict[str, float]] = {}
        for (u, src), j in self.gpu_energy.items():
            out.setdefault(u, {})[src] = j
        return out

    def hardware_rate_per_hour(self) -> float | None:
        a = self.amortization
        if a is None or not self.hardware_currency:
            return None
        per_s = a.node_cost_per_second() + sum(rate for _, _, rate in self._hardware_rates(a, self.hardware_currency))
        return per_s * 3600.0

    def cloud_prices(self) -> dict[tuple[str, str, str, str], float]:
        """(GPU uuid, provider, offering, currency) → the cloud price per GPU-hour of the GPU's
        model: the first ``[[cloud_prices]]`` entry per provider, offering and currency whose
        model the GPU's name holds. Built again only when the prices or GPUs change."""
        known = self._cloud_cache
        if known is not None and known[0] is self.cloud and known[1] == self.gpu_uuids and known[2] == self.gpu_names:
            return known[3]
        out: dict[tuple[str, str, str, str], float] = {}
        for index, uuid in self.gpu_uuids.items():
            name = self.gpu_names.get(index)
            for c in self.cloud:
                key = (uuid, c.provider, c.offering, c.currency)
                if key not in out and c.matches(name):
                    out[key] = c.price_per_gpu_hour
        self._cloud_cache = (self.cloud, dict(self.gpu_uuids), dict(self.gpu_names), out)
        return out

    def add_busy(self, t: float, busy: Mapping[str, float]) -> None:
        """GPU uuid → seconds workloads held it in the tick ending at ``t``: priced at the GPU
        model's cloud prices into :attr:`cloud_to_date`."""
        prices = self.cloud_prices()
        if not prices:
            return
        self.roll_periods(t)
        keys = self._period_keys(t)
        for (uuid, provider, offering, cur), price in prices.items():
            seconds = busy.get(uuid)
            if seconds:
                for period, key in keys.items():
                    if key == self.periods[period]:
                        self.cloud_to_date[(period, provider, offering, cur)] += price * seconds / 3600.0

    def running_rate_per_hour(self) -> dict[str, float]:
        """The node's running costs per hour (its items and its GPUs'), by currency."""
        out: dict[str, float] = {}
        if self.running is not None:
            for _, _, _, cur, rate in self._running_rates(self.running):
                out[cur] = out.get(cur, 0.0) + rate * 3600.0
        return out

    # -- persistence ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        def pairs(d: dict[tuple[str, str], float]) -> list[list[Any]]:
            return [[a, b, v] for (a, b), v in sorted(d.items())]

        return {
            "version": STATE_VERSION,
            "gpu_energy_joules": pairs(self.gpu_energy),
            "host_energy_joules": pairs(self.host_energy),
            "it_energy_joules": dict(self.it_energy),
            "facility_energy_joules": dict(self.facility_energy),
            "energy_cost": pairs(self.energy_cost),
            "idle_cost": pairs(self.idle_cost),
            "hardware_cost": pairs(self.hardware_cost),
            "running_cost": [[k, i, c, v] for (k, i, c), v in sorted(self.running_cost.items())],
            "emissions_grams": dict(self.emissions),
            "demand": self.demand.state() if self.demand is not None else None,
            "periods": {
                "keys": dict(self.periods),
                "cost": [[p, k, c, v] for (p, k, c), v in sorted(self.period_cost.items())],
                "cloud": [[p, pr, o, c, v] for (p, pr, o, c), v in sorted(self.cloud_to_date.items())],
            },
            "workloads": self.workloads.state(),
        }

    def load_state(self, state: Any) -> None:
        """Continue from a persisted state, all or nothing.

        Every value is checked (types, finite, not negative, below the sanity bounds)
        before any total is touched. Raises ValueError with one line naming the first
        bad value (``energy_cost[2][2]: -1.5 is negative``); then the ledger is unchanged.
        The one exception is the workloads' part: a bad row there sets the workloads' totals
        aside (logged) and the node's totals load.
        """
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {statecheck.kind_of(state)}")
        version = state.get("version")
        if isinstance(version, bool) or version != STATE_VERSION:
            raise ValueError(f"state version {version!r} is not {STATE_VERSION}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        if "saved_at" in state:
            statecheck.number(state["saved_at"], "saved_at", statecheck.MAX_TIMESTAMP)
        gpu = _pairs(state, "gpu_energy_joules", MAX_STATE_JOULES)
        host = _pairs(state, "host_energy_joules", MAX_STATE_JOULES)
        energy_cost = _pairs(state, "energy_cost", MAX_STATE_MONEY)
        idle_cost = _pairs(state, "idle_cost", MAX_STATE_MONEY)
        hardware_cost = _pairs(state, "hardware_cost", MAX_STATE_MONEY)
        running_cost = _keyed(state.get("running_cost", []), "running_cost", 3, MAX_STATE_MONEY)  # absent before 0.3
        it = _map(state, "it_energy_joules", MAX_STATE_JOULES)
        facility = _map(state, "facility_energy_joules", MAX_STATE_JOULES)
        emissions = _map(state, "emissions_grams", MAX_STATE_GRAMS)
        demand = state["demand"]
        if demand is not None and not isinstance(demand, dict):
            raise ValueError(f"demand: expected an object or null, got {statecheck.kind_of(demand)}")
        period_keys, period_cost = _periods(state.get("periods"))  # absent in states saved before 0.2
        cloud = _cloud_periods(state.get("periods"), period_keys)
        # Absent in states saved before workload attribution. Workload keys and labels come from
        # what users set (a job's environment, unit names): a bad one never costs the node's
        # totals, only the workloads' (which start afresh, said once).
        workloads = None
        if state.get("workloads") is not None:
            try:
                workloads = WorkloadTotals.parse_state(state["workloads"])
            except ValueError as exc:
                log.warning("state: the workloads' totals were set aside (%s); the node's totals are kept, "
                            "the workloads' start again from 0", exc)
        if self.demand is not None and demand:
            self.demand.load_state(demand)  # all or nothing too; the last check that can fail
        for into, loaded in (
            (self.gpu_energy, gpu),
            (self.host_energy, host),
            (self.energy_cost, energy_cost),
            (self.idle_cost, idle_cost),
            (self.hardware_cost, hardware_cost),
            (self.running_cost, running_cost),
            (self.it_energy, it),
            (self.facility_energy, facility),
            (self.emissions, emissions),
            (self.period_cost, period_cost),
            (self.cloud_to_date, cloud),
        ):
            into.update(loaded)
        self.periods.update(period_keys)
        if workloads is not None:
            self.workloads.take(workloads)


#: Keys :meth:`Ledger.state` always writes (``saved_at`` is added by the store).
_STATE_KEYS = (
    "gpu_energy_joules",
    "host_energy_joules",
    "it_energy_joules",
    "facility_energy_joules",
    "energy_cost",
    "idle_cost",
    "hardware_cost",
    "emissions_grams",
    "demand",
)
def _keyed(rows: Any, name: str, width: int, limit: float) -> dict[tuple[str, ...], float]:
    """``[[key, ..., number], ...]`` with ``width`` keys a row → {(key, ...): number}."""
    if not isinstance(rows, list):
        raise ValueError(f"{name}: expected a list, got {statecheck.kind_of(rows)}")
    out: dict[tuple[str, ...], float] = {}
    for i, row in enumerate(rows):
        where = f"{name}[{i}]"
        if not isinstance(row, list) or len(row) != width + 1:
            raise ValueError(f"{where}: expected [{', '.join(['name'] * width)}, number]")
        key = tuple(statecheck.name(row[j], f"{where}[{j}]") for j in range(width))
        if key in out:
            raise ValueError(f"{where}: {list(key)} appears twice")
        out[key] = statecheck.number(row[width], f"{where}[{width}]", limit)
    return out


def _pairs(state: dict[str, Any], name: str, limit: float) -> dict[tuple[str, ...], float]:
    """``state[name]``: ``[[key, key, number], ...]`` → {(key, key): number}."""
    return _keyed(state[name], name, 2, limit)


def _periods(periods: Any) -> tuple[dict[str, str], dict[tuple[str, str, str], float]]:
    """``{"keys": {period: "YYYY-MM[-DD]"}, "cost": [[period, kind, currency, number], ...]}``;
    periods other than :data:`PERIODS` are ignored, as is cost of a period without a key."""
    if periods is None:
        return {}, {}
    if not isinstance(periods, dict) or not isinstance(periods.get("keys"), dict):
        raise ValueError("periods: expected an object with 'keys' and 'cost'")
    keys: dict[str, str] = {}
    for p, k in periods["keys"].items():
        pattern = _PERIOD_KEY.get(p)
        if pattern is None:
            continue
        if not isinstance(k, str) or not pattern.fullmatch(k):
            raise ValueError(f"periods.keys[{p!r}]: expected a {p}, got {k!r:.40}")
        keys[p] = k
    rows = periods.get("cost")
    if not isinstance(rows, list):
        raise ValueError(f"periods.cost: expected a list, got {statecheck.kind_of(rows)}")
    cost: dict[tuple[str, str, str], float] = {}
    for i, row in enumerate(rows):
        where = f"periods.cost[{i}]"
        if not isinstance(row, list) or len(row) != 4:
            raise ValueError(f"{where}: expected [period, kind, currency, number]")
        key = tuple(statecheck.name(row[j], f"{where}[{j}]") for j in range(3))
        value = statecheck.number(row[3], f"{where}[3]", MAX_STATE_MONEY)
        if key[0] in keys:
            cost[key] = value
    return keys, cost


def _cloud_periods(periods: Any, keys: Mapping[str, str]) -> dict[tuple[str, str, str, str], float]:
    """``periods.cloud``: ``[[period, provider, offering, currency, number], ...]`` (absent before
    cloud prices); rows of a period without a key are ignored, as period costs are."""
    rows = periods.get("cloud", []) if isinstance(periods, dict) else []
    if not isinstance(rows, list):
        raise ValueError(f"periods.cloud: expected a list, got {statecheck.kind_of(rows)}")
    out: dict[tuple[str, str, str, str], float] = {}
    for i, row in enumerate(rows):
        where = f"periods.cloud[{i}]"
        if not isinstance(row, list) or len(row) != 5:
            raise ValueError(f"{where}: expected [period, provider, offering, currency, number]")
        key = tuple(statecheck.name(row[j], f"{where}[{j}]") for j in range(4))
        value = statecheck.number(row[4], f"{where}[4]", MAX_STATE_MONEY)
        if key[0] in keys:
            out[key] = value  # type: ignore[index]
    return out


_PERIOD_KEY = {"day": re.compile(r"\d{4}-\d{2}-\d{2}"), "month": re.compile(r"\d{4}-\d{2}")}


def _map(state: dict[str, Any], name: str, limit: float) -> dict[str, float]:
    """``{key: number}`` with every value checked."""
    d = state[name]
    if not isinstance(d, dict):
        raise ValueError(f"{name}: expected an object, got {statecheck.kind_of(d)}")
    return {statecheck.name(k, name): statecheck.number(v, f"{name}[{k!r}]", limit) for k, v in d.items()}


def kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH
