"""One sampling tick: read the sources, account energy, publish a snapshot.

A tick runs on the scheduler's thread. It never raises: a failing GPU is
marked down and counted under ``errors{kind=...}``, and the rest of the node
is still sampled and served.

Each tick first fetches (the GPU calls, on a worker thread with a deadline,
see :mod:`agent.gpucalls`) and then accounts (on the tick's thread). A GPU
whose call hangs is marked down and skipped until that call returns; a GPU
that is lost is re-acquired with back-off. Either way its energy stays exact
where the hardware allows: the first counter read after it answers again
covers the whole gap.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Sequence

from .accounting import Ledger
from .energy import GpuEnergy
from .gpucalls import GpuCalls
from .snapshot import AgentStats, CostView, GpuState, ReplayProgress, Snapshot
from .sources.gpu import GpuError, GpuInfo, GpuLost, GpuNotSupported, GpuReading, GpuSource, PowerSample
from .sources.host import RaplMark
from .statecheck import number

log = logging.getLogger(__name__)

#: How often the host's power is read (s): a per-second read is ~40 % of a 1-GPU tick's CPU,
#: and the energy is the same at any cadence (see Sampler._host_due).
HOST_READ_SECONDS = 5.0

#: Every kind of ``gpucost_agent_errors_total``: exported from the first scrape at 0,
#: so an alert on ``increase()`` sees the first error of each kind.
ERROR_KINDS = (
    "gpu_lost", "gpu_timeout", "gpu_read", "energy_counter", "energy_counter_stale", "counter_reset",
    "power_samples", "samples_gap", "invalid_energy", "tick_skipped", "tick_exception", "host_read", "dcmi",
    "state_write", "process_read",
)

#: The energy sources a GPU's total can have for each method: its own and the polled fallback.
_FALLBACK_SOURCES = {"counter": ("counter", "polled"), "samples": ("samples", "polled"), "polled": ("polled",)}

#: How often the driver's power-sample buffer is read when the tick is longer (s). The
#: buffer holds ~2.4 s on H100 (119 samples, one per 20 ms); one read costs 0.39 ms of CPU.
SAMPLES_POLL_SECONDS = 1.0

#: A GPU call still running after this long marks its GPU as not answering (``gpu_timeout``)
#: until it returns. Healthy calls take microseconds (the energy counter 2.9 ms on H100). Units: s.
GPU_CALL_DEADLINE_SECONDS = 1.0
#: Most time a tick spends starting GPU calls; GPUs not reached by then are read on the
#: next tick. A tick (and so the final save at shutdown) waits at most this plus the deadline.
GPU_TICK_BUDGET_SECONDS = 2.0
#: Re-acquiring a lost GPU: first retry after this long, doubling up to the cap. Units: s.
LOST_RETRY_FIRST_SECONDS = 1.0
LOST_RETRY_MAX_SECONDS = 60.0

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
        counter_interval: float = 15.0,
        tick_seconds: float = 1.0,
        ledger: Ledger | None = None,
        host: Any = None,
        source_kind: str = "nvml",
        source_error: str = "",
        wall_cost_basis: bool = False,
        attribution: Any = None,
        methods: dict[int, str] | None = None,
    ) -> None:
        """``methods`` (GPU index -> energy method) when already probed (see :func:`probe_methods`)."""
        self.source = source
        self.clock = clock
        #: The nominal tick (s; trace seconds in a replay).
        self.tick_seconds = tick_seconds
        self.counter_interval = counter_interval
        self.ledger = ledger or Ledger()
        self.ledger.on_error = self.count
        self.host = host
        self.source_kind = source.kind if source is not None else source_kind
        self.source_error = source_error
        self.errors: Counter[str] = Counter()
        self._errors_lock = threading.Lock()
        self.ticks = 0
        self.counter_reads = 0
        self._lock = threading.Lock()  # one tick at a time, whoever calls it
        self._calls = GpuCalls(GPU_CALL_DEADLINE_SECONDS)
        self._last_success: float | None = None
        self._last_success_mono: float | None = None
        self._last_duration: float | None = None
        #: Cost from the BMC's wall reading ([host.ipmi] cost_basis = "wall") when one is fresh.
        self.wall_cost_basis = wall_cost_basis
        self._prev_wall: float | None = None
        self._prev_mono: float | None = None
        self._readings: dict[int, GpuReading | None] = {}
        #: Lost GPUs: index -> (monotonic time of the next re-acquire, current back-off in s).
        self._lost: dict[int, tuple[float, float]] = {}
        self._host_sample: Any = None
        self._host_desc_key: tuple[Any, Any] | None = None
        self._host_desc = ""
        #: Latest BMC wall-power reading (set by the service's DCMI job), if any.
        self.wall_power: Any = None
        #: Real Unix time of the last successful write of the totals (set by the service).
        self.last_save_timestamp: float | None = None
        self.devices: list[GpuInfo] = []
        #: GPU UUID -> (counter mJ, monotonic s) the loaded totals end at (see resume_counters).
        self._resume_marks: dict[str, tuple[int, float, float]] = {}
        #: Monotonic time the loaded hardware amortisation ends at (same boot), or None.
        self._resume_mono: float | None = None
        self._up: dict[int, bool] = {}
        self._energy: dict[int, GpuEnergy] = {}
        #: The stage that splits each GPU slice among workloads (agent.attribution.split.Attributor), or None.
        self.attribution = attribution
        if source is not None:
            self._install(source, methods if methods is not None else probe_methods(source, energy_method))
            if attribution is not None:
                attribution.bind(self.devices, self.count)
        self._open_accounts()
        self.snapshot = self._build(None)

    def _install(self, source: GpuSource, methods: dict[int, str]) -> None:
        self.devices = list(source.devices())
        self.ledger.gpu_uuids = {d.index: d.uuid for d in self.devices}
        self.ledger.gpu_names = {d.index: d.name for d in self.devices}
        self._up = {d.index: True for d in self.devices}
        self._energy = {}
        for d in self.devices:
            method = methods.get(d.index, "polled")
            self._energy[d.index] = GpuEnergy(
                d.index,
                method,
                counter_interval=self.counter_interval,
                tick_seconds=self.tick_seconds,
                max_watts=d.power_limit_watts,
                on_event=self.count,
            )
            log.info("GPU %d (%s, %s): energy from %s", d.index, d.name, d.uuid, _METHOD_TEXT[method])
            self._resume(d)

    def _resume(self, d: GpuInfo) -> None:
        """Hand GPU ``d`` the counter reading the loaded totals end at, if it has one."""
        mark = self._resume_marks.get(d.uuid)
        if mark is not None and self._energy[d.index].method == "counter":
            self._energy[d.index].resume(*mark)

    def attach(self, source: GpuSource, methods: dict[int, str]) -> None:
        """A GPU source that could not be opened at start (NVML init failed) opened now:
        its GPUs are sampled from the next tick on, their totals continuing by UUID."""
        with self._lock:
            self.source = source
            self.source_kind = source.kind
            self.source_error = ""
            self._install(source, methods)
            if self.attribution is not None:
                self.attribution.bind(self.devices, self.count)
            self._open_accounts()
            self.snapshot = self._build(self.snapshot.t_wall)

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

    def count(self, kind: str, n: int = 1) -> None:
        """Count ``n`` errors of ``kind``: from the tick's thread, the GPU worker, the scheduler's
        jobs and the ticker, so under a lock (``+=`` on a Counter is not atomic across threads)."""
        with self._errors_lock:
            self.errors[kind] += n

    def errors_now(self) -> dict[str, int]:
        """Every error kind's count, the known kinds at 0 included (a copy, taken under the lock)."""
        with self._errors_lock:
            return {**dict.fromkeys(ERROR_KINDS, 0), **self.errors}

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
        NVML call); a GPU that is down or not answering is left alone, and a
        call that hangs now is given up after the deadline. Never raises.
        """
        with self._lock:
            src = self.source
            jobs = [(i, partial(src.power_samples, i, acc.samples_since_us))  # type: ignore[union-attr]
                    for i, acc in self._energy.items() if acc.method == "samples" and self._up.get(i)]
            if not jobs:
                return
            results, timed_out, _ = self._calls.run(jobs, GPU_TICK_BUDGET_SECONDS)
            self._not_answering(timed_out)
            for index, (ok, value) in results.items():
                if ok:
                    self._energy[index].add_samples(value)
                    continue
                self.count("power_samples")
                if isinstance(value, GpuError):
                    log.debug("GPU %d: power samples failed: %s", index, value)
                else:  # a poll must never take the schedule down
                    log.warning("GPU %d: power-sample poll failed: %r", index, value)

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
            if self._prev_mono is None and self._resume_mono is not None and mono > self._resume_mono:
                # First tick after a restart on the same boot: the hardware cost of the time no
                # agent ran is accrued now (it costs the same whether anyone watches or not).
                gap = mono - self._resume_mono
                log.info("hardware amortisation of the %.1f s the agent was not running accrued", gap)
                self._prev_mono, self._prev_wall = self._resume_mono, wall - gap
            self._resume_mono = None
            if self._prev_mono is not None and mono >= self._prev_mono:
                t0 = wall - (mono - self._prev_mono)
                step = t0 - self._prev_wall  # type: ignore[operator]
                if abs(step) > 1.0:
                    log.warning("wall clock stepped by %+.1f s; durations and amortisation keep the monotonic "
                                "clock, energy is priced at the new wall time", step)
            # And on the tick before it (the next tick is due to cross one): the crossing tick is then
            # bracketed by two reads, so its energy is exact and each band's energy ends at a read
            # whatever the counter interval (one read more per edge; tests/test_counter_cadence.py).
            boundary = t0 is not None and (self.ledger.crosses_boundary(t0, wall)
                                           or self.ledger.crosses_boundary(wall, wall + self.tick_seconds))
            self.ledger.roll_periods(wall)
            if self.devices:
                self._tick_gpus(wall, mono, final or boundary, final)
            if self.host is not None and (final or self._host_due(mono)):
                self._tick_host(wall, mono)
            held = 0.0
            if t0 is not None and wall > t0:
                self.ledger.accrue_capacity(t0, wall)
                self._account_wall_remainder(t0, wall)
                held = wall - t0
            # What the node's totals grew by beyond GPU energy (host energy, amortisation,
            # running costs) goes to whoever held each GPU; taken every tick, charged or not.
            capacity = self.ledger.take_capacity()
            if self.attribution is not None:
                self.ledger.add_busy(wall, self.attribution.charge_capacity(wall, held, capacity))
                self.attribution.end_tick()  # after every charge of the tick, before its snapshot
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
        """The ledger's totals, consistent (taken between two ticks), for persisting.

        With them, for live GPUs, the energy-counter reading each GPU's total ends at and this
        boot's id (``gpu_counters``), so that a restart on the same boot counts, exact from the
        counter, the energy used while no agent ran (after a crash, kill -9 or an upgrade) and
        the totals never go back; the same for the host's RAPL counters (``host_counters``), and
        only for them: a modelled host has no counter to bridge with.
        """
        with self._lock:
            state = self.ledger.state()
            boot = boot_id() if self.source_kind == "nvml" else None
            if boot is not None:
                marks = [[d.uuid, m[0], m[1], self._energy[d.index].counted_past_mark] for d in self.devices
                         if (m := self._energy[d.index].counter_mark) is not None]
                state["gpu_counters"] = {"boot_id": boot, "readings": marks, "mono": self._prev_mono}
                host = self.host.counter_mark() if self.host is not None else None
                if host is not None:
                    state["host_counters"] = host.to_state(boot)
            # The agent's own counters, so that a restart continues them too.
            state["agent_counters"] = {"ticks": self.ticks, "energy_reads": self.counter_reads,
                                       "errors": self.errors_now()}
            return state

    def continue_agent_counters(self, state: Any) -> None:
        """Continue the agent's own counters (ticks, energy-counter reads, errors by kind) from a
        loaded state, before the first tick. A missing or malformed ``agent_counters`` leaves them
        at 0 with one log line; it never touches the totals."""
        data = state.get("agent_counters") if isinstance(state, dict) else None
        if data is None:
            return
        try:
            if not isinstance(data, dict) or not isinstance(data.get("errors", {}), dict):
                raise ValueError("expected an object with an object of errors")
            ticks = int(number(data.get("ticks", 0), "agent_counters.ticks", 1e15))
            reads = int(number(data.get("energy_reads", 0), "agent_counters.energy_reads", 1e15))
            errors = {k: int(number(v, f"agent_counters.errors.{k}", 1e15))
                      for k, v in data.get("errors", {}).items() if k in ERROR_KINDS}
        except ValueError as exc:
            log.warning("state file: the agent's own counters start from 0: %s", exc)
            return
        with self._lock:
            self.ticks += ticks
            self.counter_reads += reads
        for kind, n in errors.items():
            if n:
                self.count(kind, n)

    def resume_counters(self, marks: dict[str, tuple[int, float, float]], mono: float | None = None,
                        host: RaplMark | None = None) -> None:
        """The counter readings the loaded totals end at, the monotonic time the loaded
        amortisation ends at and the host's RAPL mark (:func:`resume_point`), before the first tick."""
        with self._lock:
            self._resume_mono = mono
            self._resume_marks = dict(marks)
            for d in self.devices:
                self._resume(d)
            if host is not None and self.host is not None:
                self.host.resume(host)

    def _host_description(self) -> str:
        """The host source's one-line description, re-formatted only when its mode changes."""
        if self.host is None:
            return ""
        key = (getattr(self.host, "mode", None), getattr(self.host, "reason", None))
        if key != self._host_desc_key:
            self._host_desc_key, self._host_desc = key, self.host.describe()
        return self._host_desc

    def _host_due(self, mono: float) -> bool:
        """Whether this tick reads the host: every HOST_READ_SECONDS (or every tick, if longer).

        Reading it less often than every tick loses nothing: RAPL gives energy counters, the
        model is linear in CPU utilisation, which is measured as the average since the last
        read, and the rest is constant. Only the host power gauges update less often."""
        prev = self._host_sample
        if prev is None or prev.baseline:
            return True  # the first reads: host power is known from the second tick on
        return mono - prev.t_mono >= HOST_READ_SECONDS - 0.5 * self.tick_seconds

    def _tick_host(self, wall: float, mono: float) -> None:
        try:
            sample = self.host.read(mono)  # type: ignore[union-attr]
        except Exception as exc:  # host readings must never stop GPU sampling
            self.count("host_read")
            log.warning("host read failed: %s", exc)
            return
        prev = self._host_sample
        if prev is None:
            for c in sample.components:
                self.ledger.open_host_component(c.component, c.source)
            if sample.bridged_since is not None:  # a restart: RAPL energy used while no agent ran
                gap = mono - sample.bridged_since
                for c in sample.components:
                    if c.source == "rapl":
                        self.ledger.add_host(c.component, c.source, wall - gap, wall, c.joules)
        if prev is not None and not sample.baseline:
            dt = mono - prev.t_mono
            for c in sample.components:
                self.ledger.add_host(c.component, c.source, wall - dt, wall, c.joules)
        self._host_sample = sample

    def _tick_gpus(self, wall: float, mono: float, read_counter: bool, final: bool) -> None:
        """Fetch every GPU that can be asked (worker thread, deadline), then account each."""
        src = self.source
        assert src is not None
        for index, seconds in self._calls.came_back():
            log.warning("GPU %d: its stuck call returned after %.1f s; it is asked again", index, seconds)
        procs = self.attribution.fetch if self.attribution is not None else None
        jobs = []
        for d in self.devices:
            i = d.index
            lost = self._lost.get(i)
            if lost is not None and mono < lost[0]:
                continue  # lost: next re-acquire not due yet
            acc = self._energy[i]
            counter = acc.counter_due(mono) or (read_counter and acc.method == "counter")
            since = acc.samples_since_us if acc.method == "samples" and not counter else None
            jobs.append((i, partial(_fetch, src, i, lost is not None, counter, since, procs)))
        results, timed_out, skipped = self._calls.run(jobs, GPU_TICK_BUDGET_SECONDS)
        self._not_answering(timed_out)
        for d in self.devices:
            outcome = results.get(d.index)
            if outcome is None:
                if final:
                    # Shutting down without an answer from it: what its open counter
                    # interval holds is settled from polled power rather than dropped.
                    self.ledger.add(self._energy[d.index].flush())
                continue
            ok, fetched = outcome
            if not ok:  # not a GpuError: a bug or a binding surprise; the GPU stays as it was
                self.count("gpu_read")
                log.warning("GPU %d: read failed unexpectedly: %r", d.index, fetched)
                continue
            self._account_gpu(d.index, fetched, wall, mono)
        if skipped:
            log.warning("GPUs %s not read this tick: the tick ran out of time", skipped)

    def _not_answering(self, indices: Sequence[int]) -> None:
        for i in indices:
            log.error("GPU %d did not answer within %.1f s: marked down, and not asked again until "
                      "that call returns", i, GPU_CALL_DEADLINE_SECONDS)
            self.count("gpu_timeout")
            self._up[i] = False
            self._readings[i] = None

    def _account_gpu(self, index: int, f: _Fetched, wall: float, mono: float) -> None:
        if f.lost is not None:
            retry = self._lost.get(index)
            if retry is None:
                log.error("GPU %d lost: %s; re-acquiring it with back-off", index, f.lost)
                self.count("gpu_lost")
                delay = LOST_RETRY_FIRST_SECONDS
            else:
                delay = min(2 * retry[1], LOST_RETRY_MAX_SECONDS)
                log.debug("GPU %d still lost: %s; next try in %.0f s", index, f.lost, delay)
            self._lost[index] = (mono + delay, delay)
            self._up[index] = False
            self._readings[index] = None
            return
        reading = f.reading
        assert reading is not None
        # Every reading failed (an NVML error on each call): the GPU did not answer.
        answered = not reading.failed or reading != GpuReading(failed=reading.failed)
        if self._lost.pop(index, None) is not None:
            log.warning("GPU %d is back; its totals continue", index)
        elif answered and not self._up[index]:
            log.warning("GPU %d answers again", index)
        elif not answered and self._up[index]:
            log.warning("GPU %d: every reading failed (%s); marked down", index,
                        f.read_error or ", ".join(reading.failed))
        self._up[index] = answered
        if f.read_error is not None:
            self.count(f.read_error.kind)
        self._readings[index] = reading if answered else None
        for _ in reading.failed:
            self.count("gpu_read")
        if f.counter is not None:
            self.counter_reads += 1
        if f.counter_error is not None:
            self.count("energy_counter")
            log.debug("GPU %d: counter read failed: %s", index, f.counter_error)
        if f.samples_error is not None:
            self.count("power_samples")
            log.debug("GPU %d: power samples failed: %s", index, f.samples_error)
        acc = self._energy[index]
        slices = acc.tick(mono, wall, reading.power_watts, reading.utilization_gpu_ratio, f.counter, f.samples)
        if self.attribution is None:
            self.ledger.add(slices)
            return
        self.attribution.observe(index, wall, reading, f.processes)
        self.attribution.account(index, self.ledger.add(slices), self.ledger.cost.currency)

    def _build(self, wall: float | None) -> Snapshot:
        energy = self.ledger.gpu_energy_by_gpu()
        gpus = tuple(
            GpuState(
                info=d,
                up=self._up[d.index],
                reading=self._readings.get(d.index),
                energy_method=self._energy[d.index].method,
                energy_counter_stale=self._energy[d.index].counter_stale,
                energy_joules=energy.get(d.uuid, {}),
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
                errors=self.errors_now(),
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
            workloads=self.ledger.workloads.frozen_rows() if self.attribution is not None else None,
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
            period_bounds=led.period_bounds(),
            running_cost=dict(led.running_cost),
            running_cost_rate_per_hour=led.running_rate_per_hour(),
            cloud_to_date=dict(led.cloud_to_date),
            cloud_prices=led.cloud_prices(),
            demand_peak_watts=d.peak_w if d is not None and d.month is not None else None,
            demand_charge=d.demand_charge if d is not None and d.month is not None else None,
        )


def probe_methods(source: GpuSource, wanted: str) -> dict[int, str]:
    """The energy method of each GPU (its NVML calls: run before the sampler takes the source)."""
    return {d.index: _choose_method(source, d.index, wanted) for d in source.devices()}


def _choose_method(source: GpuSource, index: int, wanted: str) -> str:
    """Best method the GPU supports, never better than ``wanted``."""
    order = ["counter", "samples", "polled"]
    start = 0 if wanted == "auto" else order.index(wanted)
    for method in order[start:]:
        try:
            if method == "counter":
                source.energy_mj(index)
            elif method == "samples":
                source.power_samples(index, 0)
            return method
        except GpuNotSupported:
            if wanted == method:
                log.warning("GPU %d: energy method %r is not supported; falling back", index, method)
        except GpuError as exc:
            # Supported but failing right now: keep the method, it may recover.
            log.warning("GPU %d: %s read failed at start: %s", index, method, exc)
            return method
    return "polled"


@dataclass
class _Fetched:
    """What one GPU answered in one tick (gathered on a worker thread, accounted on the tick's)."""

    reading: GpuReading | None = None
    read_error: GpuError | None = None
    lost: GpuError | None = None
    counter: int | None = None
    counter_error: GpuError | None = None
    samples: list[PowerSample] | None = None
    samples_error: GpuError | None = None
    #: The attribution stage's process reads (see Attributor.fetch), when it has one.
    processes: Any = None


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), or None where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _gpu_counters(state: Any) -> dict[str, Any] | None:
    """A persisted state's ``gpu_counters``, checked, when it was saved on this boot (the
    monotonic clock and the counters restart with a reboot); else None. Raises ValueError for a
    malformed entry (the whole state is then set aside, as for any value)."""
    data = state.get("gpu_counters") if isinstance(state, dict) else None
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("readings"), list):
        raise ValueError("gpu_counters: expected an object with a list of readings")
    for i, row in enumerate(data["readings"]):
        ok = (isinstance(row, list) and len(row) in (3, 4) and isinstance(row[0], str) and 0 < len(row[0]) <= 256
              and isinstance(row[1], int) and not isinstance(row[1], bool) and 0 <= row[1] < 2**63
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e10 for v in row[2:]))
        if not ok:
            raise ValueError(f"gpu_counters.readings[{i}]: expected [gpu uuid, counter mJ, monotonic s, "
                             "J counted past it]")
    mono = data.get("mono")
    if mono is not None and (isinstance(mono, bool) or not isinstance(mono, (int, float)) or not 0 <= mono < 1e10):
        raise ValueError("gpu_counters.mono: expected monotonic seconds")
    boot = boot_id()
    return data if boot is not None and data.get("boot_id") == boot else None


