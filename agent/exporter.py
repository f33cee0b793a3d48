"""Prometheus exposition: a custom collector over the current snapshot, and the health verdict.

``collect()`` only reads the latest :class:`~agent.snapshot.Snapshot`; it never
calls NVML. A value that is ``None`` in the snapshot is not exported at all, so
a GPU that does not report something shows no series rather than a fake 0.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .exporter_workloads import workload_families
from .snapshot import Snapshot

log = logging.getLogger(__name__)

GPU_LABELS = ["gpu", "uuid"]

#: Clock event (throttle) reasons of nvmlDeviceGetCurrentClocksEventReasons, by bit.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def _nvml_binding_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:
        return "unknown"


class SnapshotCollector:
    """Renders whatever snapshot ``get_snapshot`` returns at scrape time."""

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self._get = get_snapshot
        self._binding = _nvml_binding_version()

    def describe(self) -> list[Metric]:
        # Registration must not trigger a collection (it would render a snapshot
        # that may not exist yet); the families are all built in collect().
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._get()
        yield from self._agent(snap)
        yield from self._gpus(snap)
        yield from self._host(snap)
        if snap.cost is not None:
            yield from self._cost(snap)
        yield from workload_families(snap)

    # -- agent ------------------------------------------------------------

    def _agent(self, snap: Snapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "gpucost_agent_info",
            "The agent and where its GPU data comes from (source: nvml = live GPUs, replay = a recorded trace).",
            labels=["version", "source"],
        )
        info.add_metric([__version__, snap.source_kind], 1)
        yield info
        build = GaugeMetricFamily(
            "gpucost_build_info",
            "Build of the agent: version, Python and nvidia-ml-py binding.",
            labels=["version", "python_version", "nvml_binding_version"],
        )
        build.add_metric([__version__, platform.python_version(), self._binding], 1)
        yield build
        up = GaugeMetricFamily(
            "gpucost_gpu_source_up",
            "1 if the GPU source (NVML or a trace) could be opened; 0 means no GPU can be read.",
            labels=["source"],
        )
        up.add_metric([snap.source_kind], 1 if snap.source_up else 0)
        yield up
        a = snap.agent
        if a.last_success_timestamp is not None:
            yield GaugeMetricFamily(
                "gpucost_agent_last_sample_timestamp_seconds",
                "Unix time at which the last sampling tick completed.",
                value=a.last_success_timestamp,
            )
        if a.last_duration_seconds is not None:
            yield GaugeMetricFamily(
                "gpucost_agent_sample_duration_seconds",
                "Wall time the last sampling tick took (all GPUs and the host).",
                value=a.last_duration_seconds,
            )
        if a.last_save_timestamp is not None:
            yield GaugeMetricFamily(
                "gpucost_state_last_save_timestamp_seconds",
                "Unix time at which the totals were last written to the state file.",
                value=a.last_save_timestamp,
            )
        yield CounterMetricFamily("gpucost_agent_ticks", "Sampling ticks completed.", value=a.ticks_total)
        yield CounterMetricFamily(
            "gpucost_agent_gpu_energy_reads",
            "Reads of the GPU hardware energy counters (each costs milliseconds of CPU).",
            value=a.energy_counter_reads_total,
        )
        errors = CounterMetricFamily("gpucost_agent_errors", "Errors by kind since the agent started.", labels=["kind"])
        for kind, n in sorted(a.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        if snap.replay is not None:
            r = snap.replay
            yield GaugeMetricFamily(
                "gpucost_replay_position_seconds", "How far the replay is into the trace.", value=r.position_seconds
            )
            yield GaugeMetricFamily(
                "gpucost_replay_duration_seconds", "Length of the replayed trace.", value=r.duration_seconds
            )
            yield GaugeMetricFamily(
                "gpucost_replay_progress_ratio",
                "Fraction of the trace replayed in the current loop (1 when a single replay has finished).",
                value=1.0 if r.finished else (r.position_seconds / r.duration_seconds if r.duration_seconds else 0.0),
            )
            yield CounterMetricFamily("gpucost_replay_loops", "Completed loops of the trace.", value=r.loops)

    # -- GPUs -------------------------------------------------------------

    def _gpus(self, snap: Snapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "gpucost_gpu_info",
            "Static facts about each GPU; value is always 1.",
            labels=GPU_LABELS + ["name", "pci_bus_id", "driver_version", "serial", "energy_method"],
        )
        up = GaugeMetricFamily("gpucost_gpu_up", "1 if the GPU answered on the last tick.", labels=GPU_LABELS)
        energy = CounterMetricFamily(
            "gpucost_gpu_energy_joules",
            "GPU energy since the totals began, by how it was measured "
            "(counter = hardware energy counter, samples = driver power samples, polled = estimate).",
            labels=GPU_LABELS + ["source"],
        )
        mem_total = GaugeMetricFamily("gpucost_gpu_memory_total_bytes", "GPU memory installed.", labels=GPU_LABELS)
        gauges = {
            "power_watts": GaugeMetricFamily(
                "gpucost_gpu_power_watts",
                "GPU power draw as the driver reports it (a ~1 s average on Hopper and later).",
                labels=GPU_LABELS,
            ),
            "utilization_gpu_ratio": GaugeMetricFamily(
                "gpucost_gpu_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran on the GPU.",
                labels=GPU_LABELS,
            ),
            "utilization_memory_ratio": GaugeMetricFamily(
                "gpucost_gpu_memory_utilization_ratio",
                "Fraction of the last sample period in which device memory was read or written.",
                labels=GPU_LABELS,
            ),
            "memory_used_bytes": GaugeMetricFamily(
                "gpucost_gpu_memory_used_bytes", "GPU memory in use.", labels=GPU_LABELS
            ),
            "temperature_celsius": GaugeMetricFamily(
                "gpucost_gpu_temperature_celsius", "GPU core temperature.", labels=GPU_LABELS
            ),
            "sm_clock_hertz": GaugeMetricFamily(
                "gpucost_gpu_sm_clock_hertz", "Current SM clock.", labels=GPU_LABELS
            ),
            "performance_state": GaugeMetricFamily(
                "gpucost_gpu_performance_state", "Current performance state (0 = P0, fastest).", labels=GPU_LABELS
            ),
            "power_limit_watts": GaugeMetricFamily(
                "gpucost_gpu_power_limit_watts", "Enforced power limit.", labels=GPU_LABELS
            ),
        }
        events = GaugeMetricFamily(
            "gpucost_gpu_clock_event_active",
            "1 if this clock event (throttle) reason is active on the GPU.",
            labels=GPU_LABELS + ["reason"],
        )
        stale = GaugeMetricFamily(
            "gpucost_gpu_energy_estimated",
            "1 while this GPU's energy, normally from its hardware energy counter, is estimated from polled "
            "power (source=\"polled\") because the counter stopped answering. GPUs measured by the counter only.",
            labels=GPU_LABELS,
        )
        for g in snap.gpus:
            d = g.info
            labels = [str(d.index), d.uuid]
            info.add_metric(labels + [d.name, d.pci_bus_id, d.driver_version, d.serial, g.energy_method], 1)
            up.add_metric(labels, 1 if g.up else 0)
            if g.energy_method == "counter":
                stale.add_metric(labels, 1 if g.energy_counter_stale else 0)
            for source, joules in sorted(g.energy_joules.items()):
                energy.add_metric(labels + [source], joules)
            if d.memory_total_bytes is not None:
                mem_total.add_metric(labels, d.memory_total_bytes)
            r = g.reading
            if r is None or not g.up:
                continue  # a lost GPU exports no stale readings
            for attr, fam in gauges.items():
                value = getattr(r, attr)
                if value is not None:
                    fam.add_metric(labels, value)
            if r.clock_event_reasons is not None:
                for bit, reason in CLOCK_EVENT_REASONS.items():
                    events.add_metric(labels + [reason], 1 if r.clock_event_reasons & bit else 0)
        yield info
        yield up
        yield stale
        yield energy
        yield mem_total
        yield from gauges.values()
        yield events

    # -- host -------------------------------------------------------------

    def _host(self, snap: Snapshot) -> Iterator[Metric]:
        h = snap.host
        if h is not None:
            yield GaugeMetricFamily(
                "gpucost_host_cpu_utilization_ratio", "Host CPU utilisation.", value=h.cpu_util_ratio
            )
            yield GaugeMetricFamily("gpucost_host_memory_used_bytes", "Host memory in use.", value=h.mem_used_bytes)
            yield GaugeMetricFamily(
                "gpucost_host_memory_total_bytes", "Host memory installed.", value=h.mem_total_bytes
            )
            power = GaugeMetricFamily(
                "gpucost_host_power_watts",
                "Host power by component (cpu, dram, platform) and source "
                "(rapl = measured, model = estimated from utilisation, static = configured).",
                labels=["component", "source"],
            )
            watts: dict[tuple[str, str], float] = {}
            for c in h.components:
                watts[(c.component, c.source)] = watts.get((c.component, c.source), 0.0) + c.watts
            if not h.baseline:  # RAPL has no power before its first interval
                for (component, source), w in sorted(watts.items()):
                    power.add_metric([component, source], w)
            yield power
            if snap.host_description:
                info = GaugeMetricFamily(
                    "gpucost_host_power_info",
                    "How host power is obtained; value 1. 'method' is rapl or model, 'detail' says why.",
                    labels=["method", "detail"],
                )
                method = "rapl" if any(c.source == "rapl" for c in h.components) else "model"
                info.add_metric([method, snap.host_description], 1)
                yield info
        if snap.host_energy:
            energy = CounterMetricFamily(
                "gpucost_host_energy_joules",
                "Host energy since the totals began, by component and source.",
                labels=["component", "source"],
            )
            for (component, source), j in sorted(snap.host_energy.items()):
                energy.add_metric([component, source], j)
            yield energy
        w = snap.wall_power
        if w is not None:
            wall = GaugeMetricFamily(
                "gpucost_node_wall_power_watts",
                "Whole-node input power measured by the BMC (IPMI DCMI): includes PSU losses and fans.",
                labels=["source"],
            )
            wall.add_metric(["dcmi"], w.watts)
            yield wall


    # -- cost -------------------------------------------------------------

    def _cost(self, snap: Snapshot) -> Iterator[Metric]:
        c = snap.cost
        assert c is not None
        now = c.now
        index_of = {g.info.uuid: str(g.info.index) for g in snap.gpus}

        def component_labels(key: str) -> list[str] | None:
            """[component, gpu, uuid] for a ledger key; None for a GPU not present now."""
            if key.startswith("gpu:"):
                uuid = key[4:]
                return ["gpu", index_of[uuid], uuid] if uuid in index_of else None
            return [key, "", ""]

        comp = ["component", "gpu", "uuid"]
        if now.price_per_kwh is not None:
            price = GaugeMetricFamily(
                "gpucost_energy_price_per_kwh",
                "Energy price in force now, per kWh of facility energy, with its tariff band.",
                labels=["currency", "band"],
            )
            price.add_metric([now.currency, now.band or ""], now.price_per_kwh)
            yield price
        yield GaugeMetricFamily("gpucost_pue_ratio", "Power usage effectiveness in force now.", value=now.pue)
        if now.grams_per_kwh is not None:
            yield GaugeMetricFamily(
                "gpucost_grid_carbon_intensity_grams_per_kwh",
                "Grid carbon intensity in force now. Units: g CO2e per kWh.",
                value=now.grams_per_kwh,
            )
        if c.it_power_watts is not None:
            yield GaugeMetricFamily(
                "gpucost_node_it_power_watts", "Node IT power now: GPUs + host (or the BMC wall reading).",
                value=c.it_power_watts,
            )
        if c.facility_power_watts is not None:
            yield GaugeMetricFamily(
                "gpucost_node_facility_power_watts", "Node facility power now: IT power × PUE.",
                value=c.facility_power_watts,
            )
        def by_component(name: str, doc: str, totals: Mapping[Any, float], currency: bool = False) -> Metric:
            """A counter family from ledger totals keyed by component (and currency)."""
            fam = CounterMetricFamily(name, doc, labels=comp + (["currency"] if currency else []))
            for k, v in sorted(totals.items()):
                key, extra = (k[0], [k[1]]) if currency else (k, [])
                labels = component_labels(key)
                if labels is not None:
                    fam.add_metric(labels + extra, v)
            return fam

        yield by_component(
            "gpucost_node_it_energy_joules", "IT energy since the totals began, by component.", c.it_energy_joules
        )
        yield by_component(
            "gpucost_node_facility_energy_joules",
            "Facility energy (IT energy × PUE in force when it was used) since the totals began, by component.",
            c.facility_energy_joules,
        )
        if now.currency is not None:
            yield by_component(
                "gpucost_energy_cost",
                "Cost of facility energy since the totals began, by component, in currency units.",
                c.energy_cost,
                currency=True,
            )
            idle = CounterMetricFamily(
                "gpucost_gpu_idle_cost",
                "Energy cost spent while the GPU's utilisation was below the idle threshold.",
                labels=GPU_LABELS + ["currency"],
            )
            for (key, cur), v in sorted(c.idle_cost.items()):
                labels = component_labels(key)
                if labels is not None:
                    idle.add_metric(labels[1:] + [cur], v)
            yield idle
        if c.period_cost:
            to_date = GaugeMetricFamily(
                "gpucost_cost_to_date",
                "Cost since the current day or month began (in the tariff's time zone), "
                "by kind: energy, hardware (amortisation) or running (running costs). Resets when the period ends.",
                labels=["period", "kind", "currency"],
            )
            for (period, kind, cur), v in sorted(c.period_cost.items()):
                to_date.add_metric([period, kind, cur], v)
            yield to_date
        if c.period_bounds:
            # The calendar of gpucost_cost_to_date, for rules: PromQL's date functions are UTC, so
            # a rule cannot tell when a month in the tariff's zone ends (issue 18).
            start = GaugeMetricFamily(
                "gpucost_period_start_timestamp_seconds",
                "Unix time at which the current day or month of gpucost_cost_to_date began (midnight in the "
                "tariff's time zone; UTC without a tariff).",
                labels=["period"],
            )
            end = GaugeMetricFamily(
                "gpucost_period_end_timestamp_seconds",
                "Unix time at which the current day or month of gpucost_cost_to_date ends and its totals restart "
                "(the next midnight, or the next 1st, in the tariff's time zone; UTC without a tariff).",
                labels=["period"],
            )
            for period, (t0, t1) in sorted(c.period_bounds.items()):
                start.add_metric([period], t0)
                end.add_metric([period], t1)
            yield start
            yield end
        if c.energy_cost_rate_per_hour is not None or c.hardware_cost_rate_per_hour is not None \
                or c.running_cost_rate_per_hour:
            rate = GaugeMetricFamily(
                "gpucost_node_cost_rate_per_hour",
                "What the node costs per hour at this moment: energy (at current power, PUE and price), "
                "hardware amortisation and running costs.",
                labels=["kind", "currency"],
            )
            if c.energy_cost_rate_per_hour is not None:
                rate.add_metric(["energy", now.currency], c.energy_cost_rate_per_hour)
            if c.hardware_cost_rate_per_hour is not None:
                rate.add_metric(["hardware", c.hardware_currency], c.hardware_cost_rate_per_hour)
            for cur, per_hour in sorted(c.running_cost_rate_per_hour.items()):
                rate.add_metric(["running", cur], per_hour)
            yield rate
        if c.running_cost:
            running = CounterMetricFamily(
                "gpucost_running_cost",
                "Running costs ([[running_costs]]: colocation, network, support, licences, staff) accrued for the "
                "time the agent ran, by component and item.",
                labels=comp + ["item", "currency"],
            )
            for (key, item, cur), v in sorted(c.running_cost.items()):
                labels = component_labels(key)
                if labels is not None:
                    running.add_metric(labels + [item, cur], v)
            yield running
        if c.cloud_prices:
            cloud = GaugeMetricFamily(
                "gpucost_cloud_price_per_gpu_hour",
                "What renting a GPU of this GPU's model costs per hour in a cloud ([[cloud_prices]], configured, "
                "never fetched).",
                labels=GPU_LABELS + ["provider", "offering", "currency"],
            )
            for (uuid, provider, offering, cur), v in sorted(c.cloud_prices.items()):
                if uuid in index_of:
                    cloud.add_metric([index_of[uuid], uuid, provider, offering, cur], v)
            yield cloud
        if c.cloud_to_date:
            rented = GaugeMetricFamily(
                "gpucost_cloud_cost_to_date",
                "What renting this node's GPUs at each cloud price would have cost for the hours workloads held "
                "them, since the current day or month began (tariff's time zone). Resets when the period ends.",
                labels=["period", "provider", "offering", "currency"],
            )
            for (period, provider, offering, cur), v in sorted(c.cloud_to_date.items()):
                rented.add_metric([period, provider, offering, cur], v)
            yield rented
        if c.hardware_cost:
            yield by_component(
                "gpucost_hardware_cost",
                "Straight-line amortisation of purchase prices for the time the agent ran, by component.",
                c.hardware_cost,
                currency=True,
            )
        if now.grams_per_kwh is not None or c.emissions_grams:
            yield by_component(
                "gpucost_emissions_grams",
                "Emissions of facility energy since the totals began, by component. Units: g CO2e.",
                c.emissions_grams,
            )
        if c.demand_peak_watts is not None:
            yield GaugeMetricFamily(
                "gpucost_demand_peak_watts",
                "Highest window-average facility power of the current month (resets monthly).",
                value=c.demand_peak_watts,
            )
        if c.demand_charge is not None and now.currency is not None:
            dc = GaugeMetricFamily(
                "gpucost_demand_charge",
                "Demand charge of the current month so far: peak kW × price per kW (resets monthly).",
                labels=["currency"],
            )
            dc.add_metric([now.currency], c.demand_charge)
            yield dc


def make_registry(get_snapshot: Callable[[], Snapshot], *, process_metrics: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot))  # type: ignore[arg-type]
    if process_metrics:
        # The agent's own CPU and memory (process_cpu_seconds_total, ...): it
        # must never be the problem on the node, and this is how you see it.
        ProcessCollector(registry=registry)
    return registry


def health_of(
    snap: Snapshot, tick_seconds: float, mono_now: float | None = None, persist_error: str | None = None
) -> tuple[bool, dict[str, Any]]:
    """Healthy while ticks keep completing. A node without readable GPUs, or whose
    totals could not be persisted (``persist_error``), is ``degraded`` but still
    healthy: the agent keeps serving host and agent metrics."""
    a = snap.agent
    # Age on the monotonic clock: a wall-clock step neither ages nor rejuvenates a sample.
    now = time.monotonic() if mono_now is None else mono_now
    age = None if a.last_success_monotonic is None else now - a.last_success_monotonic
    finished = snap.replay is not None and snap.replay.finished
    stale = age is None or (age > max(3 * tick_seconds, 5.0) and not finished)
    counter_stale = [g.info.index for g in snap.gpus if g.energy_counter_stale]
    degraded = not snap.source_up or not all(g.up for g in snap.gpus) or persist_error is not None \
        or bool(counter_stale)
    status = "stale" if stale else ("degraded" if degraded else "ok")
    body: dict[str, Any] = {
        "status": status,
        "source": snap.source_kind,
        "gpus": len(snap.gpus),
        "gpus_up": sum(1 for g in snap.gpus if g.up),
        "last_sample_age_seconds": None if age is None else round(age, 3),
    }
    if snap.source_error:
        body["error"] = snap.source_error
    if persist_error is not None:
        body["state_error"] = persist_error
    if counter_stale:
        body["energy_counter_stale"] = counter_stale
    if finished:
        body["replay"] = "finished"
    return not stale, body
