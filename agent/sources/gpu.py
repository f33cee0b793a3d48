"""What every GPU source (NVML, trace replay) hands to the rest of the agent.

Sources translate vendor errors at their edge: accounting code only ever sees
the small exception hierarchy below, never an ``NVMLError``. A reading the GPU
does not support is ``None`` in :class:`GpuReading` and is then simply not
exported, never reported as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence



class GpuError(Exception):
    """A GPU call failed. ``kind`` is the label used for the error counter."""

    kind = "gpu_read"


class GpuNotSupported(GpuError):
    """The GPU or driver does not offer this reading at all."""

    kind = "not_supported"


class GpuLost(GpuError):
    """The GPU fell off the bus or was reset; its handle is no longer valid."""

    kind = "gpu_lost"


class SourceUnavailable(Exception):
    """The source could not be opened at all (no driver, no libnvidia-ml)."""


@dataclass(frozen=True)
class GpuInfo:
    """Static facts about one GPU, read once at start."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str = ""
    serial: str = ""
    driver_version: str = ""
    memory_total_bytes: int | None = None
    #: Enforced power limit at start. Units: W.
    power_limit_watts: float | None = None


@dataclass(frozen=True)
class GpuReading:
    """The cheap per-tick readings of one GPU. ``None`` = not supported or failed.

    ``power_watts`` is ``nvmlDeviceGetPowerUsage``: on Hopper and later a ~1 s
    running average, on older GPUs an instantaneous value.
    """

    power_watts: float | None = None
    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None
    memory_used_bytes: int | None = None
    temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    performance_state: int | None = None
    clock_event_reasons: int | None = None
    power_limit_watts: float | None = None
    #: Names of fields whose read failed this tick (transient errors).
    failed: tuple[str, ...] = ()


#: A sample of the driver's power ring buffer: (timestamp in µs, power in mW).
PowerSample = tuple[int, int]

#: A process on a GPU: (PID as the agent's PID namespace numbers it, GPU memory in bytes or None).
GpuProcess = tuple[int, "int | None"]

#: A per-process utilisation sample: (PID, timestamp in µs, SM %, memory %).
ProcessUtilSample = tuple[int, int, int, int]


@dataclass(frozen=True)
class MigComputeInstance:
    """One compute instance of a MIG GPU instance: what NVML calls a MIG device."""

    #: ``nvmlDeviceGetComputeInstanceId`` of the MIG device.
    compute_instance: int
    #: The MIG device's UUID (``MIG-…``), as the device plugin and the kubelet name it; "" unknown.
    uuid: str = ""
    #: ``nvmlDeviceGetAttributes().computeInstanceSliceCount``; None unknown.
    compute_slices: int | None = None
    #: ``nvmlDeviceGetAttributes().multiprocessorCount``: the SMs of this compute instance; None unknown.
    multiprocessors: int | None = None


@dataclass(frozen=True)
class MigInstance:
    """One MIG GPU instance of a GPU in MIG mode, read (never changed) through NVML.

    NVML gives power and energy for the whole GPU only, never per instance: these are
    the facts the whole GPU's energy is split by (docs/attribution.md, "MIG").
    """

    #: ``nvmlDeviceGetGpuInstanceId``: the ``gpu_instance`` label.
    gpu_instance: int
    #: The GPU instance profile, e.g. ``3g.40gb`` (from the MIG device's name); "" unknown.
    profile: str = ""
    #: ``gpuInstanceSliceCount``: the compute slices the instance holds (the 3 of ``3g.40gb``); None unknown.
    slices: int | None = None
    compute_instances: tuple[MigComputeInstance, ...] = ()
    #: Processes on the instance's compute instances: (PID, GPU memory in bytes or None).
    processes: tuple["GpuProcess", ...] = ()
    #: Share of the instance's SMs busy since the previous read (GPM ``SM_UTIL`` of the GPU
    #: instance, Hopper and later). Units: ratio 0–1. None: not measured (no GPM, first read).
    sm_activity: float | None = None


class GpuSource(Protocol):
    """One vendor's (or a trace's) view of the node's GPUs."""

    #: ``nvml`` or ``replay``: exported as the ``source`` label of gpucost_agent_info.
    kind: str

    def devices(self) -> Sequence[GpuInfo]:
        """All GPUs, in index order. No GPU is an empty sequence, not an error."""

    def read(self, index: int) -> GpuReading:
        """Cheap readings (a few µs each on H100). Raises :class:`GpuLost`."""

    def energy_mj(self, index: int) -> int:
        """The hardware energy counter since driver load. Units: mJ.

        Costly (2.9 ms wall, 3.8 ms CPU on H100), so the agent calls it on a
        slower cadence than :meth:`read`. Raises :class:`GpuNotSupported`.
        """

    def power_samples(self, index: int, since_us: int) -> list[PowerSample]:
        """Driver power samples newer than ``since_us``, oldest first.

        The driver keeps a ring buffer (one sample per 20 ms, ~2.4 s deep on
        H100); samples older than that are gone. Raises :class:`GpuNotSupported`.
        """

    def processes(self, index: int) -> list[GpuProcess]:
        """Processes holding the GPU: compute and graphics lists merged, one entry per PID.

        Cheap (9 µs on H100). Raises :class:`GpuNotSupported`.
        """

    def process_utilization(self, index: int, since_us: int) -> list[ProcessUtilSample]:
        """Per-process utilisation samples newer than ``since_us``, oldest first.

        ``nvmlDeviceGetProcessUtilization(handle, last_seen)``: on an H100 shared by
        two processes it gives one process per call and answers NotFound (here: an
        empty list) on most calls, ~5 samples a second in all. Raises
        :class:`GpuNotSupported`.
        """

    def mig_instances(self, index: int) -> list[MigInstance] | None:
        """The GPU's MIG GPU instances, or None when the GPU is not in MIG mode (or has no MIG).

        Read-only: the MIG mode and the instances are never changed. ``sm_activity`` covers
        the time since the previous call. Raises :class:`GpuError` when the read failed.
        """

    def close(self) -> None:
        """Release the library."""