def resume_point(state: Any) -> tuple[dict[str, tuple[int, float, float]], float | None, RaplMark | None]:
    """Where a persisted state's totals end, when it was saved on this boot: GPU UUID ->
    (counter mJ, monotonic s, J counted past it), the monotonic time its amortisation ends at, and the host's RAPL
    counters (:class:`~agent.sources.host.RaplMark`). Else ({}, None, None). Raises ValueError
    for a malformed ``gpu_counters`` or ``host_counters`` (see :func:`_gpu_counters`)."""
    host = RaplMark.from_state(state.get("host_counters") if isinstance(state, dict) else None, boot_id())
    data = _gpu_counters(state)
    if data is None:
        return {}, None, host
    mono = data.get("mono")
    marks = {row[0]: (row[1], float(row[2]), float(row[3]) if len(row) > 3 else 0.0) for row in data["readings"]}
    return marks, None if mono is None else float(mono), host


def counter_marks(state: Any) -> dict[str, tuple[int, float, float]]:
    """The counter readings of :func:`resume_point`."""
    return resume_point(state)[0]


def resume_mono(state: Any) -> float | None:
    """The amortisation end of :func:`resume_point`."""
    return resume_point(state)[1]


def _fetch(src: GpuSource, index: int, reacquire: bool, counter: bool, since_us: int | None,
           processes: Callable[[GpuSource, int], Any] | None = None) -> _Fetched:
    """The NVML calls of one GPU for one tick; only source calls, no accounting state touched."""
    f = _Fetched()
    if reacquire:
        again = getattr(src, "reacquire", None)  # sources whose handles can go stale (NVML)
        if again is not None:
            try:
                again(index)
            except GpuError as exc:
                f.lost = exc
                return f
    try:
        f.reading = src.read(index)
    except GpuLost as exc:
        f.lost = exc
        return f
    except GpuError as exc:
        f.read_error = exc
        f.reading = GpuReading(failed=("all",))
    if counter:
        try:
            f.counter = src.energy_mj(index)
        except GpuError as exc:
            f.counter_error = exc
    elif since_us is not None:
        try:
            f.samples = src.power_samples(index, since_us)
        except GpuError as exc:
            f.samples_error = exc
    if processes is not None:
        f.processes = processes(src, index)
    return f


_METHOD_TEXT = {
    "counter": "the hardware energy counter",
    "samples": "the driver's power-sample buffer (no energy counter)",
    "polled": "polled power (estimate: no counter, no sample buffer)",
}
