"""A scripted stand-in for nvidia-ml-py's ``pynvml``: H100-like GPUs without a driver.

Put ``tests/fakenvml`` first on ``PYTHONPATH`` and any program that does
``import pynvml`` (the agent, nvitop, ...) gets this module. Every constant,
structure and exception class is the real nvidia-ml-py's (loaded from the
installed package under another name), so ``NVMLError(15)`` is an
``NVMLError_GpuIsLost`` with ``.value == 15`` exactly as on a real node; the
functions a GPU exporter calls are simulated here, and every other ``nvml*``
function answers ``NVML_ERROR_NOT_SUPPORTED``.

Environment:

``FAKE_NVML_GPUS``
    Number of GPUs (default 1).
``FAKE_NVML_SCRIPT``
    Path of a JSON scenario file, re-read when it changes (checked at most
    every 50 ms, on calls). Absent or empty file: no faults.
``FAKE_NVML_COST``
    ``1``: every simulated call spends, on the calling thread, the CPU the call
    spent on a real H100 (``_COST_US`` below, from the project's probe readings:
    the energy counter 3.8 ms, the sample buffer 0.39 ms, a cheap read 1 to
    6 µs), this module's own Python included, busy (hashing, the GIL released as
    a driver call releases it), so a CPU-time measurement charges it; calls the driver spends wall time in without
    a measured CPU cost (PCIe throughput samples for 20 ms) also wait that long.
    Unset or ``0``: calls are free (only this module's Python).
``FAKE_NVML_COST_SCALE``
    Multiplies every CPU cost (default 1; e.g. 2.4 for the counter's 9.2 ms
    read under load, ``probe2.json``'s ``energy_under_load``).
``FAKE_NVML_STATS``
    Path of a JSON file the module writes (at most every 0.2 s, and at exit)
    with per-GPU call counts and the most calls ever in flight at once.

The GPUs: ``NVIDIA H100 80GB HBM3``, 700 W limit, 80 GB. GPU ``i`` draws
``350 + 250 sin(2 pi t / (30 + 7 i) + i)`` W (``t``: the monotonic clock, so
every process on the machine sees the same GPU), or a constant set by the
script. The energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ) is
that power's exact integral since boot (or since the last scripted reset);
``nvmlDeviceGetPowerUsage`` is, as on Hopper, the average over the last
second (so it agrees with the counter exactly); ``nvmlDeviceGetSamples``
keeps a 2.4 s ring buffer of instantaneous power, one sample per 20 ms,
stamped in wall-clock microseconds.

Scenario file (all keys optional; GPU keys are indices as strings)::

    {
      "init": "DRIVER_NOT_LOADED",   # nvmlInit fails with this error (name or code) while set;
                                     # "hang": nvmlInit blocks while set (the statistics file
                                     # counts init calls under "init")
      "gpus": {
        "1": {
          "hang": true,              # its calls block while set (re-read every 20 ms)
          "fail": "UNKNOWN",         # its calls raise this NVML error while set
          "delay": 0.2,              # each of its calls takes this long (s)
          "functions": ["nvmlDeviceGetTotalEnergyConsumption"],
                                     # hang/fail/delay only these functions (default: all)
          "lost": true,              # GPU_IS_LOST while set; after it is cleared, old handles stay
                                     # lost and new ones fail until nvmlInit is called again
          "counter_reset": 1,        # each new value restarts its energy counter at 0
          "watts": 250.0,            # constant power from now on (null: back to the sine)
          "unsupported": ["nvmlDeviceGetTotalEnergyConsumption"],
                                     # these answer NVML_ERROR_NOT_SUPPORTED
          "processes": [[4242, 1073741824]]   # compute processes: [pid, used memory in bytes]
        }
      }
    }

Values in force when the module is imported are the starting state (a
``counter_reset`` present then is not a reset; ``watts`` then holds since boot, so the
counter reads the same in every process started with that scenario).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import threading
import time
from typing import Any

# -- the real module's definitions -------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_real() -> Any:
    path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("pynvml", path)
    if spec is None or spec.loader is None:
        raise ImportError("fake pynvml: the real nvidia-ml-py must be installed (it provides the "
                          "constants, structures and exception classes)")
    real = importlib.util.module_from_spec(spec)
    # It builds its NVMLError_* classes on sys.modules["pynvml"]: that must be itself meanwhile.
    me = sys.modules.get("pynvml")
    sys.modules["pynvml"] = real
    try:
        spec.loader.exec_module(real)
    finally:
        if me is not None:
            sys.modules["pynvml"] = me
    return real


_real = _load_real()
for _name, _value in vars(_real).items():
    if not _name.startswith("__"):
        globals()[_name] = _value

NVMLError = _real.NVMLError
_NOT_SUPPORTED = _real.NVML_ERROR_NOT_SUPPORTED
_IMPLEMENTED: set[str] = set()  # filled by @_api


def _error_code(spec: Any) -> int:
    """``"GPU_IS_LOST"``, ``"NVML_ERROR_GPU_IS_LOST"`` or ``15`` -> 15."""
    if isinstance(spec, int):
        return spec
    name = str(spec).upper()
    if not name.startswith("NVML_ERROR_"):
        name = "NVML_ERROR_" + name
    code = getattr(_real, name, None)
    if not isinstance(code, int):
        raise ValueError(f"fake pynvml: unknown NVML error {spec!r}")
    return code


# -- the simulated GPUs ------------------------------------------------------------

_WALL_OFFSET = time.time() - time.monotonic()
_SAMPLE_US = 20_000
_BUFFER_US = 2_400_000


class _Gpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.uuid = f"GPU-fa4e0000-0000-4000-8000-{index:012x}"
        self.serial = f"{1652024000000 + index}"
        self.pci_bus_id = f"00000000:{0x18 + 0x10 * index:02X}:00.0"
        self.base, self.amp, self.period, self.phase = 350.0, 250.0, 30.0 + 7.0 * index, float(index)
        # Constants of the sine, computed once (the same floats the formulas below used to compute).
        self._w = 2.0 * math.pi / self.period
        self._amp_over_w = self.amp / self._w
        #: Power segments, oldest first: (from monotonic t, energy at t in J, constant W or None).
        self.segments: list[tuple[float, float, float | None]] = [(0.0, 0.0, None)]
        self.counter_zero_j = 0.0
        self.epoch = 0  # handles of an older epoch are lost
        self.lost = False
        self.awaiting_init = False  # back from lost, but handles come only after nvmlInit
        self.faulty = False  # any of hang/fail/delay/unsupported set: the slow path
        self.hang = False
        self.fail: int | None = None
        self.delay = 0.0
        self.functions: frozenset[str] | None = None
        self.unsupported: frozenset[str] = frozenset()
        self.processes: list[tuple[int, int]] = []
        self.reset_token: Any = None
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0

    # Energy and power (closed forms, so the counter is the exact integral).

    def _segment(self, t: float) -> tuple[float, float, float | None]:
        segments = self.segments
        if len(segments) == 1:
            return segments[0]
        for seg in reversed(segments):
            if t >= seg[0]:
                return seg
        return self.segments[0]

    def _antiderivative(self, t: float, watts: float | None) -> float:
        if watts is not None:
            return watts * t
        return self.base * t - self._amp_over_w * math.cos(self._w * t + self.phase)

    def energy_j(self, t: float) -> float:
        t0, e0, watts = self._segment(t)
        return e0 + self._antiderivative(t, watts) - self._antiderivative(t0, watts)

    def power_w(self, t: float) -> float:
        watts = self._segment(t)[2]
        if watts is not None:
            return watts
        return self.base + self.amp * math.sin(self._w * t + self.phase)

    def set_watts(self, watts: float | None) -> None:
        if watts == self.segments[-1][2]:
            return
        now = time.monotonic()
        self.segments.append((now, self.energy_j(now), watts))
        del self.segments[:-8]


_GPUS = [_Gpu(i) for i in range(int(os.environ.get("FAKE_NVML_GPUS", "1")))]


class _Handle:
    """What nvmlDeviceGetHandleBy* returns (a pointer in the real module)."""

    __slots__ = ("gpu", "epoch")

    def __init__(self, gpu: _Gpu) -> None:
        self.gpu, self.epoch = gpu, gpu.epoch

    def __repr__(self) -> str:
        return f"<fake nvmlDevice_t GPU {self.gpu.index}>"


# -- the scenario file -------------------------------------------------------------

_SCRIPT = os.environ.get("FAKE_NVML_SCRIPT") or None
_STATS = os.environ.get("FAKE_NVML_STATS") or None
_script_key: Any = None
_next_check = 0.0
_init_fault: int | str | None = None
_reload_lock = threading.Lock()
_state_lock = threading.Lock()
_refcount = 0
_started = False  # the script read at import is the starting state, not a change


def _poll_script(force: bool = False) -> None:
    global _next_check, _script_key
    if _SCRIPT is None:
        return
    now = time.monotonic()
    if not force and now < _next_check:
        return
    if not _reload_lock.acquire(blocking=force):
        return
    try:
        _next_check = now + 0.05
        try:
            st = os.stat(_SCRIPT)
            key: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            key = None
        if key == _script_key:
            return
        _script_key = key
        script: dict[str, Any] = {}
        if key is not None:
            try:
                with open(_SCRIPT, encoding="utf-8") as f:
                    text = f.read()
                script = json.loads(text) if text.strip() else {}
            except (OSError, ValueError) as exc:  # half-written: try again on the next check
                print(f"fake pynvml: cannot read {_SCRIPT}: {exc}", file=sys.stderr)
                _script_key = None
                return
        _apply(script, first=not _started)
    finally:
        _reload_lock.release()


def _apply(script: dict[str, Any], first: bool) -> None:
    global _init_fault
    init = script.get("init")
    _init_fault = None if init in (None, "", "ok") else ("hang" if init == "hang" else _error_code(init))
    per_gpu = script.get("gpus") or {}
    for g in _GPUS:
        s = per_gpu.get(str(g.index)) or {}
        fail = s.get("fail")
        g.hang = bool(s.get("hang"))
        g.fail = None if fail in (None, "", False) else _error_code(fail)
        g.delay = float(s.get("delay") or 0.0)
        fns = s.get("functions")
        g.functions = frozenset(fns) if fns else None
        g.unsupported = frozenset(s.get("unsupported") or ())
        g.processes = [(int(p), int(m)) for p, m in s.get("processes") or ()]
        g.faulty = g.hang or g.fail is not None or g.delay > 0 or bool(g.unsupported)
        lost = bool(s.get("lost"))
        with _state_lock:
            if lost and not g.lost:
                g.lost, g.awaiting_init = True, False
                g.epoch += 1  # every handle out there is now stale
            elif not lost and g.lost:
                g.lost, g.awaiting_init = False, True
        token = s.get("counter_reset")
        if token != g.reset_token:
            if not first and token is not None:
                g.counter_zero_j = g.energy_j(time.monotonic())
            g.reset_token = token
        watts = None if s.get("watts") is None else float(s["watts"])
        if first and watts is not None:
            # Constant since boot: the counter is then the same function of the monotonic clock
            # in every process, as a real GPU's is (an agent restarted on the same boot reads on).
            g.segments = [(0.0, 0.0, watts)]
        else:
            g.set_watts(watts)


def _applies(g: _Gpu, fn: str) -> bool:
    return g.functions is None or fn in g.functions


def _faults(g: _Gpu, fn: str) -> None:
    """The scripted behaviour of one call (slow path: only for a GPU with faults set)."""
    if fn in g.unsupported:
        raise NVMLError(_NOT_SUPPORTED)
    if g.hang and _applies(g, fn):
        _write_stats(force=True)  # the file shows the call that is about to hang
    while g.hang and _applies(g, fn):
        time.sleep(0.02)
        _poll_script(force=True)
    if g.delay and _applies(g, fn):
        time.sleep(g.delay)
    if g.fail is not None and _applies(g, fn):
        raise NVMLError(g.fail)


def _check_init() -> None:
    if _refcount <= 0:
        raise NVMLError(_real.NVML_ERROR_UNINITIALIZED)


_last_stats = 0.0
#: nvmlInit calls: made, in progress now, most ever in progress at once (in the statistics file as "init").
_init_stats = {"calls": 0, "inflight": 0, "max_inflight": 0}


def _write_stats(force: bool = False) -> None:
    global _last_stats
    now = time.monotonic()
    if _STATS is None or (not force and now - _last_stats < 0.2):
        return
    _last_stats = now
    body: dict[str, Any] = {str(g.index): {"calls": g.calls, "inflight": g.inflight, "max_inflight": g.max_inflight}
                            for g in _GPUS}
    body["init"] = dict(_init_stats)
    tmp = f"{_STATS}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f)
        os.replace(tmp, _STATS)
    except OSError:
        pass


if _STATS is not None:
    atexit.register(_write_stats, True)


# -- what each call costs on a real H100 ---------------------------------------------

#: CPU of one call on the H100 of ``shared/reference/h100`` (driver 580.159.04), µs: where
#: ``probe2.json`` measured CPU time (``process_time``) that figure, else ``probe.json``'s median
#: wall time, which is CPU for these calls (probe2.json: wall and CPU agree within 1 %). Summed
#: over a tick's eight cheap reads this is 29 µs against probe2's measured 33.5 µs
#: ("cheap_tick"); this module's own Python adds ~0.7 µs a call. Absent: ``_COST_DEFAULT_US``.
_COST_US: dict[str, float] = {
    "nvmlDeviceGetTotalEnergyConsumption": 3816.6,  # probe2 energy.cpu_us (under load: 9179.7)
    "nvmlDeviceGetSamples": 386.5,  # probe2 samples.cpu_us
    "nvmlDeviceGetPowerManagementLimit": 148.8,  # probe2 limit.cpu_us
    "nvmlDeviceGetPowerUsage": 3.8,  # probe2 power.cpu_us
    "nvmlDeviceGetUtilizationRates": 3.37,  # probe2 util.cpu_us
    "nvmlDeviceGetComputeRunningProcesses": 10.48,  # probe2 procs.cpu_us
    "nvmlDeviceGetComputeRunningProcesses_v3": 10.48,
    "nvmlDeviceGetGraphicsRunningProcesses": 6.8,  # probe.json medians from here on
    "nvmlDeviceGetGraphicsRunningProcesses_v3": 6.8,
    "nvmlDeviceGetMemoryInfo": 5.57,
    "nvmlDeviceGetBAR1MemoryInfo": 135.6,
    "nvmlDeviceGetTemperature": 1.17,
    "nvmlDeviceGetClockInfo": 1.19,
    "nvmlDeviceGetMaxClockInfo": 1232.1,
    "nvmlDeviceGetPerformanceState": 1.43,
    "nvmlDeviceGetCurrentClocksEventReasons": 1.94,
    "nvmlDeviceGetCurrentClocksThrottleReasons": 1.48,
    "nvmlDeviceGetEnforcedPowerLimit": 1.0,
    "nvmlDeviceGetPowerManagementDefaultLimit": 0.93,
    "nvmlDeviceGetPowerManagementLimitConstraints": 1.21,
    "nvmlDeviceGetName": 1.73,
    "nvmlDeviceGetUUID": 2.13,
    "nvmlDeviceGetSerial": 1.64,
    "nvmlDeviceGetMinorNumber": 0.86,
    "nvmlDeviceGetBrand": 0.88,
    "nvmlDeviceGetArchitecture": 0.89,
    "nvmlDeviceGetCudaComputeCapability": 1.14,
    "nvmlDeviceGetPersistenceMode": 3.83,
    "nvmlDeviceGetComputeMode": 3.4,
    "nvmlDeviceGetMigMode": 136.0,
    "nvmlDeviceGetPcieThroughput": 1.2,  # CPU not measured: charged as a cheap read, see _WAIT_US
}
_COST_DEFAULT_US = 1.2
#: Wall time a call spends in the driver beyond its CPU, µs (probe.json medians): slept.
_WAIT_US: dict[str, float] = {"nvmlDeviceGetPcieThroughput": 20937.0}
_COSTED = os.environ.get("FAKE_NVML_COST", "0") not in ("", "0")
_COST_SCALE = float(os.environ.get("FAKE_NVML_COST_SCALE") or 1.0)
_thread_ns = time.thread_time_ns
_BURN = bytes(4096)  # sha1 of 4 KiB: ~3-6 µs of CPU, the GIL released (CPython does for > 2 KiB)


def _spend(name: str, start_ns: int) -> None:
    """Bring the CPU this thread spent on the call since ``start_ns`` (this module's Python
    included) up to what the H100 spent on it, busy; then wait as the driver waits."""
    end = start_ns + int(_COST_US.get(name, _COST_DEFAULT_US) * _COST_SCALE * 1000.0)
    if end - _thread_ns() > 20_000:
        sha1 = hashlib.sha1
        while end - _thread_ns() > 10_000:
            sha1(_BURN).digest()
    while _thread_ns() < end:
        pass
    wait = _WAIT_US.get(name)
    if wait:
        time.sleep(wait / 1e6)


def _api(fn: Any) -> Any:
    """A simulated function: listed as implemented (see _nvmlGetFunctionPointer)."""
    _IMPLEMENTED.add(fn.__name__)
    return fn


def _device(fn: Any) -> Any:
    """A per-GPU function: its first argument is a handle; init, lost and scripted faults apply."""
    name = fn.__name__
    _IMPLEMENTED.add(name)

    def call(handle: Any, *args: Any, **kwargs: Any) -> Any:
        if _refcount <= 0:
            raise NVMLError(_real.NVML_ERROR_UNINITIALIZED)
        if _SCRIPT is not None:
            _poll_script()
        g = handle.gpu
        if _STATS is None:
            if g.faulty:
                _faults(g, name)
            if handle.epoch != g.epoch or g.lost:
                raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
            return fn(g, *args, **kwargs)
        with _state_lock:
            g.calls += 1
            g.inflight += 1
            g.max_inflight = max(g.max_inflight, g.inflight)
        try:
            _write_stats()
            if g.faulty:
                _faults(g, name)
            if handle.epoch != g.epoch or g.lost:
                raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
            return fn(g, *args, **kwargs)
        finally:
            with _state_lock:
                g.inflight -= 1

    if _COSTED:
        plain = call

        def call(handle: Any, *args: Any, **kwargs: Any) -> Any:
            start = _thread_ns()
            try:
                return plain(handle, *args, **kwargs)
            finally:
                _spend(name, start)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call


# -- library ----------------------------------------------------------------------

def _init_wait() -> None:
    _poll_script(force=True)
    while _init_fault == "hang":
        time.sleep(0.02)
        _poll_script(force=True)


@_api
def nvmlInitWithFlags(flags: int) -> None:
    global _refcount
    with _state_lock:
        _init_stats["calls"] += 1
        _init_stats["inflight"] += 1
        _init_stats["max_inflight"] = max(_init_stats["max_inflight"], _init_stats["inflight"])
    _write_stats(force=True)
    try:
        _init_wait()
    finally:
        with _state_lock:
            _init_stats["inflight"] -= 1
        _write_stats(force=True)
    if _init_fault is not None:
        raise NVMLError(_init_fault)
    with _state_lock:
        _refcount += 1
        for g in _GPUS:  # a GPU back from "lost" is attached again by an init
            if g.awaiting_init:
                g.awaiting_init = False
                g.epoch += 1
    return None


@_api
def nvmlInit() -> None:
    nvmlInitWithFlags(0)


@_api
def nvmlShutdown() -> None:
    global _refcount
    _check_init()
    with _state_lock:
        _refcount -= 1


@_api
def nvmlSystemGetDriverVersion() -> str:
    _check_init()
    return "580.159.04"


@_api
def nvmlSystemGetNVMLVersion() -> str:
    _check_init()
    return "13.580.159.04"


@_api
def nvmlSystemGetCudaDriverVersion() -> int:
    _check_init()
    return 13000


@_api
def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return nvmlSystemGetCudaDriverVersion()


@_api
def nvmlDeviceGetCount() -> int:
    _check_init()
    return len(_GPUS)


def _handle_for(g: _Gpu, fn: str) -> _Handle:
    _check_init()
    _poll_script()
    if g.faulty:
        _faults(g, fn)
    if g.lost or g.awaiting_init:
        raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
    return _Handle(g)


@_api
def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if not 0 <= index < len(_GPUS):
        _check_init()
        raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
    return _handle_for(_GPUS[index], "nvmlDeviceGetHandleByIndex")


def _lookup(attr: str, value: Any, fn: str) -> _Handle:
    text = value.decode() if isinstance(value, bytes) else str(value)
    for g in _GPUS:
        if getattr(g, attr) == text:
            return _handle_for(g, fn)
    _check_init()
    raise NVMLError(_real.NVML_ERROR_NOT_FOUND)


@_api
def nvmlDeviceGetHandleByUUID(uuid: Any) -> _Handle:
    return _lookup("uuid", uuid, "nvmlDeviceGetHandleByUUID")


@_api
def nvmlDeviceGetHandleBySerial(serial: Any) -> _Handle:
    return _lookup("serial", serial, "nvmlDeviceGetHandleBySerial")


@_api
def nvmlDeviceGetHandleByPciBusId(bus_id: Any) -> _Handle:
    return _lookup("pci_bus_id", bus_id, "nvmlDeviceGetHandleByPciBusId")


# -- inventory --------------------------------------------------------------------

_MEMORY_TOTAL = 85520809984


@_device
def nvmlDeviceGetIndex(g: _Gpu) -> int:
    return g.index


@_device
def nvmlDeviceGetMinorNumber(g: _Gpu) -> int:
    return g.index


@_device
def nvmlDeviceGetUUID(g: _Gpu) -> str:
    return g.uuid


@_device
def nvmlDeviceGetName(g: _Gpu) -> str:
    return "NVIDIA H100 80GB HBM3"


@_device
def nvmlDeviceGetSerial(g: _Gpu) -> str:
    return g.serial


@_device
def nvmlDeviceGetBrand(g: _Gpu) -> int:
    return _real.NVML_BRAND_NVIDIA


@_device
def nvmlDeviceGetArchitecture(g: _Gpu) -> int:
    return getattr(_real, "NVML_DEVICE_ARCH_HOPPER", 9)


@_device
def nvmlDeviceGetCudaComputeCapability(g: _Gpu) -> tuple[int, int]:
    return (9, 0)


def _pci_info(g: _Gpu) -> Any:
    info = _real.nvmlPciInfo_t()
    info.busId = g.pci_bus_id.encode()
    info.busIdLegacy = g.pci_bus_id[4:].encode()
    info.domain, info.bus, info.device = 0, 0x18 + 0x10 * g.index, 0
    info.pciDeviceId = 0x233010DE
    info.pciSubSystemId = 0x16C110DE
    return info


@_device
def nvmlDeviceGetPciInfo(g: _Gpu) -> Any:
    return _pci_info(g)


@_device
def nvmlDeviceGetPciInfo_v3(g: _Gpu) -> Any:
    return _pci_info(g)


@_device
def nvmlDeviceGetPersistenceMode(g: _Gpu) -> int:
    return _real.NVML_FEATURE_ENABLED


@_device
def nvmlDeviceGetComputeMode(g: _Gpu) -> int:
    return _real.NVML_COMPUTEMODE_DEFAULT


@_device
def nvmlDeviceGetMigMode(g: _Gpu) -> list[int]:
    """MIG off (current, pending), as on the probed H100."""
    return [_real.NVML_DEVICE_MIG_DISABLE, _real.NVML_DEVICE_MIG_DISABLE]


@_device
def nvmlDeviceGetDisplayActive(g: _Gpu) -> int:
    return _real.NVML_FEATURE_DISABLED


@_device
def nvmlDeviceGetDisplayMode(g: _Gpu) -> int:
    return _real.NVML_FEATURE_DISABLED


# -- per-tick readings ------------------------------------------------------------

_now = time.monotonic
#: Sets a field of a real nvidia-ml-py structure without its Python-level __setattr__ (which only
#: encodes str values; these are numbers): a fifth of the cost.
_set = ctypes.Structure.__setattr__


@_device
def nvmlDeviceGetPowerUsage(g: _Gpu) -> int:
    """Average over the last second, as on Hopper. Units: mW."""
    t = _now()
    return int(round((g.energy_j(t) - g.energy_j(t - 1.0)) * 1000.0))


@_device
def nvmlDeviceGetTotalEnergyConsumption(g: _Gpu) -> int:
    """The exact integral of power since boot or the last reset. Units: mJ."""
    return int((g.energy_j(_now()) - g.counter_zero_j) * 1000.0)


@_device
def nvmlDeviceGetEnforcedPowerLimit(g: _Gpu) -> int:
    return 700_000


@_device
def nvmlDeviceGetPowerManagementLimit(g: _Gpu) -> int:
    return 700_000


@_device
def nvmlDeviceGetPowerManagementDefaultLimit(g: _Gpu) -> int:
    return 700_000


@_device
def nvmlDeviceGetPowerManagementLimitConstraints(g: _Gpu) -> list[int]:
    return [200_000, 700_000]


def _load(g: _Gpu, t: float) -> float:
    """Utilisation implied by power (100 W idle, 700 W full). Units: ratio."""
    return min(1.0, max(0.0, (g.power_w(t) - 100.0) / 600.0))


@_device
def nvmlDeviceGetUtilizationRates(g: _Gpu) -> Any:
    u = _load(g, _now())
    util = _real.c_nvmlUtilization_t()
    _set(util, "gpu", int(round(100 * u)))
    _set(util, "memory", int(round(45 * u)))
    return util


def _memory(g: _Gpu, version: Any = None) -> Any:
    used = 503_316_480 + int(0.6 * _MEMORY_TOTAL * _load(g, _now()))
    if version:
        mem = _real.c_nvmlMemory_v2_t()
        mem.version, mem.reserved = version, 567_279_616
    else:
        mem = _real.c_nvmlMemory_t()
    _set(mem, "total", _MEMORY_TOTAL)
    _set(mem, "used", used)
    _set(mem, "free", _MEMORY_TOTAL - used)
    return mem


@_device
def nvmlDeviceGetMemoryInfo(g: _Gpu, version: Any = None) -> Any:
    return _memory(g, version)


@_device
def nvmlDeviceGetBAR1MemoryInfo(g: _Gpu) -> Any:
    bar1 = _real.c_nvmlBAR1Memory_t()
    bar1.bar1Total, bar1.bar1Used = 131_072 * 1024 * 1024, 2 * 1024 * 1024
    bar1.bar1Free = bar1.bar1Total - bar1.bar1Used
    return bar1


@_device
def nvmlDeviceGetTemperature(g: _Gpu, sensor: int) -> int:
    return int(round(28.0 + g.power_w(_now()) / 15.0))


_CLOCKS = {_real.NVML_CLOCK_MEM: 2619, _real.NVML_CLOCK_VIDEO: 1755}  # MHz; any other clock 1980


@_device
def nvmlDeviceGetClockInfo(g: _Gpu, clock_type: int) -> int:
    return _CLOCKS.get(clock_type, 1980)


@_device
def nvmlDeviceGetMaxClockInfo(g: _Gpu, clock_type: int) -> int:
    return _CLOCKS.get(clock_type, 1980)


@_device
def nvmlDeviceGetPerformanceState(g: _Gpu) -> int:
    return _real.NVML_PSTATE_0


@_device
def nvmlDeviceGetCurrentClocksEventReasons(g: _Gpu) -> int:
    """GpuIdle (0x1) under 150 W, otherwise none."""
    return 0x1 if g.power_w(_now()) < 150.0 else 0x0


@_device
def nvmlDeviceGetCurrentClocksThrottleReasons(g: _Gpu) -> int:
    return 0x1 if g.power_w(_now()) < 150.0 else 0x0


@_device
def nvmlDeviceGetFanSpeed(g: _Gpu) -> int:
    raise NVMLError(_NOT_SUPPORTED)  # H100 SXM: no fan


@_device
def nvmlDeviceGetPcieThroughput(g: _Gpu, counter: int) -> int:
    return 1024 * (1 + g.index)  # KB/s


@_device
def nvmlDeviceGetSamples(g: _Gpu, sampling_type: int, since_us: int) -> tuple[int, list[Any]]:
    """The ring buffer: power samples every 20 ms over the last 2.4 s newer than ``since_us``."""
    if sampling_type != _real.NVML_TOTAL_POWER_SAMPLES:
        raise NVMLError(_NOT_SUPPORTED)
    now_us = int((_now() + _WALL_OFFSET) * 1e6)
    first = max(int(since_us) + 1, now_us - _BUFFER_US)
    first = -(-first // _SAMPLE_US) * _SAMPLE_US
    if first > now_us:
        raise NVMLError(_real.NVML_ERROR_NOT_FOUND)  # nothing newer: what the driver answers
    out = []
    for ts in range(first, now_us + 1, _SAMPLE_US):
        s = _real.c_nvmlSample_t()
        s.timeStamp = ts
        s.sampleValue.uiVal = int(round(g.power_w(ts / 1e6 - _WALL_OFFSET) * 1000.0))
        out.append(s)
    return _real.NVML_VALUE_TYPE_UNSIGNED_INT, out


def _processes(g: _Gpu) -> list[Any]:
    out = []
    for pid, mem in g.processes:
        p = _real.c_nvmlProcessInfo_t()
        p.pid, p.usedGpuMemory = pid, mem
        p.gpuInstanceId = p.computeInstanceId = 0xFFFFFFFF
        out.append(p)
    return out


@_device
def nvmlDeviceGetComputeRunningProcesses(g: _Gpu) -> list[Any]:
    return _processes(g)


@_device
def nvmlDeviceGetComputeRunningProcesses_v3(g: _Gpu) -> list[Any]:
    return _processes(g)


@_device
def nvmlDeviceGetGraphicsRunningProcesses(g: _Gpu) -> list[Any]:
    return []


@_device
def nvmlDeviceGetGraphicsRunningProcesses_v3(g: _Gpu) -> list[Any]:
    return []


# -- everything else ----------------------------------------------------------------

def _not_supported(name: str) -> Any:
    def stub(*_args: Any, **_kwargs: Any) -> Any:
        _check_init()
        raise NVMLError(_NOT_SUPPORTED)

    stub.__name__ = stub.__qualname__ = name
    return stub


for _name, _value in vars(_real).items():
    if _name.startswith("nvml") and callable(_value) and _name not in _IMPLEMENTED \
            and not isinstance(_value, type) and _name not in ("nvmlExceptionClass", "nvmlStructToFriendlyObject",
                                                               "nvmlFriendlyObjectToStruct"):
        globals()[_name] = _not_supported(_name)


# -- the C calling convention, for tools that call through _nvmlGetFunctionPointer -----------
# (nvitop's libnvml does, for these): outputs by reference, a status code returned.


def _c_status(fn: Any) -> Any:
    def c_call(*args: Any) -> int:
        try:
            fn(*args)
        except NVMLError as exc:
            return exc.value
        return _real.NVML_SUCCESS
    return c_call


def _c_memory_info(handle: Any, out: Any) -> None:
    struct = out._obj
    mem = nvmlDeviceGetMemoryInfo(handle, getattr(struct, "version", None))
    for name, _ in type(struct)._fields_:
        setattr(struct, name, getattr(mem, name))


def _c_temperature(handle: Any, sensor: Any, out: Any) -> None:
    out._obj.value = nvmlDeviceGetTemperature(handle, sensor.value)


def _c_processes(name: str) -> Any:
    def c_call(handle: Any, count: Any, array: Any) -> int:
        try:
            procs = globals()[name](handle)
        except NVMLError as exc:
            return exc.value
        if not procs:
            count._obj.value = 0
            return _real.NVML_SUCCESS
        if array is None or count._obj.value < len(procs):
            count._obj.value = len(procs)
            return _real.NVML_ERROR_INSUFFICIENT_SIZE
        for i, p in enumerate(procs):
            for field, _ in type(array[i])._fields_:
                if hasattr(p, field):
                    setattr(array[i], field, getattr(p, field))
        count._obj.value = len(procs)
        return _real.NVML_SUCCESS
    return c_call


def _nvmlGetFunctionPointer(name: str) -> Any:
    """Tools probe for optional functions with this: only the simulated ones 'exist', in the
    C calling convention where a tool calls them through the pointer."""
    if name not in _IMPLEMENTED:
        raise NVMLError(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
    if name.startswith("nvmlDeviceGetMemoryInfo"):
        return _c_status(_c_memory_info)
    if name == "nvmlDeviceGetTemperature":
        return _c_status(_c_temperature)
    if "RunningProcesses" in name:
        return _c_processes(name)
    return globals()[name]


def nvmlErrorString(result: int) -> str:
    return NVMLError._errcode_to_string.get(result, f"NVML Error with code {result}")


def _LoadNvmlLibrary() -> None:
    return None


_real.nvmlErrorString = nvmlErrorString  # what the real NVMLError.__str__ calls for unnamed codes


_poll_script(force=True)  # the starting state
_started = True
