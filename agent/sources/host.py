"""Host (non-GPU) power: CPU packages, DRAM and a static platform overhead.

Two ways to get CPU and DRAM power, chosen once at start (``[host] mode``):

* ``rapl``: exact energy counters from Linux powercap (see :mod:`.rapl`).
* ``model``: a linear utilisation model, for VMs and clouds, where there is
  no ``/sys/class/powercap``, or where ``energy_uj`` is root-only::

      cpu_watts      = cpu_idle_watts + (cpu_max_watts - cpu_idle_watts) × util
      dram_watts     = memory_watts_per_gib × installed GiB
      platform_watts = static figure from the config

``auto`` (the default) uses RAPL when it can read it and falls back to the
model otherwise, logging one line that says why (also :meth:`HostPowerSource.describe`).
With RAPL and no dram zone (AMD, most client CPUs), DRAM is modelled.

Every read is cheap (a few small sysfs/procfs reads, no subprocess): safe to
call once per tick from the sampling thread.

Energy accounting per read:

* The first read only establishes baselines: every component has
  ``joules == 0.0`` and the sample has ``baseline = True``; RAPL watts are 0.0
  then (no interval yet), model watts are the model's current figure.
* Later reads give the energy since the previous read. RAPL joules are exact
  (counter deltas, wrap-around undone). Model joules are ``watts × dt``: the
  CPU utilisation is the *average over that same interval* (CPU-time deltas,
  as ``psutil.cpu_percent(interval=None)``), and the model is linear in it, so
  this rectangle is exact for the model; a trapezoid over two interval averages
  would smear each interval's load into the next one.

Units: power W, energy J, time s, memory bytes.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ipmi import IpmiConfig
from .rapl import DEFAULT_POWERCAP_ROOT, RaplDelta, RaplReader, RaplUnavailable, ReadText, energy_delta_uj

log = logging.getLogger(__name__)

GIB = 1024**3

#: Default idle power per logical CPU (vCPU / hardware thread), W. Fleet
#: averages from SPECpower results as used by Cloud Carbon Footprint (AWS
#: 0.74, GCP 0.71, Azure 0.78 W per vCPU at 0 % utilisation).
DEFAULT_CPU_IDLE_WATTS_PER_CPU = 0.75
#: Default full-load power per logical CPU, W. Same source (AWS 3.5 W per vCPU
#: at 100 %); cf. a 350 W TDP, 56-core/112-thread Xeon 8480+ = 3.1 W/thread.
DEFAULT_CPU_MAX_WATTS_PER_CPU = 3.5
#: Default DRAM power per GiB installed, W. Green Algorithms uses 0.3725 W/GB and
#: Cloud Carbon Footprint 0.392 W/GB; likely high for large DDR5 RDIMMs.
DEFAULT_MEMORY_WATTS_PER_GIB = 0.375
#: Default static platform power, W: 0 because in a VM the fans, NICs, drives
#: and PSU losses are the provider's; set it on bare metal (see docs/host-power.md).
DEFAULT_PLATFORM_WATTS = 0.0
#: Upper bound of a configured whole-host watt figure: a typo (1e308) must not poison totals.
MAX_HOST_WATTS = 100_000.0
#: Upper bound of ``memory_watts_per_gib`` (DDR4/DDR5 draw well under 1 W/GiB).
MAX_MEMORY_WATTS_PER_GIB = 10.0

#: Below this interval (s), zero RAPL package energy is not taken as "frozen counters".
_FROZEN_CHECK_MIN_DT = 0.5
#: Highest average power one RAPL zone (a package, or its DRAM) is taken to draw while no agent
#: ran, W: the largest server CPUs are rated 500 W. It bounds the gap a restart can bridge, so
#: that a counter cannot have wrapped more than once in it (a 262 kJ range: 262 s).
MAX_RAPL_ZONE_WATTS = 1000.0
_DOC_HINT = "see docs/host-power.md"


class HostConfig(BaseModel):
    """TOML table ``[host]``. Watt figures are whole-host totals, not per CPU."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: "auto": RAPL if readable, else model. "rapl": RAPL or fail at start. "model": never RAPL.
    mode: Literal["auto", "rapl", "model"] = "auto"
    powercap_root: Path = DEFAULT_POWERCAP_ROOT
    #: Whole-CPU power at 0 % utilisation, W. Unset: 0.75 W × logical CPUs.
    cpu_idle_watts: float | None = Field(default=None, ge=0, le=MAX_HOST_WATTS, allow_inf_nan=False)
    #: Whole-CPU power at 100 % utilisation, W. Unset: 3.5 W × logical CPUs.
    cpu_max_watts: float | None = Field(default=None, ge=0, le=MAX_HOST_WATTS, allow_inf_nan=False)
    #: DRAM power per GiB of installed memory, W/GiB.
    memory_watts_per_gib: float = Field(
        default=DEFAULT_MEMORY_WATTS_PER_GIB, ge=0, le=MAX_MEMORY_WATTS_PER_GIB, allow_inf_nan=False
    )
    #: Static overhead (fans, NICs, drives, BMC, PSU losses), W.
    platform_watts: float = Field(default=DEFAULT_PLATFORM_WATTS, ge=0, le=MAX_HOST_WATTS, allow_inf_nan=False)
    ipmi: IpmiConfig = Field(default_factory=IpmiConfig)

    @model_validator(mode="after")
    def _idle_le_max(self) -> "HostConfig":
        if self.cpu_idle_watts is not None and self.cpu_max_watts is not None:
            if self.cpu_max_watts < self.cpu_idle_watts:
                raise ValueError(
                    f"cpu_max_watts ({self.cpu_max_watts}) must be >= cpu_idle_watts ({self.cpu_idle_watts})"
                )
        return self


