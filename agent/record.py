"""``gpu-cost-agent record``: write live NVML readings to a trace file.

Records everything the replay can answer with: the cheap readings every
``interval``, the energy counter every ``energy_interval`` and the new
entries of the driver's power-sample buffer every ``samples_interval``; the
process list (9 µs on H100), the new per-process utilisation samples
(``last_seen`` advanced) and, on a GPU in MIG mode, its MIG instances on every
row; host CPU and memory. Recording is a short-lived diagnostic, so it may read the costly counter far more often than the agent.
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from datetime import datetime, timezone
from typing import Any

import psutil

from . import __version__
from .sources.gpu import GpuError, GpuNotSupported, GpuSource
from .trace import TraceWriter, mig_to_json

log = logging.getLogger(__name__)


def _gpu_row(src: GpuSource, index: int) -> dict[str, Any]:
    r = src.read(index)
    row: dict[str, Any] = {}

    def put(key: str, value: Any, scale: float = 1.0, failed_name: str | None = None) -> None:
        if value is not None:
            row[key] = round(value * scale) if scale != 1.0 else value
        elif failed_name and failed_name in r.failed:
            row[key] = None

    put("power_mw", r.power_watts, 1000, "power")
    put("util_gpu_pct", r.utilization_gpu_ratio, 100, "utilization")
    put("util_mem_pct", r.utilization_memory_ratio, 100, "utilization")
    put("mem_used_bytes", r.memory_used_bytes, failed_name="memory")
    put("temp_c", r.temperature_celsius, failed_name="temperature")
    put("sm_clock_mhz", r.sm_clock_hertz, 1e-6, "sm_clock")
    put("pstate", r.performance_state, failed_name="pstate")
    put("clock_event_reasons", r.clock_event_reasons, failed_name="clock_event_reasons")
    put("power_limit_mw", r.power_limit_watts, 1000, "power_limit")
    return row


def record(
    src: GpuSource,
    path: str,
    *,
    duration: float,
    interval: float = 0.1,
    energy_interval: float = 0.1,
    samples_interval: float = 1.0,
    note: str = "",
) -> int:
    """Record for ``duration`` seconds (0 = until interrupted). Returns rows written."""
    devices = src.devices()
    header = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recorded_by": f"gpu-cost-agent {__version__} record",
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "driver_version": devices[0].driver_version if devices else "",
        "sample_buffer_seconds": 2.4,
        "note": note,
        "gpus": [
            {
                "index": d.index,
                "uuid": d.uuid,
                "name": d.name,
                "pci_bus_id": d.pci_bus_id,
                "serial": d.serial,
                "memory_total_bytes": d.memory_total_bytes,
                "power_limit_mw": round(d.power_limit_watts * 1000) if d.power_limit_watts else None,
            }
            for d in devices
        ],
        "host": {"cpu_count": psutil.cpu_count(), "mem_total_bytes": psutil.virtual_memory().total},
    }
    writer = TraceWriter(path, header)
    last_seen = {d.index: 0 for d in devices}
    no_counter: set[int] = set()
    no_samples: set[int] = set()
    no_procs: set[int] = set()
    no_util: set[int] = set()
    no_mig: set[int] = set()
    util_seen = {d.index: 0 for d in devices}
    # Who each PID is, written once per PID the first time it is listed, so a replay
    # attributes energy to the recorded users, jobs and pods (never this machine's PIDs).
    from .attribution.identity import IdentityResolver
    from .attribution.split import identity_labels, workload_key

    resolver = IdentityResolver()
    described: set[int] = set()
    psutil.cpu_percent(None)
    start = time.monotonic()
    next_energy = next_samples = start
    rows = 0
    try:
        while duration <= 0 or time.monotonic() - start < duration:
            t_loop = time.monotonic()
            row: dict[str, Any] = {"t": time.time(), "gpus": {}}
            read_energy = t_loop >= next_energy
            read_samples = t_loop >= next_samples
            for d in devices:
                g = _gpu_row(src, d.index)
                if read_energy and d.index not in no_counter:
                    try:
                        g["energy_mj"] = src.energy_mj(d.index)
                    except GpuNotSupported:
                        no_counter.add(d.index)
                    except GpuError:
                        g["energy_mj"] = None
                if read_samples and d.index not in no_samples:
                    try:
                        new = src.power_samples(d.index, last_seen[d.index])
                        if new:
                            last_seen[d.index] = new[-1][0]
                        g["samples"] = [list(s) for s in new]
                    except GpuNotSupported:
                        no_samples.add(d.index)
                    except GpuError:
                        pass
                if d.index not in no_procs:
                    try:
                        g["processes"] = [[pid, used] for pid, used in src.processes(d.index)]
                    except GpuNotSupported:
                        no_procs.add(d.index)
                    except GpuError:
                        g["processes"] = None
                if d.index not in no_mig:
                    try:
                        mig = src.mig_instances(d.index)
                    except GpuNotSupported:
                        no_mig.add(d.index)
                    except GpuError:
                        g["mig"] = None
                    else:
                        if mig is None:
                            no_mig.add(d.index)  # not in MIG mode: changing that takes a GPU reset
                        else:
                            g["mig"] = mig_to_json(mig)
                listed = [p for p, _ in (g.get("processes") or ())]
                listed += [p for inst in (g.get("mig") or ()) for p, _ in inst["processes"]]
                new_pids = [p for p in dict.fromkeys(listed) if p not in described]
                if new_pids:
                    facts = {}
                    for pid in new_pids:
                        ident = resolver.resolve(pid)
                        facts[str(pid)] = {"workload": workload_key(ident), "labels": identity_labels(ident)}
                        described.add(pid)
                    g["identities"] = facts
                if d.index not in no_util:
                    try:
                        util = src.process_utilization(d.index, util_seen[d.index])
                        if util:
                            util_seen[d.index] = max(u[1] for u in util)
                        g["process_utilization"] = [list(u) for u in util]
                    except GpuNotSupported:
                        no_util.add(d.index)
                    except GpuError:
                        g["process_utilization"] = None
                row["gpus"][str(d.index)] = g
            vm = psutil.virtual_memory()
            row["host"] = {"cpu_util_pct": psutil.cpu_percent(None), "mem_used_bytes": vm.total - vm.available}
            writer.row(row)
            rows += 1
            if read_energy:
                next_energy += energy_interval
            if read_samples:
                next_samples += samples_interval
            time.sleep(max(0.0, interval - (time.monotonic() - t_loop)))
    except KeyboardInterrupt:
        pass
    finally:
        writer.close()
    return rows
