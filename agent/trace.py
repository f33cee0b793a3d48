"""Trace files: recorded NVML readings, version 1. Format documented in docs/trace-format.md.

A trace is JSON Lines (optionally gzip-compressed, by ``.gz`` suffix): one
header object, then one object per sampling instant. A key missing from a row
means "not read at this instant" (the replay holds the previous value); a key
that never appears for a GPU means the GPU does not support it; ``null`` means
the read failed at that instant.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

FORMAT = "gpu-cost-agent-trace"
VERSION = 1

#: Per-GPU row keys and their units, the contract of version 1.
GPU_FIELDS = {
    "power_mw": "nvmlDeviceGetPowerUsage, mW",
    "energy_mj": "nvmlDeviceGetTotalEnergyConsumption, mJ since driver load",
    "util_gpu_pct": "nvmlDeviceGetUtilizationRates().gpu, %",
    "util_mem_pct": "nvmlDeviceGetUtilizationRates().memory, %",
    "mem_used_bytes": "nvmlDeviceGetMemoryInfo().used, bytes",
    "temp_c": "nvmlDeviceGetTemperature(GPU), °C",
    "sm_clock_mhz": "nvmlDeviceGetClockInfo(SM), MHz",
    "pstate": "nvmlDeviceGetPerformanceState, 0 = P0",
    "clock_event_reasons": "nvmlDeviceGetCurrentClocksEventReasons, bitmask",
    "power_limit_mw": "nvmlDeviceGetEnforcedPowerLimit, mW",
    "samples": "nvmlDeviceGetSamples(TOTAL_POWER_SAMPLES) new since the previous read: [[timestamp_us, mW], ...]",
    "processes": "nvmlDeviceGetComputeRunningProcesses: [[pid, used_bytes], ...]",
    "process_utilization": (
        "nvmlDeviceGetProcessUtilization(last_seen) new since the previous read: "
        "[[pid, timestamp_us, sm_pct, mem_pct], ...], [] where it answered NotFound"
    ),
    "identities": "who each PID is, once per PID: {pid: {workload: key, labels: {kind, user, ...}}}",
}


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass
class Trace:
    header: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.header.get("gpus", []))

    @property
    def start(self) -> float:
        return float(self.rows[0]["t"])

    @property
    def end(self) -> float:
        return float(self.rows[-1]["t"])


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")  # type: ignore[arg-type]
    return open(path, mode, encoding="utf-8")


def load(path: str | Path) -> Trace:
    """Read and validate a whole trace. Raises :class:`TraceError` naming the line."""
    path = Path(path)
    try:
        fh = _open_text(path, "r")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    header: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    last_t = float("-inf")
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from exc
                if not isinstance(obj, dict):
                    raise TraceError(f"{path}:{lineno}: expected a JSON object")
                if header is None:
                    header = _check_header(path, lineno, obj)
                    continue
                t = obj.get("t")
                if not isinstance(t, (int, float)):
                    raise TraceError(f"{path}:{lineno}: row has no numeric 't'")
                if t < last_t:
                    raise TraceError(f"{path}:{lineno}: 't' goes backwards ({t} < {last_t})")
                if not isinstance(obj.get("gpus", {}), dict):
                    raise TraceError(f"{path}:{lineno}: 'gpus' must be an object keyed by GPU index")
                last_t = t
                rows.append(obj)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: cannot read: {exc}") from exc
    if header is None:
        raise TraceError(f"{path}: empty trace (no header line)")
    if len(rows) < 2:
        raise TraceError(f"{path}: a trace needs at least two rows, found {len(rows)}")
    return Trace(header, rows)


def _check_header(path: Path, lineno: int, obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("format") != FORMAT:
        raise TraceError(f"{path}:{lineno}: not a {FORMAT} file (header 'format' is {obj.get('format')!r})")
    version = obj.get("version")
    if version != VERSION:
        raise TraceError(f"{path}:{lineno}: trace version {version!r} is not supported (this agent reads {VERSION})")
    gpus = obj.get("gpus")
    if not isinstance(gpus, list):
        raise TraceError(f"{path}:{lineno}: header needs a 'gpus' list")
    for g in gpus:
        if not isinstance(g, dict) or not isinstance(g.get("index"), int) or not g.get("uuid"):
            raise TraceError(f"{path}:{lineno}: each header GPU needs an integer 'index' and a 'uuid'")
    return obj


class TraceWriter:
    """Writes a trace line by line, flushing each row so a killed recorder loses little."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self._fh = _open_text(self.path, "w")
        full = {"format": FORMAT, "version": VERSION, **header}
        self._write(full)

    def _write(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._fh.flush()

    def row(self, obj: dict[str, Any]) -> None:
        self._write(obj)

    def close(self) -> None:
        self._fh.close()


def write(path: str | Path, header: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    w = TraceWriter(path, header)
    try:
        for r in rows:
            w.row(r)
    finally:
        w.close()
