"""The immutable state the exporter renders: one :class:`Snapshot` per tick.

The sampler builds a new snapshot and swaps a single reference; a scrape reads
whichever snapshot is current. No scrape ever touches NVML or a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .sources.gpu import GpuInfo, GpuReading


@dataclass(frozen=True)
class GpuState:
    info: GpuInfo
    up: bool
    reading: GpuReading | None
    #: ``counter``, ``samples`` or ``polled``: how this GPU's energy is measured.
    energy_method: str
    #: Energy since the agent's totals began, by the source that measured it. Units: J.
    energy_joules: Mapping[str, float] = field(default_factory=dict)
    #: The energy counter failed for long and has not answered since (energy from polled power).
    energy_counter_stale: bool = False


@dataclass(frozen=True)
class ReplayProgress:
    position_seconds: float
    duration_seconds: float
    loops: int
    finished: bool


@dataclass(frozen=True)
class AgentStats:
    #: Real Unix time of the last tick that completed. Units: s.
    last_success_timestamp: float | None
    #: time.monotonic() of the same moment: ages are measured on it (a wall step cannot fake them).
    last_success_monotonic: float | None
    #: Wall time the last tick took. Units: s.
    last_duration_seconds: float | None
    ticks_total: int
    #: Errors by kind since start.
    errors: Mapping[str, int]
    energy_counter_reads_total: int
    #: Real Unix time of the last successful write of the totals; None when not persisting.
    last_save_timestamp: float | None = None


@dataclass(frozen=True)
class CostView:
    """Money, facility energy and carbon, as of the tick. Keys: see :mod:`agent.accounting`."""

    now: Any  # agent.accounting.PriceNow
    it_power_watts: float | None
    facility_power_watts: float | None
    energy_cost_rate_per_hour: float | None
    hardware_cost_rate_per_hour: float | None
    hardware_currency: str | None
    it_energy_joules: Mapping[str, float]
    facility_energy_joules: Mapping[str, float]
    #: (component key, currency) → currency units
    energy_cost: Mapping[tuple[str, str], float]
    idle_cost: Mapping[tuple[str, str], float]
    hardware_cost: Mapping[tuple[str, str], float]
    emissions_grams: Mapping[str, float]
    demand_peak_watts: float | None
    demand_charge: float | None
    #: (period, kind, currency) → currency units since the current day / month began
    period_cost: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    #: period → (start, end), unix s, of the current day / month in the tariff's zone
    period_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: (component key, item, currency) → currency units of running costs
    running_cost: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    #: currency → the node's running costs per hour (its items and its GPUs')
    running_cost_rate_per_hour: Mapping[str, float] = field(default_factory=dict)
    #: (period, provider, offering, currency) → the cloud price of the GPU-hours workloads held
    cloud_to_date: Mapping[tuple[str, str, str, str], float] = field(default_factory=dict)
    #: (gpu uuid, provider, offering, currency) → cloud price per GPU-hour of that GPU's model
    cloud_prices: Mapping[tuple[str, str, str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    source_kind: str  # "nvml" or "replay"
    #: False when the GPU source could not be opened (e.g. no driver): GPUs absent.
    source_up: bool
    source_error: str
    gpus: tuple[GpuState, ...]
    agent: AgentStats
    #: Host readings (:class:`agent.sources.host.HostSample`) or None.
    host: Any = None
    #: Host energy since the totals began, by (component, source). Units: J.
    host_energy: Mapping[tuple[str, str], float] = field(default_factory=dict)
    #: One line: which host power method is in use and why.
    host_description: str = ""
    #: Latest BMC reading (:class:`agent.sources.ipmi.DcmiReading`) and its age, or None.
    wall_power: Any = None
    replay: ReplayProgress | None = None
    cost: CostView | None = None
    #: Source time of the tick (trace time for a replay). Units: s since the epoch.
    t_wall: float | None = None
    #: GPU energy and cost split among workloads (:class:`agent.attribution.workloads.WorkloadRow`
    #: rows, built when first read); None when attribution is off.
    workloads: Sequence[Any] | None = None
