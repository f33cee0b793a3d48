"""One sampling tick: read the sources, account energy, publish a snapshot.

A tick runs on the scheduler's thread. It never raises: a failing GPU is
marked down and counted under ``errors{kind=...}``, and the rest of the node
is still sampled and served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

from .accounting import Ledger
from .energy import GpuEnergy
from .snapshot import AgentStats, CostView, GpuState, ReplayProgress, Snapshot
from .sources.gpu import GpuError, GpuLost, GpuNotSupported, GpuReading, GpuSource

log = logging.getLogger(__name__)

#: Every kind of ``gpucost_agent_errors_total``: exported from the first scrape at 0,
#: so an alert on ``increase()`` sees the first error of each kind.
ERROR_KINDS = (
    "gpu_lost", "gpu_read", "energy_counter", "energy_counter_stale", "counter_reset",
    "power_samples", "samples_gap", "invalid_energy", "tick_skipped", "tick_exception", "host_read", "dcmi",
    "state_write", "process_read",
)

#: The energy sources a GPU's total can have for each method: its own and the polled fallback.
_FALLBACK_SOURCES = {"counter": ("counter", "polled"), "samples": ("samples", "polled"), "polled": ("polled",)}

#: How often the driver's power-sample buffer is read when the tick is longer (s). The
#: buffer holds ~2.4 s on H100 (119 samples, one per 20 ms); one read costs 0.39 ms of CPU.
SAMPLES_POLL_SECONDS = 1.0

#: (wall seconds since the epoch, monotonic seconds) of "now" in the source's time.
Clock = Callable[[], tuple[float, float]]


def system_clock() -> tuple[float, float]:
    return time.time(), time.monotonic()


class Sampler:
    """Owns the per-GPU energy accounting and the current snapshot."""

    def __init__(
        self,
        source: GpuSource | None,
        *,
        clock: Clock = system_clock,
        energy_method: str = "auto",
        counter_interval: float = 5.0,
        tick_seconds: float = 1.0,
        ledger: Ledger | None = None,
        host: Any = None,
        source_kind: str = "nvml",
        source_error: str = "",
        wall_cost_basis: bool = False,
        attribution: Any = None,
    ) -> None:
        self.source = source
        self.clock = clock
        #: The nominal tick (s; trace seconds in a replay).
        self.tick_seconds = tick_seconds
        self.ledger = ledger or Ledger()
        self.ledger.on_error = self._count
        self.host = host
        self.source_kind = source.kind if source is not None else source_kind
        self.source_error = source_error
        self.errors: Counter[str] = Counter()
        self.ticks = 0
        self.counter_reads = 0
        self._lock = threading.Lock()  # one tick at a time, whoever calls it
        self._last_success: float | None = None
        self._last_success_mono: float | None = None
        self._last_duration: float | None = None
        self.devices = list(source.devices()) if source is not None else []
        self.ledger.gpu_uuids = {d.index: d.uuid for d in self.devices}
        self.ledger.gpu_names = {d.index: d.name for d in self.devices}
        #: Cost from the BMC's wall reading ([host.ipmi] cost_basis = "wall") when one is fresh.
        self.wall_cost_basis = wall_cost_basis
        self._prev_wall: float | None = None
        self._prev_mono: float | None = None
        self._up = {d.index: True for d in self.devices}
        self._readings: dict[int, GpuReading | None] = {}
        self._host_sample: Any = None
        self._host_desc_key: tuple[Any, Any] | None = None
        self._host_desc = ""
        #: Latest BMC wall-power reading (set by the service's DCMI job), if any.
        self.wall_power: Any = None
        #: Real Unix time of the last successful write of the totals (set by the service).
        self.last_save_timestamp: float | None = None
        self._energy: dict[int, GpuEnergy] = {}
        for d in self.devices:
            method = self._choose_method(d.index, energy_method)
            self._energy[d.index] = GpuEnergy(
                d.index,
                method,
                counter_interval=counter_interval,
                tick_seconds=tick_seconds,
                max_watts=d.power_limit_watts,
                on_event=self._count,
            )
            log.info("GPU %d (%s, %s): energy from %s", d.index, d.name, d.uuid, _METHOD_TEXT[method])
        #: The stage that splits each GPU slice among workloads (agent.attribution.split.Attributor), or None.
        self.attribution = attribution
        if attribution is not None:
            attribution.bind(self.devices, self._count)
        self._open_accounts()
        self.snapshot = self._build(None)

    def _open_accounts(self) -> None:
        self.ledger.open_accounts(
            {d.uuid: _FALLBACK_SOURCES[self._energy[d.index].method] for d in self.devices},
            host=self.host is not None,
            other=self.wall_cost_basis,
        )

    def reconfigure(self, settings: Any) -> None:
        """New prices, PUE, carbon, hardware and idle threshold (SIGHUP) from this moment.

        Energy pending in an open counter interval is settled first, at the
        prices under which it was used; nothing already counted is re-priced.
        """
        if self.source is not None:
            self.tick(final=True)
        with self._lock:
            self.ledger.reconfigure(settings)
            self._open_accounts()
            self.snapshot = self._build(self.snapshot.t_wall)

    def _count(self, kind: str) -> None:
        self.errors[kind] += 1

    def _choose_method(self, index: int, wanted: str) -> str:
        """Best method the GPU supports, never better than ``wanted``."""
        order = ["counter", "samples", "polled"]
        start = 0 if wanted == "auto" else order.index(wanted)
        for method in order[start:]:
            try:
                if method == "counter":
                    self.source.energy_mj(index)  # type: ignore[union-attr]
                elif method == "samples":
                    self.source.power_samples(index, 0)  # type: ignore[union-attr]
                return method
            except GpuNotSupported:
                if wanted == method:
                    log.warning("GPU %d: energy method %r is not supported; falling back", index, method)
            except GpuError as exc:
                # Supported but failing right now: keep the method, it may recover.
                log.warning("GPU %d: %s read failed at start: %s", index, method, exc)
                return method
        return "polled"

    def energy_method(self, index: int) -> str:
        return self._energy[index].method

    @property
    def samples_poll_seconds(self) -> float | None:
        """How often :meth:`poll_samples` must run besides the tick (None: never needed).

        Only GPUs measured from the sample buffer need it, and only when the tick
        itself reads the buffer less often than every ``SAMPLES_POLL_SECONDS``.
        """
        if self.tick_seconds <= SAMPLES_POLL_SECONDS or not any(a.method == "samples" for a in self._energy.values()):
            return None
        return SAMPLES_POLL_SECONDS

    def poll_samples(self) -> None:
        """Read the power-sample buffer of the GPUs measured from it, between ticks.

        With a tick longer than the buffer (~2.4 s on H100) samples would be
        lost before the tick reads them. The samples are integrated now and
        settled into slices by the next tick. Only the buffer is read (no other
        NVML call); a GPU that is down is left alone. Never raises.
        """
        with self._lock:
            for index, acc in self._energy.items():
                if acc.method != "samples" or not self._up.get(index):
                    continue
                try:
                    acc.add_samples(self.source.power_samples(index, acc.samples_since_us))  # type: ignore[union-attr]
                except GpuError as exc:
                    self._count("power_samples")
                    log.debug("GPU %d: power samples failed: %s", index, exc)
                except Exception as exc:  # a poll must never take the schedule down
                    self._count("power_samples")
                    log.warning("GPU %d: power-sample poll failed: %r", index, exc)

    # -- the tick ---------------------------------------------------------

    def tick(self, *, final: bool = False) -> Snapshot:
        """Sample every source once. ``final`` forces a counter read (shutdown, end of replay)."""
        with self._lock:
            started = time.perf_counter()
            wall, mono = self.clock()
            # Close the counter interval on the tick that crosses a price, PUE or
            # carbon boundary, so energy on each side is exact, not apportioned.
            # Durations come from the monotonic clock; the wall clock only places
            # them (tariff bands, samples). A wall step (NTP, VM resume) moves
            # where a tick lands, never how long it lasted.
            t0 = None
            if self._prev_mono is not None and mono >= self._prev_mono:
                t0 = wall - (mono - self._prev_mono)
                step = t0 - self._prev_wall  # type: ignore[operator]
                if abs(step) > 1.0:
                    log.warning("wall clock stepped by %+.1f s; durations and amortisation keep the monotonic "
                                "clock, energy is priced at the new wall time", step)
            boundary = t0 is not None and self.ledger.crosses_boundary(t0, wall)
            self.ledger.roll_periods(wall)
            for d in self.devices:
                self._tick_gpu(d.index, wall, mono, final or boundary)
            if self.host is not None:
                self._tick_host(wall, mono)
            if t0 is not None and wall > t0:
                self.ledger.accrue_hardware(t0, wall)
                self._account_wall_remainder(t0, wall)
            self._prev_wall, self._prev_mono = wall, mono
            self.ticks += 1
            self._last_duration = time.perf_counter() - started
            self._last_success = time.time()
            self._last_success_mono = time.monotonic()
            self.snapshot = self._build(wall)
            return self.snapshot

    def it_power_watts(self) -> float | None:
        """GPUs + host right now, from the latest readings. Units: W."""
        watts = [r.power_watts for i, r in self._readings.items() if r is not None and r.power_watts is not None]
        host = self._host_sample
        if host is not None and not host.baseline:
            watts.append(host.watts)
        return sum(watts) if watts else None

    def _account_wall_remainder(self, t0: float, t1: float) -> None:
        """With cost from the wall meter: price what the BMC sees beyond GPUs + host."""
        w = self.wall_power
        if not self.wall_cost_basis or w is None:
            return
        components = self.it_power_watts() or 0.0
        self.ledger.add_other(t0, t1, max(0.0, w.watts - components) * (t1 - t0))

    def saved(self, t: float) -> None:
        """The totals were written at real time ``t``: shown from now on, not only from the next tick."""
        with self._lock:
            self.last_save_timestamp = t
            snap = self.snapshot
            self.snapshot = replace(snap, agent=replace(snap.agent, last_save_timestamp=t))

    def state(self) -> dict[str, Any]:
        """The ledger's totals, consistent (taken between two ticks), for persisting."""
        with self._lock:
            return self.ledger.state()

    def _host_description(self) -> str:
        """The host source's one-line description, re-formatted only when its mode changes."""
        if self.host is None:
            return ""
        key = (getattr(self.host, "mode", None), getattr(self.host, "reason", None))
        if key != self._host_desc_key:
            self._host_desc_key, self._host_desc = key, self.host.describe()
        return self._host_desc

    def _tick_host(self, wall: float, mono: float) -> None:
        try:
            sample = self.host.read(mono)  # type: ignore[union-attr]
        except Exception as exc:  # host readings must never stop GPU sampling
            self._count("host_read")
            log.warning("host read failed: %s", exc)
            return
        prev = self._host_sample
        if prev is None:
            for c in sample.components:
                self.ledger.open_host_component(c.component, c.source)
        if prev is not None and not sample.baseline:
            dt = mono - prev.t_mono
            for c in sample.components:
                self.ledger.add_host(c.component, c.source, wall - dt, wall, c.joules)
        self._host_sample = sample

    def _tick_gpu(self, index: int, wall: float, mono: float, final: bool) -> None:
        src = self.source
        assert src is not None
        acc = self._energy[index]
        try:
            reading = src.read(index)
        except GpuLost as exc:
            if self._up[index]:
                log.error("GPU %d lost: %s", index, exc)
            self._up[index] = False
            self._readings[index] = None
            self._count("gpu_lost")
            return
        except GpuError as exc:
            self._count(exc.kind)
            reading = GpuReading(failed=("all",))
        if not self._up[index]:
            log.warning("GPU %d answers again", index)
        self._up[index] = True
        self._readings[index] = reading
        for _ in reading.failed:
            self._count("gpu_read")
        counter = samples = None
        if acc.counter_due(mono) or (final and acc.method == "counter"):
            try:
                counter = src.energy_mj(index)
                self.counter_reads += 1
            except GpuError as exc:
                self._count("energy_counter")
                log.debug("GPU %d: counter read failed: %s", index, exc)
        elif acc.method == "samples":
            try:
                samples = src.power_samples(index, acc.samples_since_us)
            except GpuError as exc:
                self._count("power_samples")
                log.debug("GPU %d: power samples failed: %s", index, exc)
        slices = acc.tick(mono, wall, reading.power_watts, reading.utilization_gpu_ratio, counter, samples)
        if self.attribution is None:
            self.ledger.add(slices)
            return
        self.attribution.observe(index, wall, reading, src)
        self.attribution.account(index, self.ledger.add(slices), self.ledger.cost.currency)

    def _build(self, wall: float | None) -> Snapshot:
        gpus = tuple(
            GpuState(
                info=d,
                up=self._up[d.index],
                reading=self._readings.get(d.index),
                energy_method=self._energy[d.index].method,
                energy_joules=self.ledger.gpu_energy_by_source(d.uuid),
            )
            for d in self.devices
        )
        replay = None
        src = self.source
        if src is not None and src.kind == "replay":
            replay = ReplayProgress(
                position_seconds=src.position_seconds,  # type: ignore[attr-defined]
                duration_seconds=src.duration_seconds,  # type: ignore[attr-defined]
                loops=src.loops,  # type: ignore[attr-defined]
                finished=src.finished,  # type: ignore[attr-defined]
            )
        return Snapshot(
            source_kind=self.source_kind,
            source_up=self.source is not None,
            source_error=self.source_error,
            gpus=gpus,
            agent=AgentStats(
                last_success_timestamp=self._last_success,
                last_success_monotonic=self._last_success_mono,
                last_duration_seconds=self._last_duration,
                ticks_total=self.ticks,
                errors={**dict.fromkeys(ERROR_KINDS, 0), **self.errors},
                energy_counter_reads_total=self.counter_reads,
                last_save_timestamp=self.last_save_timestamp,
            ),
            host=self._host_sample,
            host_energy=dict(self.ledger.host_energy),
            host_description=self._host_description(),
            wall_power=self.wall_power,
            cost=self._cost_view(wall),
            replay=replay,
            t_wall=wall,
            workloads=self.ledger.workloads.rows() if self.attribution is not None else None,
        )


    def _cost_view(self, wall: float | None) -> CostView:
        led = self.ledger
        now = led.price_now(wall if wall is not None else time.time())
        it_w = self.it_power_watts()
        if self.wall_cost_basis and self.wall_power is not None:
            it_w = max(it_w or 0.0, self.wall_power.watts)
        fac_w = it_w * now.pue if it_w is not None else None
        energy_rate = fac_w / 1000.0 * now.price_per_kwh if (fac_w is not None and now.price_per_kwh is not None) else None
        d = led.demand
        return CostView(
            now=now,
            it_power_watts=it_w,
            facility_power_watts=fac_w,
            energy_cost_rate_per_hour=energy_rate,
            hardware_cost_rate_per_hour=led.hardware_rate_per_hour(),
            hardware_currency=led.hardware_currency,
            it_energy_joules=dict(led.it_energy),
            facility_energy_joules=dict(led.facility_energy),
            energy_cost=dict(led.energy_cost),
            idle_cost=dict(led.idle_cost),
            hardware_cost=dict(led.hardware_cost),
            emissions_grams=dict(led.emissions),
            period_cost=dict(led.period_cost),
            demand_peak_watts=d.peak_w if d is not None and d.month is not None else None,
            demand_charge=d.demand_charge if d is not None and d.month is not None else None,
        )


_METHOD_TEXT = {
    "counter": "the hardware energy counter",
    "samples": "the driver's power-sample buffer (no energy counter)",
    "polled": "polled power (estimate: no counter, no sample buffer)",
}