def logical_cpus() -> int:
    """This machine's logical CPUs, which the default CPU figures are scaled by (1 if unknown)."""
    n = os.cpu_count()  # what psutil.cpu_count() reads on Linux: online CPUs from sysconf
    return int(n) if n and n > 0 else 1


@dataclass(frozen=True)
class CpuHost:
    """The machine the host power model describes, whose logical CPUs scale the CPU model's
    unset figures: this machine for ``run``, the recorded one for a replay (its trace's
    ``host.cpu_count``). ``name`` says which in error messages."""

    cpus: int
    name: str = "this machine"

    @classmethod
    def local(cls) -> "CpuHost":
        return cls(logical_cpus())


def resolve_cpu_watts(cfg: HostConfig, cpu_count: int) -> tuple[float, float]:
    """Whole-CPU (idle, max) watts of the model: the configured figures, else the per-CPU
    defaults × ``cpu_count``. The caller checks that max is not below idle."""
    idle = cfg.cpu_idle_watts if cfg.cpu_idle_watts is not None else DEFAULT_CPU_IDLE_WATTS_PER_CPU * cpu_count
    peak = cfg.cpu_max_watts if cfg.cpu_max_watts is not None else DEFAULT_CPU_MAX_WATTS_PER_CPU * cpu_count
    return idle, peak


@dataclass(frozen=True)
class HostComponent:
    """One part of the host's power.

    ``component``: "cpu" | "dram" | "platform". ``socket``: package number as a
    string for RAPL ("0", "1"), ``None`` when modelled for the whole host.
    ``source``: "rapl" | "model" | "static". ``watts``: mean power over the
    interval since the previous read, W. ``joules``: energy over that interval, J.
    """

    component: str
    socket: str | None
    source: str
    watts: float
    joules: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "socket": self.socket,
            "source": self.source,
            "watts": self.watts,
            "joules": self.joules,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HostComponent":
        try:
            socket = d.get("socket")
            return cls(
                component=str(d["component"]),
                socket=None if socket is None else str(socket),
                source=str(d["source"]),
                watts=float(d["watts"]),
                joules=float(d["joules"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad host component {d!r}: {exc}") from None


@dataclass(frozen=True)
class RaplMark:
    """Where a run's host energy totals end: each counted RAPL zone's counter at the last read
    whose energy is in them, zone id -> (µJ, ``max_energy_range_uj``), and that read's monotonic
    time (s). Persisted with the boot id (``host_counters``), so that an agent restarted on the
    same boot counts, from the counters, the host energy used while none ran."""

    counters: dict[str, tuple[int, int]]
    mono: float

    def to_state(self, boot_id: str) -> dict[str, Any]:
        zones = [[zone, uj, span] for zone, (uj, span) in sorted(self.counters.items())]
        return {"boot_id": boot_id, "mono": self.mono, "zones": zones}

    @classmethod
    def from_state(cls, data: Any, boot_id: str | None) -> "RaplMark | None":
        """The mark of a state's ``host_counters`` when saved on boot ``boot_id``, else None
        (the counters and the monotonic clock restart with a reboot). Raises ValueError for a
        malformed entry (the whole state is then set aside, as for any value)."""
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("zones"), list):
            raise ValueError("host_counters: expected an object with a list of zones")
        counters: dict[str, tuple[int, int]] = {}
        for i, row in enumerate(data["zones"]):
            ok = (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and 0 < len(row[0]) <= 256
                  and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in row[1:]))
            if not ok or row[0] in counters:
                raise ValueError(f"host_counters.zones[{i}]: expected [zone id, counter µJ, range µJ]")
            counters[row[0]] = (row[1], row[2])
        mono = data.get("mono")
        if isinstance(mono, bool) or not isinstance(mono, (int, float)) or not 0 <= mono < 1e10:
            raise ValueError("host_counters.mono: expected monotonic seconds")
        if boot_id is None or data.get("boot_id") != boot_id:
            return None
        return cls(counters, float(mono))


@dataclass(frozen=True)
class HostSample:
    """Host readings at one tick (``t_mono``: the caller's monotonic clock, s).

    ``cpu_util_ratio``: 0..1 average since the previous read. ``mem_used_bytes``
    is ``total - available`` (memory really in use, not page cache).
    ``baseline``: True on the first read, whose joules are all 0.0, except that a first read
    that continues an earlier run's RAPL counters (:meth:`HostPowerSource.resume`) gives its
    ``rapl`` components the energy since that run's last read, at monotonic ``bridged_since``.
    """

    t_mono: float
    cpu_util_ratio: float
    mem_used_bytes: int
    mem_total_bytes: int
    components: tuple[HostComponent, ...]
    baseline: bool = False
    bridged_since: float | None = None

    @property
    def watts(self) -> float:
        """Sum of all components, W (components never overlap)."""
        return math.fsum(c.watts for c in self.components)

    @property
    def joules(self) -> float:
        """Sum of all components' energy since the previous read, J."""
        return math.fsum(c.joules for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for traces; inverse of :meth:`from_dict`."""
        return {
            "t_mono": self.t_mono,
            "cpu_util_ratio": self.cpu_util_ratio,
            "mem_used_bytes": self.mem_used_bytes,
            "mem_total_bytes": self.mem_total_bytes,
            "baseline": self.baseline,
            "components": [c.to_dict() for c in self.components],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HostSample":
        """Rebuild a sample from :meth:`to_dict` output. Raises ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"host sample must be an object, got {type(d).__name__}")
        comps = d.get("components", [])
        if not isinstance(comps, list):
            raise ValueError("host sample 'components' must be a list")
        try:
            return cls(
                t_mono=float(d["t_mono"]),
                cpu_util_ratio=float(d["cpu_util_ratio"]),
                mem_used_bytes=int(d["mem_used_bytes"]),
                mem_total_bytes=int(d["mem_total_bytes"]),
                components=tuple(HostComponent.from_dict(c) for c in comps),
                baseline=bool(d.get("baseline", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad host sample: missing or wrong field {exc}") from None


# -- per-tick reads of /proc ------------------------------------------------
# The values psutil.cpu_times() and psutil.virtual_memory() give, read through a file
# descriptor kept open (one pread per tick, no open/close) and without parsing every field
# of /proc/meminfo: the host read was the largest part of an 8-GPU tick.

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuTimes(NamedTuple):
    """Whole-machine CPU times since boot, as psutil.cpu_times() (first line of /proc/stat). Units: s."""

    user: float
    nice: float
    system: float
    idle: float
    iowait: float
    irq: float
    softirq: float
    steal: float


class MemoryTotals(NamedTuple):
    """Installed and available memory, as psutil.virtual_memory() gives them. Units: bytes."""

    total: int
    available: int


class _ProcHead:
    """The first ``size`` bytes of a /proc file, fresh at every call, through one open descriptor."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = None

    def __call__(self) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(self._fd, self.size, 0)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise


_stat_head = _ProcHead("/proc/stat", 512)
_meminfo_head = _ProcHead("/proc/meminfo", 512)


def proc_cpu_times() -> Any:
    """CPU times from ``/proc/stat``; psutil's reading where the line is not what Linux writes."""
    fields = _stat_head().split(b"\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != b"cpu":
        import psutil

        return psutil.cpu_times()
    return CpuTimes(*[float(x) / _CLK_TCK for x in fields[1:9]])


def proc_memory() -> Any:
    """MemTotal and MemAvailable from ``/proc/meminfo``; psutil's estimate where MemAvailable
    is missing (Linux before 3.14) or odd (0, above the total)."""
    total = available = None
    for line in _meminfo_head().split(b"\n"):
        if line.startswith(b"MemTotal:"):
            total = int(line.split()[1]) * 1024
        elif line.startswith(b"MemAvailable:"):
            available = int(line.split()[1]) * 1024
            break
    if total is None or not available or available > total:
        import psutil

        return psutil.virtual_memory()
    return MemoryTotals(total, available)


class CpuUtilMeter:
    """CPU utilisation since the previous call, percent (0..100), from CPU-time deltas.

    Like ``psutil.cpu_percent(interval=None)`` but with its own state, so other
    callers of psutil in the process do not shorten our interval. Busy =
    user + nice + system + irq + softirq (guest time is already inside user);
    steal is time the hypervisor gave to someone else, so it is not ours.
    """

    def __init__(self, cpu_times: Callable[[], Any] = proc_cpu_times) -> None:
        self._times = cpu_times
        self._last = self._split(cpu_times())

    @staticmethod
    def _split(t: Any) -> tuple[float, float]:
        busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        rest = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
        return busy, busy + rest

    def __call__(self) -> float:
        busy, total = self._split(self._times())
        d_busy, d_total = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        if d_total <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * d_busy / d_total))


def _as_callable(v: Any) -> Callable[[], Any]:
    return v if callable(v) else (lambda: v)


class HostPowerSource:
    """Reads host power once per tick. See the module docstring for the modes.

    Injectable for tests: ``cpu_percent() -> percent 0..100`` (average since the
    previous call), ``virtual_memory() -> object with .total and .available``
    (bytes), ``cpu_count`` (int or callable), ``read_text(path) -> str`` for the
    powercap files. ``powercap_root`` overrides ``cfg.powercap_root``. ``model_reason``: why
    ``mode = "model"`` (a replay sets it to model the recorded host), said where the mode is.

    Raises :class:`~.rapl.RaplUnavailable` at construction only in ``mode = "rapl"``
    when RAPL cannot be read, and ``ValueError`` when the resolved CPU idle
    figure exceeds the max figure.
    """

    def __init__(
        self,
        cfg: HostConfig,
        *,
        powercap_root: Path | str | None = None,
        cpu_percent: Callable[[], float] | None = None,
        virtual_memory: Callable[[], Any] | None = None,
        cpu_count: int | Callable[[], int | None] | None = None,
        read_text: ReadText | None = None,
        logger: logging.Logger | None = None,
        model_reason: str | None = None,
    ) -> None:
        self.cfg = cfg
        self._log = logger or log
        self._cpu_percent = cpu_percent or CpuUtilMeter()
        self._virtual_memory = virtual_memory or proc_memory
        n = _as_callable(cpu_count)() if cpu_count is not None else logical_cpus()
        #: Logical CPUs the default CPU figures are scaled by.
        self.cpu_count = int(n) if n and n > 0 else 1
        self.cpu_idle_watts, self.cpu_max_watts = resolve_cpu_watts(cfg, self.cpu_count)
        if self.cpu_max_watts < self.cpu_idle_watts:
            raise ValueError(
                f"[host] cpu_max_watts resolves to {self.cpu_max_watts:g} W, below cpu_idle_watts "
                f"{self.cpu_idle_watts:g} W; set both"
            )
        self.powercap_root = Path(powercap_root) if powercap_root is not None else cfg.powercap_root
        self._rapl: RaplReader | None = None
        self._t_prev: float | None = None
        self._frozen_checked = False
        #: An earlier run's RAPL mark, bridged by the first read (see resume).
        self._resume: RaplMark | None = None
        #: "rapl" | "model" | "disabled"
        self.mode: str
        #: Why this mode (for the model: why not RAPL).
        self.reason: str

        if not cfg.enabled:
            self.mode, self.reason = "disabled", "[host] enabled = false"
        elif cfg.mode == "model":
            self.mode, self.reason = "model", model_reason or 'mode = "model" in [host]'
        else:
            try:
                self._rapl = RaplReader(self.powercap_root, read_text=read_text)
                self.mode, self.reason = "rapl", ""
            except RaplUnavailable as exc:
                if cfg.mode == "rapl":
                    raise RaplUnavailable(f'[host] mode = "rapl" but {exc.reason}; {_DOC_HINT}') from exc
                self.mode, self.reason = "model", self._reason_text(exc.reason)
        self.announce()

    def announce(self, logger: logging.Logger | None = None) -> None:
        """Log which mode is in use and why (a warning where ``auto`` fell back to the model).

        ``logger`` replaces the one given at construction, also for what the source says later
        (a fall-back to the model): a source built quietly to check a configuration is put to
        use, and speaks, from here on."""
        if logger is not None:
            self._log = logger
        line = self.describe()
        if self.mode == "model" and self.cfg.mode == "auto":
            self._log.warning("%s", line)
        else:
            self._log.info("%s", line)

    @staticmethod
    def _reason_text(reason: str) -> str:
        if "permission denied" in reason:
            return f"{reason}; {_DOC_HINT}"
        return reason

    # -- description --------------------------------------------------------

    def _model_figures(self) -> str:
        return (
            f"cpu {self.cpu_idle_watts:g}-{self.cpu_max_watts:g} W over {self.cpu_count} CPUs, "
            f"dram {self.cfg.memory_watts_per_gib:g} W/GiB"
        )

    def describe(self) -> str:
        """One line: which mode is in use and why, e.g. ``host power: model (no /sys/class/powercap); ...``."""
        platform = f", platform {self.cfg.platform_watts:g} W static"
        if self.mode == "disabled":
            return f"host power: disabled ({self.reason})"
        if self.mode == "rapl":
            assert self._rapl is not None
            extra = "" if self._rapl.drams else f" (dram modelled at {self.cfg.memory_watts_per_gib:g} W/GiB)"
            return f"host power: {self._rapl.describe()}{extra}{platform}"
        return f"host power: model ({self.reason}); {self._model_figures()}{platform}"

    # -- reading ------------------------------------------------------------

    def _fall_back(self, reason: str) -> None:
        self._rapl = None
        self.mode, self.reason = "model", self._reason_text(reason)
        self._log.warning("%s", self.describe())

    def cpu_model_watts(self, util_ratio: float) -> float:
        """Modelled whole-CPU power at ``util_ratio`` (0..1), W."""
        return self.cpu_idle_watts + (self.cpu_max_watts - self.cpu_idle_watts) * util_ratio

    def dram_model_watts(self, mem_total_bytes: int) -> float:
        """Modelled DRAM power for ``mem_total_bytes`` installed, W."""
        return self.cfg.memory_watts_per_gib * mem_total_bytes / GIB

    def read(self, t_mono: float) -> HostSample:
        """Sample host power at ``t_mono`` (monotonic, s). Never raises for RAPL errors."""
        util = min(1.0, max(0.0, float(self._cpu_percent()) / 100.0))
        vm = self._virtual_memory()
        total = int(vm.total)
        used = max(0, total - int(vm.available))
        baseline = self._t_prev is None
        dt = 0.0 if baseline else t_mono - self._t_prev  # type: ignore[operator]
        self._t_prev = t_mono
        if self.mode == "disabled":
            return HostSample(t_mono, util, used, total, (), baseline)

        comps: list[HostComponent] = []
        rapl_dram = False
        bridged: dict[str, float] | None = None
        since: float | None = None
        if self._rapl is not None:
            try:
                deltas = self._rapl.read_deltas()
            except RaplUnavailable as exc:
                self._fall_back(exc.reason)
            else:
                if baseline and self._resume is not None:
                    since = self._resume.mono
                    bridged = self._bridge(t_mono)
                # On the baseline read the deltas (since construction) are discarded; a bridge
                # gives the energy since the earlier run's last read instead.
                if baseline or self._check_advancing(deltas, dt):  # else: fell back, modelled below
                    for d in deltas:
                        j = (bridged[d.zone.zone_id] if bridged is not None else 0.0) if baseline else d.joules
                        w = j / dt if dt > 0 else 0.0
                        kind = "cpu" if d.zone.kind == "package" else "dram"
                        comps.append(HostComponent(kind, d.zone.socket, "rapl", w, j))
                    rapl_dram = any(d.zone.kind == "dram" for d in deltas)

        def model(component: str, watts: float) -> HostComponent:
            return HostComponent(component, None, "model", watts, watts * dt if dt > 0 else 0.0)

        if self.mode == "model":
            comps.append(model("cpu", self.cpu_model_watts(util)))
        if not rapl_dram:
            comps.append(model("dram", self.dram_model_watts(total)))
        p = self.cfg.platform_watts
        comps.append(HostComponent("platform", None, "static", p, p * dt if dt > 0 else 0.0))
        return HostSample(t_mono, util, used, total, tuple(comps), baseline, since if bridged is not None else None)

    # -- restarts on the same boot ---------------------------------------------

    def counter_mark(self) -> RaplMark | None:
        """Where the energy of the reads so far ends: the counted RAPL zones' counters at the last
        read and its monotonic time. None without RAPL (a modelled host has no counter: the
        energy of a time no agent ran is not known, and none is invented) or before a read."""
        if self._rapl is None or self._t_prev is None:
            return None
        last = self._rapl.baseline_uj
        return RaplMark({z.zone_id: (last[z.zone_id], z.max_energy_range_uj) for z in self._rapl.counted},
                        self._t_prev)

    def resume(self, mark: RaplMark) -> None:
        """Continue from an earlier run's mark (same boot, before the first read): the first read
        then counts, exact from the counters, the RAPL energy used while no agent ran."""
        if self._rapl is None:
            self._log.info("host: the energy used while the agent was not running is not counted: host power "
                           "is %s now, not RAPL counters", self.mode)
            return
        self._resume = mark

    def _bridge(self, t_mono: float) -> dict[str, float] | None:
        """Energy of each counted zone from the resumed mark to this first read, J; None, said in
        one line, where the counters cannot tell it: not the same zones, a gap in which a counter
        could have wrapped more than once (the delta would be short by whole ranges), a range
        unknown, or more than a zone can draw."""
        mark, self._resume = self._resume, None
        assert mark is not None and self._rapl is not None
        gap = t_mono - mark.mono
        now = self._rapl.baseline_uj
        zones = {z.zone_id: z for z in self._rapl.counted}
        out: dict[str, float] = {}
        why = ""
        if set(mark.counters) != set(zones) or any(mark.counters[k][1] != z.max_energy_range_uj
                                                   for k, z in zones.items()):
            why = "the RAPL zones are not those the totals end at"
        elif gap <= 0:
            why = f"the saved reading is {-gap:.1f} s in the future"
        for k, z in zones.items():
            if why:
                break
            span = z.max_energy_range_uj
            if span <= 0:
                why = f"{k} has no max_energy_range_uj, so a wrap cannot be undone"
            elif gap * MAX_RAPL_ZONE_WATTS * 1e6 >= span:
                why = f"{k} could have wrapped more than once in that time ({span / 1e6:.0f} J range)"
            else:
                out[k] = energy_delta_uj(mark.counters[k][0], now[k], span) / 1e6
                if out[k] > MAX_RAPL_ZONE_WATTS * gap + 1.0:
                    why = f"{k} went from {mark.counters[k][0]} to {now[k]} µJ, more than a zone can draw"
        if why:
            self._log.info("host: the energy used while the agent was not running (%.1f s) is not counted: %s",
                           gap, why)
            return None
        self._log.info("host: %.3f J used in the %.1f s the agent was not running, from the RAPL counters",
                       math.fsum(out.values()), gap)
        return out

    def _check_advancing(self, deltas: list[RaplDelta], dt: float) -> bool:
        """Once, on the first real interval: frozen package counters mean fake RAPL (some VMs)."""
        if self._frozen_checked or dt < _FROZEN_CHECK_MIN_DT:
            return True
        self._frozen_checked = True
        if any(d.joules > 0 for d in deltas if d.zone.kind == "package"):
            return True
        reason = f"RAPL package counters did not advance in {dt:g} s (virtualised RAPL?)"
        if self.cfg.mode == "rapl":
            self._log.warning("host power: %s; keeping rapl as configured", reason)
            return True
        self._fall_back(reason)
        return False
