"""GPU source that plays a recorded trace and answers like NVML would.

The replay has its own clock, :attr:`ReplaySource.t` (trace seconds since the
epoch), moved forward by the caller with :meth:`seek`. At any moment it answers
with what NVML answered at the latest recorded instant not after ``t``: the
cheap readings, the energy counter (a step function, as the real counter is),
and the power-sample ring buffer (only samples younger than the buffer's depth
are still there, so a late reader loses samples exactly as on a real GPU).
Fields the trace never recorded for a GPU raise :class:`GpuNotSupported`.

With ``loop=True`` the trace repeats forever; time keeps going forward, and the
energy counter keeps counting across the seam (the seam gap is bridged at the
last recorded power), so a loop never looks like a counter reset.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..trace import Trace, mig_from_json
from .gpu import (
    GpuError,
    GpuInfo,
    GpuNotSupported,
    GpuProcess,
    GpuReading,
    MigInstance,
    PowerSample,
    ProcessUtilSample,
)

_CHEAP = (
    "power_mw",
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_bytes",
    "temp_c",
    "sm_clock_mhz",
    "pstate",
    "clock_event_reasons",
    "power_limit_mw",
)


@dataclass
class _Series:
    """One field of one GPU: the instants it was recorded and its values."""

    times: list[float]
    values: list[Any]

    def at(self, t: float) -> tuple[bool, Any]:
        """(recorded yet, value) for the latest record not after ``t``."""
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0:
            return False, None
        return True, self.values[i]


class ReplaySource:
    """Plays a :class:`~agent.trace.Trace` through the normal sampling pipeline."""

    kind = "replay"

    def __init__(
        self,
        trace: Trace,
        *,
        loop: bool = False,
        hide: Iterable[str] = (),
        buffer_seconds: float | None = None,
    ) -> None:
        self.trace = trace
        self.loop = loop
        self.hidden = set(hide)
        self.start = trace.start
        self.end = trace.end
        times = [float(r["t"]) for r in trace.rows]
        gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
        #: Gap inserted between the end of one loop and the start of the next.
        self.seam = statistics.median(gaps) if gaps else 1.0
        self.period = (self.end - self.start) + self.seam
        self.buffer_us = int(1e6 * (buffer_seconds or float(trace.header.get("sample_buffer_seconds", 2.4))))
        self._devices = [self._info(g, trace.header) for g in sorted(trace.gpus, key=lambda g: g["index"])]
        self._series: dict[int, dict[str, _Series]] = {}
        #: Identity facts the recorder wrote for each PID (``identities`` rows):
        #: {"workload": key, "labels": {...}}; a PID without facts has none here.
        self.identities: dict[int, dict[str, Any]] = {}
        self._samples: dict[int, tuple[list[int], list[int]]] = {}
        #: Per GPU: the recorded per-process utilisation samples with the trace time each was read.
        self._proc_util: dict[int, tuple[list[float], list[ProcessUtilSample]]] = {}
        self._loop_energy_mj: dict[int, int] = {}
        self._row_times = times
        for info in self._devices:
            self._index_gpu(info.index)
        self.t = self.start

    # -- loading ----------------------------------------------------------

    @staticmethod
    def _info(g: dict[str, Any], header: dict[str, Any]) -> GpuInfo:
        limit_mw = g.get("power_limit_mw")
        return GpuInfo(
            index=int(g["index"]),
            uuid=str(g["uuid"]),
            name=str(g.get("name", "unknown")),
            pci_bus_id=str(g.get("pci_bus_id", "")),
            serial=str(g.get("serial", "")),
            driver_version=str(header.get("driver_version", "")),
            memory_total_bytes=g.get("memory_total_bytes"),
            power_limit_watts=limit_mw / 1000.0 if limit_mw is not None else None,
        )

    def _index_gpu(self, index: int) -> None:
        key = str(index)
        series: dict[str, _Series] = {}
        sample_ts: dict[int, int] = {}
        util_read: list[tuple[float, ProcessUtilSample]] = []
        has_util = False
        for row in self.trace.rows:
            g = row.get("gpus", {}).get(key)
            if not g:
                continue
            t = float(row["t"])
            for name, value in g.items():
                if name == "samples":
                    for ts, mw in value or ():
                        sample_ts[int(ts)] = int(mw)
                    continue
                if name == "identities":
                    for pid, facts in (value or {}).items():
                        self.identities.setdefault(int(pid), facts)
                    continue
                if name == "process_utilization":
                    has_util = True
                    for pid, ts, sm, mem in value or ():
                        util_read.append((t, (int(pid), int(ts), int(sm), int(mem))))
                    continue
                if name == "mig" and value is not None:
                    value = tuple(mig_from_json(value))  # parsed once here, not on every tick
                s = series.setdefault(name, _Series([], []))
                s.times.append(t)
                s.values.append(value)
        self._series[index] = series
        ordered = sorted(sample_ts.items())
        if has_util:
            self._proc_util[index] = ([t for t, _ in util_read], [u for _, u in util_read])
        if "samples" not in self.hidden and ordered:
            self._samples[index] = ([ts for ts, _ in ordered], [mw for _, mw in ordered])
        if "energy_mj" in series:
            e = series["energy_mj"]
            first = next((v for v in e.values if v is not None), 0)
            last = next((v for v in reversed(e.values) if v is not None), first)
            _, p_last = series["power_mw"].at(self.end) if "power_mw" in series else (False, 0)
            # Energy added per loop: the trace's delta plus the seam at the last power.
            self._loop_energy_mj[index] = int(last - first + (p_last or 0) * self.seam)

    # -- clock ------------------------------------------------------------

    def seek(self, t: float) -> None:
        """Move the replay clock to trace time ``t`` (never backwards)."""
        if t < self.t:
            raise ValueError("the replay clock only moves forward")
        self.t = t if self.loop else min(t, self.end)

    def advance(self, seconds: float, *, every: float | None = None, on_step: Callable[[], None] | None = None) -> None:
        """Move the clock ``seconds`` forward, stopping every ``every`` seconds on the way to call ``on_step``.

        A live agent reads the power-sample buffer between ticks on its own
        schedule; a replay makes the same reads at the same trace times by
        stopping its clock there (the last stop is before the target, which the
        tick itself reads).
        """
        target = self.t + seconds
        if every and on_step is not None:
            start, k = self.t, 1
            limit = target if self.loop else min(target, self.end)
            while start + k * every < limit - 1e-9:
                self.seek(start + k * every)
                on_step()
                k += 1
        self.seek(target)

    def _split(self, t: float) -> tuple[int, float]:
        """Virtual time → (loop number, time within the trace)."""
        if not self.loop:
            return 0, min(t, self.end)
        k = int(math.floor((t - self.start) / self.period))
        within = t - k * self.period
        return k, min(within, self.end)

    @property
    def finished(self) -> bool:
        return not self.loop and self.t >= self.end

    @property
    def loops(self) -> int:
        return self._split(self.t)[0]

    @property
    def position_seconds(self) -> float:
        """Seconds into the trace (within the current loop)."""
        return self._split(self.t)[1] - self.start

    @property
    def duration_seconds(self) -> float:
        return self.end - self.start

    # -- GpuSource --------------------------------------------------------

    def devices(self) -> list[GpuInfo]:
        return list(self._devices)

    def _field(self, index: int, name: str, t: float) -> Any:
        s = self._series[index].get(name)
        if s is None or name in self.hidden:
            raise GpuNotSupported(name)
        seen, value = s.at(t)
        if not seen:
            raise GpuError(f"GPU {index}: {name} not recorded yet at t={t:.3f}")
        if value is None:
            raise GpuError(f"GPU {index}: {name} failed at t={t:.3f} in the trace")
        return value

    def read(self, index: int) -> GpuReading:
        _, t = self._split(self.t)
        values: dict[str, Any] = {}
        failed: list[str] = []
        for name in _CHEAP:
            try:
                values[name] = self._field(index, name, t)
            except GpuNotSupported:
                values[name] = None
            except GpuError:
                values[name] = None
                failed.append(name)

        def per(name: str, divisor: float) -> float | None:
            # Same arithmetic as the NVML source, so both give identical floats.
            v = values[name]
            return v / divisor if v is not None else None

        mhz = values["sm_clock_mhz"]
        return GpuReading(
            power_watts=per("power_mw", 1000.0),
            utilization_gpu_ratio=per("util_gpu_pct", 100.0),
            utilization_memory_ratio=per("util_mem_pct", 100.0),
            memory_used_bytes=values["mem_used_bytes"],
            temperature_celsius=values["temp_c"],
            sm_clock_hertz=mhz * 1e6 if mhz is not None else None,
            performance_state=values["pstate"],
            clock_event_reasons=values["clock_event_reasons"],
            power_limit_watts=per("power_limit_mw", 1000.0),
            failed=tuple(failed),
        )

    def energy_mj(self, index: int) -> int:
        k, t = self._split(self.t)
        value = int(self._field(index, "energy_mj", t))
        return value + k * self._loop_energy_mj.get(index, 0)

    def power_samples(self, index: int, since_us: int) -> list[PowerSample]:
        if index not in self._samples or "samples" in self.hidden:
            raise GpuNotSupported("power_samples")
        ts, mw = self._samples[index]
        now_us = int(round(self.t * 1e6))
        lo = max(since_us, now_us - self.buffer_us)
        out: list[PowerSample] = []
        k_now = self._split(self.t)[0]
        for k in (k_now - 1, k_now):  # a read may span the seam between two loops
            if k < 0:
                continue
            shift = int(round(k * self.period * 1e6))
            i = bisect.bisect_right(ts, lo - shift)
            j = bisect.bisect_right(ts, now_us - shift)
            out.extend((ts[n] + shift, mw[n]) for n in range(i, j))
        return out

    def processes(self, index: int) -> list[GpuProcess]:
        _, t = self._split(self.t)
        procs = self._field(index, "processes", t)
        return [(int(p[0]), int(p[1]) if p[1] is not None else None) for p in procs]

    def process_utilization(self, index: int, since_us: int) -> list[ProcessUtilSample]:
        """The samples recorded at or before the replay time, newer than ``since_us``.

        A sample is available from the trace time of the row that read it (as on the
        recording machine), and returned once to a caller that advances ``since_us``
        to the newest timestamp, as NVML's ``last_seen`` works.
        """
        if index not in self._proc_util:
            raise GpuNotSupported("process_utilization")
        read_at, samples = self._proc_util[index]
        k_now = self._split(self.t)[0]
        out: list[ProcessUtilSample] = []
        for k in (k_now - 1, k_now):  # a read may span the seam between two loops
            if k < 0:
                continue
            shift = k * self.period
            j = bisect.bisect_right(read_at, self.t - shift)
            # A sample is read after it is taken: those read a minute before since_us are older.
            i = bisect.bisect_left(read_at, since_us / 1e6 - shift - 60.0) if since_us else 0
            shift_us = int(round(shift * 1e6))
            out.extend(
                (pid, ts + shift_us, sm, mem) for pid, ts, sm, mem in samples[i:j] if ts + shift_us > since_us
            )
        return sorted(out, key=lambda s: s[1])

    def mig_instances(self, index: int) -> list[MigInstance] | None:
        """The ``mig`` value of the latest row: None for a GPU the trace never shows in MIG mode."""
        _, t = self._split(self.t)
        try:
            value = self._field(index, "mig", t)
        except GpuNotSupported:
            return None
        return None if value is None else list(value)  # parsed when the trace was indexed

    def host_row(self) -> dict[str, Any] | None:
        """The host readings recorded at the current instant, if any."""
        _, t = self._split(self.t)
        idx = bisect.bisect_right(self._row_times, t) - 1
        return self.trace.rows[idx].get("host") if idx >= 0 else None

    def host_source(self, cfg: Any) -> Any:
        """Host power for the replay: the model fed with the trace's recorded CPU and memory.

        Returns None when the trace has no host readings. RAPL is never read
        during a replay: the machine replaying is not the machine recorded.
        """
        recorded = recorded_host(self.trace)
        if recorded is None:
            return None
        from types import SimpleNamespace

        from .host import HostPowerSource

        info = self.trace.header.get("host")
        mem_total = int((info.get("mem_total_bytes") if isinstance(info, dict) else 0) or 0)

        def row() -> dict[str, Any]:
            return self.host_row() or {}

        def cpu_percent() -> float:
            return float(row().get("cpu_util_pct") or 0.0)

        def virtual_memory() -> Any:
            used = int(row().get("mem_used_bytes") or 0)
            total = max(mem_total, used)
            return SimpleNamespace(total=total, available=total - used)

        return HostPowerSource(
            cfg.model_copy(update={"mode": "model"}),
            cpu_percent=cpu_percent,
            virtual_memory=virtual_memory,
            cpu_count=recorded.cpus,
            model_reason="replay: the trace's CPU and memory readings",
        )

    def close(self) -> None:
        pass


def recorded_host(trace: Trace) -> Any:
    """The machine a trace was recorded on, as its replay's host model describes it
    (:class:`~agent.sources.host.CpuHost`: the header's ``host.cpu_count``, 1 where it is not
    recorded); None when the trace has no host readings, so no host is modelled at all.

    The CPU model's unset figures scale with these CPUs, never the replaying machine's: a
    configuration is checked against the host it will describe (``config.load(cpu_host=...)``).
    """
    if not any("host" in r for r in trace.rows):
        return None
    from .host import CpuHost

    info = trace.header.get("host")
    n = info.get("cpu_count") if isinstance(info, dict) else None
    cpus = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    name = trace.header.get("hostname")
    return CpuHost(cpus, f"the recorded host {name}" if isinstance(name, str) and name else "the recorded host")
