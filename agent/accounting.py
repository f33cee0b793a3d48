"""Running totals built from energy slices: energy, facility energy, cost, emissions.

The ledger is the single place where energy turns into totals. Every slice is
priced when it arrives, at the tariff band, PUE and grid intensity in force
during the slice's own wall-time stretch (a slice that straddles a band
boundary is split), so a tariff change applies from the moment it is loaded
and never to energy already counted. :meth:`Ledger.state` is what is persisted
across restarts; GPUs are keyed by UUID, so a renumbering after a reboot does
not move totals between GPUs.

Component keys: ``gpu:<uuid>`` for each GPU, ``host`` (CPU, DRAM, platform),
``other`` (BMC wall power not seen by the components, when cost is computed
from the wall reading), ``node`` (hardware amortisation of the host).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from .cost import Amortization, CostModel, DemandTracker, IdleConfig, is_idle
from .cost.model import JOULES_PER_KWH
from .cost.timeutil import get_zone, local_date, wall_to_utc
from .energy import EnergySlice

log = logging.getLogger(__name__)

STATE_VERSION = 1

#: Periods of ``cost_to_date``, in the tariff's time zone.
PERIODS = ("day", "month")


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
        #: component key → g CO2e
        self.emissions: dict[str, float] = defaultdict(float)
        #: (period, kind, currency) → currency units since the period began; kind is
        #: ``energy`` or ``hardware``, period ``day`` or ``month`` in the tariff's zone.
        self.period_cost: dict[tuple[str, str, str], float] = defaultdict(float)
        #: period → its key now ("2026-11-24" for day, "2026-11" for month)
        self.periods: dict[str, str] = {}
        tariff = self.cost.tariff
        self._zone: ZoneInfo = get_zone(tariff.config.timezone) if tariff is not None else get_zone("UTC")
        self._period_cache: tuple[float, float, dict[str, str]] | None = None

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

    def roll_periods(self, t: float) -> None:
        """Start a new day or month at instant ``t`` when it has begun: its totals restart at 0."""
        for period, key in self._period_keys(t).items():
            current = self.periods.get(period)
            if current is None or key > current:
                if current is not None:
                    for k in self.period_cost:
                        if k[0] == period:
                            self.period_cost[k] = 0.0
                self.periods[period] = key

    def _add_to_periods(self, t: float, kind: str, currency: str, amount: float) -> None:
        """Add cost incurred at instant ``t`` to the periods it falls in (a closed period takes nothing)."""
        self.roll_periods(t)
        for period, key in self._period_keys(t).items():
            if key == self.periods[period]:
                self.period_cost[(period, kind, currency)] += amount

    # -- adding energy ----------------------------------------------------

    def add(self, slices: Iterable[EnergySlice]) -> None:
        """GPU energy slices."""
        for s in slices:
            if s.joules <= 0:
                continue
            uuid = self.gpu_uuids.get(s.gpu, f"index-{s.gpu}")
            self.gpu_energy[(uuid, s.source)] += s.joules
            cost = self._price(gpu_key(uuid), s.t0, s.t1, s.joules)
            if cost is not None and s.utilization is not None and is_idle(s.utilization, self.idle):
                self.idle_cost[(gpu_key(uuid), self.cost.currency)] += cost  # type: ignore[index]

    def add_host(self, component: str, source: str, t0: float, t1: float, joules: float) -> None:
        """Host energy of one component over [t0, t1] (wall time). Units: J."""
        if joules > 0:
            self.host_energy[(component, source)] += joules
            self._price("host", t0, t1, joules)

    def add_other(self, t0: float, t1: float, joules: float) -> None:
        """Wall energy the BMC saw beyond GPUs + host (PSU losses, fans). Units: J."""
        if joules > 0:
            self._price("other", t0, t1, joules)

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

    def accrue_hardware(self, t0: float, t1: float) -> None:
        """Amortisation of every present GPU and of the node for the wall time [t0, t1]."""
        a = self.amortization
        if a is None or not self.hardware_currency or t1 <= t0:
            return
        dt = t1 - t0
        cur = self.hardware_currency
        total = a.node_cost_per_second() * dt
        self.hardware_cost[("node", cur)] += total
        for index, uuid in self.gpu_uuids.items():
            part = a.gpu_cost_per_second(index, self.gpu_names.get(index)) * dt
            self.hardware_cost[(gpu_key(uuid), cur)] += part
            total += part
        self._add_to_periods((t0 + t1) / 2, "hardware", cur, total)

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

    def hardware_rate_per_hour(self) -> float | None:
        a = self.amortization
        if a is None or not self.hardware_currency:
            return None
        per_s = a.node_cost_per_second() + sum(
            a.gpu_cost_per_second(i, self.gpu_names.get(i)) for i in self.gpu_uuids
        )
        return per_s * 3600.0

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
            "emissions_grams": dict(self.emissions),
            "demand": self.demand.state() if self.demand is not None else None,
            "periods": {
                "keys": dict(self.periods),
                "cost": [[p, k, c, v] for (p, k, c), v in sorted(self.period_cost.items())],
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a persisted state. Raises ValueError on a malformed one."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")

        def load_pairs(name: str, into: dict[tuple[str, str], float]) -> None:
            for a, b, v in state.get(name, []):
                into[(str(a), str(b))] = float(v)

        def load_map(name: str, into: dict[str, float]) -> None:
            for k, v in (state.get(name) or {}).items():
                into[str(k)] = float(v)

        load_pairs("gpu_energy_joules", self.gpu_energy)
        load_pairs("host_energy_joules", self.host_energy)
        load_pairs("energy_cost", self.energy_cost)
        load_pairs("idle_cost", self.idle_cost)
        load_pairs("hardware_cost", self.hardware_cost)
        load_map("it_energy_joules", self.it_energy)
        load_map("facility_energy_joules", self.facility_energy)
        load_map("emissions_grams", self.emissions)
        if self.demand is not None and state.get("demand"):
            self.demand.load_state(state["demand"])
        periods = state.get("periods")
        if periods:
            self.periods = {str(p): str(k) for p, k in periods["keys"].items() if p in PERIODS}
            for p, kind, cur, v in periods["cost"]:
                if p in self.periods:
                    self.period_cost[(str(p), str(kind), str(cur))] = float(v)


def kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH
