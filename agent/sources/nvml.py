"""GPU source over NVML (nvidia-ml-py).

Every ``NVMLError`` is translated here into :mod:`agent.sources.gpu` errors.
A field that answers NotSupported (or whose function the driver lacks) is
remembered per GPU and never asked again, and logged once. Calls to one GPU
never wait for another GPU's (a lock per GPU, none for the whole source), so
a GPU that hangs in NVML holds up only its own calls.
"""

from __future__ import annotations

import logging
import re
import threading
from time import monotonic as _monotonic
from dataclasses import dataclass, field
from typing import Any, Callable

from .gpu import (
    GpuError,
    GpuInfo,
    GpuLost,
    GpuNotSupported,
    GpuProcess,
    GpuReading,
    MigComputeInstance,
    MigInstance,
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


#: A GPU whose MIG mode is off is asked again after this long (and at once after a re-acquire).
#: ``nvmlDeviceGetMigMode`` takes 136 µs on H100 (median, probe.json; such calls burn their wall
#: time as CPU, probe2.json), four times a whole tick's other readings (34 µs); MIG is turned on
#: only while no process uses the GPU, so a late view of it misplaces little. Energy never
#: depends on it, only the split among workloads. Units: s.
MIG_MODE_RECHECK_SECONDS = 30.0

#: The profile at the end of a MIG device's name: "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
#: "… MIG 1c.3g.40gb" (a compute instance smaller than its GPU instance), "… MIG 1g.10gb+me".
_MIG_PROFILE = re.compile(r"MIG\s+(?:\d+c\.)?(\d+g\.\S+)\s*$")


@dataclass
class _MigState:
    """What the MIG reads of one GPU keep between calls (only that GPU's worker touches it)."""

    #: (GPU instance id, compute instance id) → static facts of that MIG device
    static: dict[tuple[int, int], MigComputeInstance] = field(default_factory=dict)
    #: GPU instance id → (profile, GPU instance slice count)
    gi_static: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    #: whether GPM (per-instance SM activity) works on the GPU; None: not asked yet
    gpm_ok: bool | None = None
    #: GPU instance id → the previous GPM sample buffer
    gpm_prev: dict[int, Any] = field(default_factory=dict)
    #: MIG mode was off at the last ask: not asked again before this monotonic time (s).
    off_until: float = 0.0


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
        self._mig: dict[int, _MigState] = {i: _MigState() for i in self._handles}
        #: What :meth:`read` asks, in order: (field, NVML function name, arguments after the handle).
        self._reads = _read_plan(self._nv)
        #: Per GPU, the reads still asked (a field answering NotSupported leaves its plan).
        self._plans = {i: self._plan(i) for i in self._handles}

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
            # A reset may have changed the MIG layout (changing the mode needs one): ask afresh.
            self._mig_forget(index)

    # -- per tick ---------------------------------------------------------

    def read(self, index: int) -> GpuReading:
        """The cheap readings of one tick: one NVML call per field the GPU supports.

        Called for every GPU every tick, so the loop is flat (no helper per field) over the
        fields not known to be unsupported; the error path translates as :meth:`_call`.
        """
        nv = self._nv
        failed: list[str] = []
        values: list[Any] = [None] * len(self._reads)
        with self._locks[index]:
            handle = self._handles[index]
            for i, (what, name, args) in self._plans[index]:
                try:
                    values[i] = getattr(nv, name)(handle, *args)
                except (nv.NVMLError, AttributeError) as exc:
                    self._read_failed(index, what, exc, failed)
        power, util, mem, temp, sm, pstate, reasons, limit = values
        return GpuReading(
            power_watts=power / 1000.0 if power is not None else None,
            utilization_gpu_ratio=util.gpu / 100.0 if util is not None else None,
            utilization_memory_ratio=util.memory / 100.0 if util is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            temperature_celsius=temp,
            sm_clock_hertz=sm * 1e6 if sm is not None else None,
            performance_state=pstate,
            clock_event_reasons=reasons,
            power_limit_watts=limit / 1000.0 if limit is not None else None,
            failed=tuple(failed),
        )

    def _plan(self, index: int) -> list[tuple[int, tuple[str, str, tuple[Any, ...]]]]:
        """What :meth:`read` asks GPU ``index``: (position, read) of each field not unsupported."""
        return [(i, r) for i, r in enumerate(self._reads) if (index, r[0]) not in self._unsupported]

    def _read_failed(self, index: int, field: str, exc: Exception, failed: list[str]) -> None:
        """A field of :meth:`read` raised ``exc``: not supported (remembered, logged once),
        the GPU lost (raises :class:`GpuLost`), or a transient failure (added to ``failed``)."""
        nv = self._nv
        if isinstance(exc, AttributeError):  # binding too old for this call
            self._unsupported.add((index, field))
            self._plans[index] = self._plan(index)
            return None
        code = getattr(exc, "value", None)
        if code in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_FUNCTION_NOT_FOUND):
            self._unsupported.add((index, field))
            self._plans[index] = self._plan(index)
            log.info("GPU %d: %s is not supported; it will not be exported", index, field)
            return None
        if code == nv.NVML_ERROR_GPU_IS_LOST:
            raise GpuLost(f"GPU {index}: {exc}") from exc
        failed.append(field)
        return None

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
        _merge_processes(merged, list(compute) + list(graphics))
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

    # -- MIG (read-only: the mode and the instances are never changed) --------------

    def mig_instances(self, index: int) -> list[MigInstance] | None:
        """The GPU's MIG GPU instances (read-only), or None when the GPU is not in MIG mode.

        ``nvmlDeviceGetMigMode`` (NotSupported: no MIG, never asked again; MIG off: asked again
        after :data:`MIG_MODE_RECHECK_SECONDS`, or at once after a re-acquire), then every MIG
        device (compute instance) by index up to ``nvmlDeviceGetMaxMigDeviceCount``: its GPU
        and compute instance ids, UUID, profile (from its name), slice and SM counts (asked
        once per MIG device), and its processes (``nvmlDeviceGetComputeRunningProcesses`` on
        the MIG device handle; where that is not supported, the parent's list grouped by each
        process's ``gpuInstanceId``). SM activity per GPU instance comes from GPM
        (``nvmlGpmMigSampleGet``, Hopper and later) over the time since the previous call.
        """
        nv = self._nv
        st = self._mig[index]
        now = _monotonic()
        if now < st.off_until or (index, "mig_mode") in self._unsupported:
            return None  # MIG off, asked less than MIG_MODE_RECHECK_SECONDS ago; or no MIG at all
        with self._locks[index]:
            # Looked up inside the call: a binding too old to have it is "no MIG", not a crash.
            try:
                current, _pending = self._call(index, "mig_mode", lambda h: nv.nvmlDeviceGetMigMode(h))
            except GpuNotSupported:
                return None
            if current != getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1):
                st.off_until = now + MIG_MODE_RECHECK_SECONDS
                return None
            count = int(self._call(index, "mig_device_count", lambda h: nv.nvmlDeviceGetMaxMigDeviceCount(h)))
            instances: dict[int, dict[str, Any]] = {}
            per_device_lists = True
            for i in range(count):
                handle = self._mig_handle(index, i)
                if handle is None:
                    continue
                gi = int(self._call(index, "mig_gpu_instance", lambda _h: nv.nvmlDeviceGetGpuInstanceId(handle)))
                ci = int(self._call(index, "mig_compute_instance",
                                    lambda _h: nv.nvmlDeviceGetComputeInstanceId(handle)))
                facts = self._mig_static(index, gi, ci, handle)
                entry = instances.setdefault(gi, {"cis": [], "procs": {}})
                entry["cis"].append(facts)
                if per_device_lists:
                    try:
                        procs = self._call(index, "mig_processes",
                                           lambda _h: nv.nvmlDeviceGetComputeRunningProcesses(handle))
                    except GpuNotSupported:
                        per_device_lists = False
                    else:
                        _merge_processes(entry["procs"], procs)
            if not per_device_lists:
                for entry in instances.values():
                    entry["procs"] = {}
                for p in self._call(index, "processes", nv.nvmlDeviceGetComputeRunningProcesses):
                    gi = getattr(p, "gpuInstanceId", None)
                    if gi in instances:
                        _merge_processes(instances[gi]["procs"], [p])
            activity = self._gpm_activity(index, sorted(instances))
        out = []
        for gi in sorted(instances):
            profile, slices = self._mig[index].gi_static.get(gi, ("", None))
            entry = instances[gi]
            out.append(MigInstance(
                gpu_instance=gi,
                profile=profile,
                slices=slices,
                compute_instances=tuple(sorted(entry["cis"], key=lambda c: c.compute_instance)),
                processes=tuple(sorted(entry["procs"].items())),
                sm_activity=activity.get(gi),
            ))
        return out

    def _mig_handle(self, index: int, i: int) -> Any:
        """The MIG device at index ``i`` of GPU ``index``; None where there is none."""
        nv = self._nv
        try:
            return self._call(index, "mig_device", lambda h: nv.nvmlDeviceGetMigDeviceHandleByIndex(h, i))
        except GpuError as exc:
            code = getattr(exc.__cause__, "value", None)
            if code in (getattr(nv, "NVML_ERROR_NOT_FOUND", -1), getattr(nv, "NVML_ERROR_INVALID_ARGUMENT", -1)):
                return None  # no MIG device at this index (instances need not be numbered densely)
            raise

    def _mig_static(self, index: int, gi: int, ci: int, handle: Any) -> MigComputeInstance:
        """UUID, profile, slice and SM counts of a MIG device: asked once per (GPU, GI, CI)."""
        st = self._mig[index]
        key = (gi, ci)
        known = st.static.get(key)
        if known is not None:
            return known
        nv = self._nv

        def opt(field: str, fn: Callable[[], Any]) -> Any:
            try:
                return self._call(index, field, lambda _h: fn())
            except GpuNotSupported:
                return None
            except GpuLost:
                raise
            except GpuError as exc:
                log.debug("GPU %d MIG %d/%d: %s failed: %s", index, gi, ci, field, exc)
                return None

        uuid = opt("mig_uuid", lambda: nv.nvmlDeviceGetUUID(handle))
        name = opt("mig_name", lambda: nv.nvmlDeviceGetName(handle))
        attrs = opt("mig_attributes", lambda: nv.nvmlDeviceGetAttributes(handle))
        m = _MIG_PROFILE.search(_text(name)) if name is not None else None
        profile = m.group(1) if m else ""

        def count(name: str) -> int | None:
            v = getattr(attrs, name, None) if attrs is not None else None
            return int(v) if v else None

        gi_slices = count("gpuInstanceSliceCount")
        if gi_slices is None and profile:
            gi_slices = int(profile.split("g.", 1)[0])
        st.gi_static.setdefault(gi, (profile, gi_slices))
        facts = MigComputeInstance(
            compute_instance=ci,
            uuid=_text(uuid) if uuid is not None else "",
            compute_slices=count("computeInstanceSliceCount"),
            multiprocessors=count("multiprocessorCount"),
        )
        st.static[key] = facts
        return facts

    def _gpm_activity(self, index: int, gis: list[int]) -> dict[int, float]:
        """SM activity of each GPU instance since the previous call (GPM ``SM_UTIL``), ratio 0–1.

        GPM is asked once per GPU (``nvmlGpmQueryDeviceSupport``); without it, or for an
        instance's first read, or a failed read, the instance has no entry.
        """
        nv = self._nv
        st = self._mig[index]
        if st.gpm_ok is None:
            try:
                support = self._call(index, "gpm", lambda h: nv.nvmlGpmQueryDeviceSupport(h))
                st.gpm_ok = bool(getattr(support, "isSupportedDevice", 0))
            except GpuNotSupported:
                st.gpm_ok = False
            except GpuError as exc:
                log.debug("GPU %d: GPM support query failed: %s", index, exc)
                return {}
            if not st.gpm_ok:
                log.info("GPU %d: no GPM; MIG instances are split by their slices alone", index)
        for gi in [gi for gi in st.gpm_prev if gi not in gis]:
            self._gpm_free(st.gpm_prev.pop(gi))  # an instance that is gone
        if not st.gpm_ok:
            return {}
        out: dict[int, float] = {}
        for gi in gis:
            try:
                sample = self._call(index, "gpm_sample", lambda _h: nv.nvmlGpmSampleAlloc())
                try:
                    self._call(index, "gpm_sample", lambda h: nv.nvmlGpmMigSampleGet(h, gi, sample))
                except GpuError:
                    self._gpm_free(sample)
                    raise
            except GpuNotSupported:
                st.gpm_ok = False
                for prev in st.gpm_prev.values():
                    self._gpm_free(prev)
                st.gpm_prev.clear()
                return {}
            except GpuLost:
                raise
            except GpuError as exc:
                log.debug("GPU %d GI %d: GPM sample failed: %s", index, gi, exc)
                continue
            prev = st.gpm_prev.pop(gi, None)
            st.gpm_prev[gi] = sample
            if prev is None:
                continue
            try:
                value = self._gpm_sm_util(prev, sample)
            except Exception as exc:  # a metric we cannot compute is simply not known
                log.debug("GPU %d GI %d: GPM metrics failed: %s", index, gi, exc)
                value = None
            finally:
                self._gpm_free(prev)
            if value is not None:
                out[gi] = min(max(value / 100.0, 0.0), 1.0)
        return out

    def _gpm_sm_util(self, sample1: Any, sample2: Any) -> float | None:
        """``NVML_GPM_METRIC_SM_UTIL`` (% of the instance's SMs busy) between two samples."""
        nv = self._nv
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = 1
        req.sample1 = sample1
        req.sample2 = sample2
        req.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
        nv.nvmlGpmMetricsGet(req)
        metric = req.metrics[0]
        if metric.nvmlReturn != getattr(nv, "NVML_SUCCESS", 0):
            return None
        return float(metric.value)

    def _gpm_free(self, sample: Any) -> None:
        try:
            self._nv.nvmlGpmSampleFree(sample)
        except Exception:
            pass

    def _mig_forget(self, index: int) -> None:
        """Drop what the MIG reads of GPU ``index`` remember (its GPM buffers freed)."""
        st = self._mig.get(index)
        if st is not None:
            for sample in st.gpm_prev.values():
                self._gpm_free(sample)
        self._mig[index] = _MigState()

    def close(self) -> None:
        for index in list(self._mig):
            self._mig_forget(index)
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass


def _read_plan(nv: Any) -> tuple[tuple[str, str, tuple[Any, ...]], ...]:
    """The fields of :meth:`NvmlGpuSource.read`, each with the NVML function that reads it."""
    reasons = "nvmlDeviceGetCurrentClocksEventReasons"
    if not hasattr(nv, reasons):  # bindings before 12.535 name it after throttling
        reasons = "nvmlDeviceGetCurrentClocksThrottleReasons"
    return (
        ("power", "nvmlDeviceGetPowerUsage", ()),
        ("utilization", "nvmlDeviceGetUtilizationRates", ()),
        ("memory", "nvmlDeviceGetMemoryInfo", ()),
        ("temperature", "nvmlDeviceGetTemperature", (getattr(nv, "NVML_TEMPERATURE_GPU", 0),)),
        ("sm_clock", "nvmlDeviceGetClockInfo", (getattr(nv, "NVML_CLOCK_SM", 1),)),
        ("pstate", "nvmlDeviceGetPerformanceState", ()),
        ("clock_event_reasons", reasons, ()),
        ("power_limit", "nvmlDeviceGetEnforcedPowerLimit", ()),
    )


def _merge_processes(into: dict[int, int | None], procs: Any) -> None:
    """Add NVML process records to ``pid → used bytes``: one entry per PID, the larger figure."""
    for p in procs:
        pid = int(p.pid)
        used = getattr(p, "usedGpuMemory", None)
        used = int(used) if used is not None else None
        prev = into.get(pid)
        if pid not in into or (used is not None and (prev is None or used > prev)):
            into[pid] = used
