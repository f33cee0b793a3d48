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

from .sources.gpu import MigComputeInstance, MigInstance

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
    "mig": (
        "the MIG GPU instances of a GPU in MIG mode (absent: not in MIG mode): "
        "[{gpu_instance, profile, slices, compute_instances: [[ci, uuid, compute_slices, sms], ...], "
        "processes: [[pid, used_bytes], ...], sm_active_pct}, ...]"
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


#: Longest line of a trace (a row of 8 GPUs with their sample buffers is tens of kB). Units: bytes.
MAX_LINE_BYTES = 4 * 1024 * 1024
#: Most bytes a trace may hold, decompressed: hours of 0.1 s rows; a gzip bomb stops here. Units: bytes.
MAX_TRACE_BYTES = 256 * 1024 * 1024


def _lines(fh: IO[bytes], path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of a binary stream, each line read with a bound, the whole with another:
    a 2 GiB line or a gzip bomb is refused after reading at most the bound, not held."""
    total = 0
    lineno = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        total += len(raw)
        if len(raw) > MAX_LINE_BYTES:
            raise TraceError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES} bytes: not a trace row")
        if total > MAX_TRACE_BYTES:
            raise TraceError(f"{path}: more than {MAX_TRACE_BYTES} bytes (decompressed): too large to replay")
        yield lineno, raw.decode("utf-8")


def load(path: str | Path) -> Trace:
    """Read and validate a whole trace. Raises :class:`TraceError` naming the line.

    Read with bounded memory: lines of at most :data:`MAX_LINE_BYTES`, at most
    :data:`MAX_TRACE_BYTES` in all (decompressed), and rows only for the header's GPUs."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            fh: IO[bytes] = gzip.open(path, "rb")  # type: ignore[assignment]
        else:
            fh = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    header: dict[str, Any] | None = None
    gpu_keys: set[str] = set()
    rows: list[dict[str, Any]] = []
    last_t = float("-inf")
    with fh:
        try:
            for lineno, line in _lines(fh, path):
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
                    gpu_keys = {str(g.get("index")) for g in header.get("gpus", []) if isinstance(g, dict)}
                    continue
                t = obj.get("t")
                if not isinstance(t, (int, float)):
                    raise TraceError(f"{path}:{lineno}: row has no numeric 't'")
                if t < last_t:
                    raise TraceError(f"{path}:{lineno}: 't' goes backwards ({t} < {last_t})")
                if not isinstance(obj.get("gpus", {}), dict):
                    raise TraceError(f"{path}:{lineno}: 'gpus' must be an object keyed by GPU index")
                strangers = set(obj.get("gpus", {})) - gpu_keys
                if strangers:
                    raise TraceError(f"{path}:{lineno}: GPU {sorted(strangers)[0]!r:.40} is not in the header")
                for key, g in obj.get("gpus", {}).items():
                    if isinstance(g, dict) and g.get("mig") is not None:
                        try:
                            mig_from_json(g["mig"])
                        except ValueError as exc:
                            raise TraceError(f"{path}:{lineno}: gpus.{key}.mig: {exc}") from exc
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


def mig_to_json(instances: Iterable[MigInstance]) -> list[dict[str, Any]]:
    """The ``mig`` value of a trace row (format: docs/trace-format.md)."""
    return [
        {
            "gpu_instance": m.gpu_instance,
            "profile": m.profile,
            "slices": m.slices,
            "compute_instances": [[c.compute_instance, c.uuid, c.compute_slices, c.multiprocessors]
                                  for c in m.compute_instances],
            "processes": [[pid, used] for pid, used in m.processes],
            "sm_active_pct": round(m.sm_activity * 100.0, 3) if m.sm_activity is not None else None,
        }
        for m in instances
    ]


def mig_from_json(value: Any) -> list[MigInstance]:
    """MIG instances from a trace row's ``mig`` value. Raises ValueError naming the bad part."""

    def count(v: Any, where: str) -> int | None:
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}: expected a whole number >= 0 or null, got {v!r}")
        return v

    def need(v: Any, where: str) -> int:
        n = count(v, where)
        if n is None:
            raise ValueError(f"{where}: expected a whole number >= 0, got null")
        return n

    if not isinstance(value, list):
        raise ValueError(f"expected a list of GPU instances, got {type(value).__name__}")
    out: list[MigInstance] = []
    seen: set[int] = set()
    for i, m in enumerate(value):
        where = f"[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: expected an object")
        gi = need(m.get("gpu_instance"), f"{where}.gpu_instance")
        if gi in seen:
            raise ValueError(f"{where}: GPU instance {gi} appears twice")
        seen.add(gi)
        profile = m.get("profile") or ""
        if not isinstance(profile, str):
            raise ValueError(f"{where}.profile: expected a string")
        cis = []
        for j, c in enumerate(m.get("compute_instances") or []):
            if not isinstance(c, list) or len(c) != 4 or not isinstance(c[1], str):
                raise ValueError(f"{where}.compute_instances[{j}]: expected [ci, uuid, compute_slices, sms]")
            cis.append(MigComputeInstance(need(c[0], f"{where}.compute_instances[{j}][0]"), c[1],
                                          count(c[2], f"{where}.compute_instances[{j}][2]"),
                                          count(c[3], f"{where}.compute_instances[{j}][3]")))
        procs = []
        for j, p in enumerate(m.get("processes") or []):
            if not isinstance(p, list) or len(p) != 2:
                raise ValueError(f"{where}.processes[{j}]: expected [pid, used_bytes]")
            procs.append((need(p[0], f"{where}.processes[{j}][0]"), count(p[1], f"{where}.processes[{j}][1]")))
        pct = m.get("sm_active_pct")
        if pct is not None and (isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100):
            raise ValueError(f"{where}.sm_active_pct: expected a number from 0 to 100 or null, got {pct!r}")
        out.append(MigInstance(
            gpu_instance=gi,
            profile=profile,
            slices=count(m.get("slices"), f"{where}.slices"),
            compute_instances=tuple(cis),
            processes=tuple(procs),
            sm_activity=pct / 100.0 if pct is not None else None,
        ))
    return out


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
