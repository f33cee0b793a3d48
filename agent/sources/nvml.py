"""GPU source over NVML (nvidia-ml-py).

Every ``NVMLError`` is translated here into :mod:`agent.sources.gpu` errors.
A field that answers NotSupported (or whose function the driver lacks) is
remembered per GPU and never asked again, and logged once. Calls to one GPU
never wait for another GPU's (a lock per GPU, none for the whole source), so
a GPU that hangs in NVML holds up only its own calls.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .gpu import (
    GpuError,
    GpuInfo,
    GpuLost,
    GpuNotSupported,
    GpuProcess,
    GpuReading,
    PowerSample,
    ProcessUtilSample,
    SourceUnavailable,
)

log = logging.getLogger(__name__)

try:  # the import itself works without a driver; nvmlInit is what fails
    import pynvml as _nvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a hard dependency
    _nvml = None  # type: ignore[assignment]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlGpuSource:
    """Reads every GPU of the node through NVML."""

    kind = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._nv = nvml if nvml is not None else _nvml
        if self._nv is None:
            raise SourceUnavailable("nvidia-ml-py is not installed")
        try:
            self._nv.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise SourceUnavailable(f"NVML could not be initialised: {exc}") from exc
        self._unsupported: set[tuple[int, str]] = set()
        self._handles: dict[int, Any] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._devices: list[GpuInfo] = []
        try:
            self.driver_version = _text(self._nv.nvmlSystemGetDriverVersion())
        except Exception:
            self.driver_version = ""
        try:
            count = self._nv.nvmlDeviceGetCount()
        except self._nv.NVMLError as exc:
            raise SourceUnavailable(f"NVML could not count the GPUs: {exc}") from exc
        for i in range(count):
            try:
                handle = self._nv.nvmlDeviceGetHandleByIndex(i)
            except self._nv.NVMLError as exc:  # lost already: without a UUID it cannot be told apart
                log.error("GPU %d cannot be opened (%s); it is left out until the agent restarts", i, exc)
                continue
            self._handles[i] = handle
            self._locks[i] = threading.Lock()
            self._devices.append(self._inventory(i, handle))

    # -- inventory -------------------------------------------------------

    def _inventory(self, i: int, h: Any) -> GpuInfo:
        nv = self._nv

        def opt(fn: Callable[[], Any], default: Any = None) -> Any:
            try:
                return fn()
            except Exception:
                return default

        mem = opt(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        limit_mw = opt(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        pci = opt(lambda: nv.nvmlDeviceGetPciInfo(h))
        return GpuInfo(
            index=i,
            uuid=_text(opt(lambda: nv.nvmlDeviceGetUUID(h), f"GPU-index-{i}")),
            name=_text(opt(lambda: nv.nvmlDeviceGetName(h), "unknown")),
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            serial=_text(opt(lambda: nv.nvmlDeviceGetSerial(h), "")),
            driver_version=self.driver_version,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            power_limit_watts=limit_mw / 1000.0 if limit_mw is not None else None,
        )

    def devices(self) -> list[GpuInfo]:
        return list(self._devices)

    # -- error translation ------------------------------------------------

    def _call(self, index: int, field: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call one NVML function for one GPU, translating its errors."""
        if (index, field) in self._unsupported:
            raise GpuNotSupported(field)
        nv = self._nv
        try:
            return fn(self._handles[index], *args)
        except nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_FUNCTION_NOT_FOUND):
                self._unsupported.add((index, field))
                log.info("GPU %d: %s is not supported; it will not be exported", index, field)
                raise GpuNotSupported(field) from exc
            if code == nv.NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(f"GPU {index}: {exc}") from exc
            raise GpuError(f"GPU {index}: {field}: {exc}") from exc
        except AttributeError as exc:  # binding too old for this call
            self._unsupported.add((index, field))
            raise GpuNotSupported(field) from exc

    def reacquire(self, index: int) -> None:
        """A new handle for a GPU that was lost, looked up by its UUID (the index may change).

        NVML is initialised once more around the lookup, which attaches a GPU
        that came back from a reset; the reference count is left as it was, so
        the other GPUs' handles stay valid while they are being read. Raises
        :class:`GpuLost` while the GPU is still gone.
        """
        nv = self._nv
        uuid = next(d.uuid for d in self._devices if d.index == index)
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise GpuLost(f"GPU {index}: NVML could not be initialised again: {exc}") from exc
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid)
        except nv.NVMLError as exc:
            raise GpuLost(f"GPU {index} ({uuid}) is still gone: {exc}") from exc
        finally:
            try:
                nv.nvmlShutdown()
            except nv.NVMLError:
                pass
        with self._locks[index]:
            self._handles[index] = handle

    # -- per tick ---------------------------------------------------------

    def read(self, index: int) -> GpuReading:
        nv = self._nv
        failed: list[str] = []
        values: dict[str, Any] = {}

        def get(field: str, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return self._call(index, field, fn, *args)
            except GpuNotSupported:
                return None
            except GpuLost:
                raise
            except GpuError:
                failed.append(field)
                return None

        with self._locks[index]:
            power = get("power", nv.nvmlDeviceGetPowerUsage)
            values["power_watts"] = power / 1000.0 if power is not None else None
            util = get("utilization", nv.nvmlDeviceGetUtilizationRates)
            if util is not None:
                values["utilization_gpu_ratio"] = util.gpu / 100.0
                values["utilization_memory_ratio"] = util.memory / 100.0
            mem = get("memory", nv.nvmlDeviceGetMemoryInfo)
            values["memory_used_bytes"] = int(mem.used) if mem is not None else None
            values["temperature_celsius"] = get(
                "temperature", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU
            )
            sm = get("sm_clock", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM)
            values["sm_clock_hertz"] = sm * 1e6 if sm is not None else None
            values["performance_state"] = get("pstate", nv.nvmlDeviceGetPerformanceState)
            reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                nv, "nvmlDeviceGetCurrentClocksThrottleReasons"
            )
            values["clock_event_reasons"] = get("clock_event_reasons", reasons_fn)
            limit = get("power_limit", nv.nvmlDeviceGetEnforcedPowerLimit)
            values["power_limit_watts"] = limit / 1000.0 if limit is not None else None
        return GpuReading(failed=tuple(failed), **values)

    def energy_mj(self, index: int) -> int:
        with self._locks[index]:
            return int(
                self._call(index, "energy_counter", self._nv.nvmlDeviceGetTotalEnergyConsumption)
            )

    def power_samples(self, index: int, since_us: int) -> list[PowerSample]:
        nv = self._nv
        with self._locks[index]:
            try:
                vtype, samples = self._call(
                    index, "power_samples", nv.nvmlDeviceGetSamples, nv.NVML_TOTAL_POWER_SAMPLES, since_us
                )
            except GpuError as exc:
                # NotFound means "no sample newer than since_us": an empty answer.
                cause = exc.__cause__
                if getattr(cause, "value", None) == getattr(nv, "NVML_ERROR_NOT_FOUND", -1):
                    return []
                raise
        attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(vtype, "uiVal")
        return [(int(s.timeStamp), int(getattr(s.sampleValue, attr))) for s in samples]

    def processes(self, index: int) -> list[GpuProcess]:
        """Compute and graphics processes on the GPU, merged: (pid, used GPU memory in bytes or None).

        A PID in both lists (a process using CUDA and graphics) appears once, with the
        larger memory figure. A GPU without a graphics list (most data-centre GPUs answer
        NotSupported) gives its compute list alone.
        """
        nv = self._nv
        with self._locks[index]:
            compute = self._call(index, "processes", nv.nvmlDeviceGetComputeRunningProcesses)
            graphics_fn = getattr(nv, "nvmlDeviceGetGraphicsRunningProcesses", None)
            try:
                graphics = self._call(index, "graphics_processes", graphics_fn) if graphics_fn else []
            except GpuNotSupported:
                graphics = []
        merged: dict[int, int | None] = {}
        for p in list(compute) + list(graphics):
            pid = int(p.pid)
            used = getattr(p, "usedGpuMemory", None)
            used = int(used) if used is not None else None
            if pid not in merged or (used is not None and (merged[pid] is None or used > merged[pid])):  # type: ignore[operator]
                merged[pid] = used
        return list(merged.items())

    def process_utilization(self, index: int, since_us: int) -> list[ProcessUtilSample]:
        """``nvmlDeviceGetProcessUtilization(handle, since_us)``: samples newer than ``since_us``.

        NotFound means no process has a sample newer than ``since_us``: an empty list.
        (The binding also raises for a first call that succeeds with no samples; that
        too is an empty list.)
        """
        nv = self._nv
        with self._locks[index]:
            try:
                fn = getattr(nv, "nvmlDeviceGetProcessUtilization", None)
                if fn is None:  # binding too old
                    self._unsupported.add((index, "process_utilization"))
                    raise GpuNotSupported("process_utilization")
                samples = self._call(index, "process_utilization", fn, int(since_us))
            except GpuError as exc:
                code = getattr(exc.__cause__, "value", None)
                if code in (getattr(nv, "NVML_ERROR_NOT_FOUND", -1), getattr(nv, "NVML_SUCCESS", -1)):
                    return []
                raise
        out = [(int(s.pid), int(s.timeStamp), int(s.smUtil), int(s.memUtil)) for s in samples]
        return sorted((s for s in out if s[1] > since_us), key=lambda s: s[1])

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass
