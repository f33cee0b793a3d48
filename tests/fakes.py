"""A scriptable GpuSource for unit tests: each field is a function of time, or raises."""

from __future__ import annotations

from typing import Any, Callable

from agent.sources.gpu import GpuError, GpuInfo, GpuLost, GpuNotSupported, GpuReading, MigInstance


class FakeGpu:
    """One GPU drawing ``watts(t)``; its counter integrates that exactly (mJ)."""

    def __init__(self, watts: Callable[[float], float], *, counter: bool = True, samples: bool = True,
                 temperature: float | None = 40.0, limit_w: float = 700.0) -> None:
        self.watts = watts
        self.has_counter = counter
        self.has_samples = samples
        self.temperature = temperature
        self.limit_w = limit_w
        self.counter_offset_mj = 0.0  # set negative to simulate a reset
        self.lost = False
        self.fail_counter = False
        #: Processes on the GPU: a function of time giving [(pid, used bytes or None)], or None
        #: (the GPU does not list processes: NotSupported).
        self.procs: Callable[[float], list[tuple[int, int | None]]] | None = lambda t: []
        #: Per-process utilisation samples the driver holds: (pid, timestamp µs, SM %, mem %);
        #: a read returns those taken by now and newer than ``since_us``. None: NotSupported.
        self.util_samples: list[tuple[int, int, int, int]] | None = []
        #: Utilisation reading of the whole GPU (ratio).
        self.utilization = 0.5
        #: MIG GPU instances: a function of time giving the instances, or None (not in MIG mode).
        self.mig: Callable[[float], list[MigInstance]] | None = None


class FakeSource:
    kind = "nvml"

    def __init__(self, gpus: list[FakeGpu], t0: float = 1_800_000_000.0) -> None:
        self.gpus = gpus
        self.t0 = t0
        self.t = t0
        self.calls: dict[str, int] = {}

    def clock(self) -> tuple[float, float]:
        return self.t, self.t

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def devices(self) -> list[GpuInfo]:
        return [GpuInfo(index=i, uuid=f"GPU-fake-{i}", name="Fake H100", power_limit_watts=g.limit_w)
                for i, g in enumerate(self.gpus)]

    def energy_between(self, i: int, a: float, b: float) -> float:
        """Energy of GPU i over [a, b] by midpoint integration on a 1 ms grid. Units: J."""
        w = self.gpus[i].watts
        steps = max(1, int(round((b - a) * 1000)))
        h = (b - a) / steps
        return sum(w(a + (k + 0.5) * h) for k in range(steps)) * h

    def read(self, index: int) -> GpuReading:
        self._count("read")
        g = self.gpus[index]
        if g.lost:
            raise GpuLost(f"GPU {index} fell off the bus")
        return GpuReading(power_watts=g.watts(self.t), utilization_gpu_ratio=g.utilization,
                          temperature_celsius=g.temperature, power_limit_watts=g.limit_w)

    def energy_mj(self, index: int) -> int:
        self._count("energy_mj")
        g = self.gpus[index]
        if not g.has_counter:
            raise GpuNotSupported("energy_counter")
        if g.fail_counter:
            raise GpuError("counter read failed")
        return int(round(self.energy_between(index, self.t0 - 100, self.t) * 1000 + g.counter_offset_mj))

    def power_samples(self, index: int, since_us: int) -> list[tuple[int, int]]:
        self._count("power_samples")
        g = self.gpus[index]
        if not g.has_samples:
            raise GpuNotSupported("power_samples")
        now_us = int(round(self.t * 1e6))
        lo = max(since_us, now_us - 2_400_000)  # a 2.4 s ring buffer, one sample per 20 ms
        first = (lo // 20_000 + 1) * 20_000
        return [(ts, int(round(g.watts(ts / 1e6) * 1000))) for ts in range(first, now_us + 1, 20_000)]

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        self._count("processes")
        g = self.gpus[index]
        if g.procs is None:
            raise GpuNotSupported("processes")
        return list(g.procs(self.t))

    def process_utilization(self, index: int, since_us: int) -> list[tuple[int, int, int, int]]:
        self._count("process_utilization")
        g = self.gpus[index]
        if g.util_samples is None:
            raise GpuNotSupported("process_utilization")
        now_us = int(round(self.t * 1e6))
        return sorted((s for s in g.util_samples if since_us < s[1] <= now_us), key=lambda s: s[1])

    def mig_instances(self, index: int) -> list[MigInstance] | None:
        self._count("mig_instances")
        g = self.gpus[index]
        return list(g.mig(self.t)) if g.mig is not None else None

    def close(self) -> None:
        pass


def make_sampler(source: FakeSource, **kw: Any):
    from agent.sampler import Sampler

    sampler = Sampler(source, clock=source.clock, **kw)
    sampler.tick()  # the baseline tick at t0, as Service.start() does
    return sampler


def real_time_source(gpus: list[FakeGpu]) -> FakeSource:
    """A FakeSource whose clock follows the real one on every read (for ``record``, which
    samples in real time)."""
    import time

    live = FakeSource(gpus, t0=time.time())
    fake_read = live.read

    def read(i: int) -> GpuReading:
        live.t = time.time()
        return fake_read(i)

    live.read = read  # type: ignore[method-assign]
    return live
