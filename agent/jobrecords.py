"""Per-job records: one durable line per workload when it ends, for bills that outlive Prometheus.

A Slurm cluster runs thousands of jobs a day. Prometheus keeps a job's series only as long as
its retention, and a label per job multiplies the series count. So when a workload ends — it
has not been charged for ``[attribution] retention_seconds`` and leaves ``/metrics`` — the
agent appends one record with its final, exact totals to the state directory, and
``gpu-cost-agent report --records DIR`` bills from those records (docs/report.md).

Format: JSON Lines, ``<state dir>/records/workloads-YYYY-MM[.N].jsonl`` (the UTC month the
record was written; ``.N`` once a month's file passes :data:`MAX_FILE_BYTES`). One object per
line, keys sorted, ``v`` = :data:`VERSION`::

    {"cost": {"energy": {"EUR": 0.41}, "hardware": {"EUR": 1.62}, "running": {"EUR": 0.77}},
     "ended": "2026-10-03T12:00:04Z", "energy_joules": 5436120.5, "gpu_instance": "",
     "gpu_seconds": 7203.0, "host": "node-a", "id": "9f0c…", "labels": {"kind": "slurm", …},
     "last_seen": 1791028804.0, "uuid": "GPU-…", "v": 1, "workload": "slurm:4242",
     "written": "2026-10-03T12:05:05Z"}

The numbers are the workload's counters as last exported (``gpucost_workload_cost_total`` per
``cost_kind`` and ``currency``, ``gpucost_workload_gpu_seconds_total``,
``gpucost_workload_gpu_energy_joules_total``): JSON floats round-trip exactly.

Whole or not at all: a batch of records is one ``write()`` on an ``O_APPEND`` descriptor,
then ``fsync``; a short or failed write is cut back to where it began, and a torn tail left by
a power loss (a last line without its newline) is cut off when the file is next opened. A
record is written before its workload leaves the totals; if the agent dies (kill -9) after the
write and before the next state save, the reloaded state still holds the workload and it is
recorded again on the next tick: the same ``id`` (host, GPU, workload, last charged), which
the reader keeps once. Files of months older than :data:`KEEP_MONTHS` are deleted.

Pseudo-workloads (``unallocated``, ``other``) have no records: idle capacity and merged
workloads are in Prometheus only. A workload folded into ``other`` (``max_workloads``) is
recorded with what it was charged under its own name, when that expires; one folded before
any snapshot showed it leaves no record. Kept lean: the daemon imports this module (json, os, hashlib only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

VERSION = 1
#: A month's file is continued in ``.1``, ``.2``… past this size. Units: bytes.
MAX_FILE_BYTES = 64 << 20
#: Months of files kept (the current one included); older ones are deleted.
KEEP_MONTHS = 13
SUBDIR = "records"
_NAME = re.compile(r"^workloads-(\d{4})-(\d{2})(?:\.(\d+))?\.jsonl$")
_PSEUDO = ("unallocated", "other")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def record_id(host: str, uuid: str, key: str, last_seen: float) -> str:
    """The record's identity: the same workload ended at the same instant on the same GPU."""
    return hashlib.sha256(f"{host}\x00{uuid}\x00{key}\x00{last_seen!r}".encode()).hexdigest()[:24]


class JobRecords:
    """Appends records of expired workloads (``WorkloadTotals.on_expire``) under ``state_dir``."""

    def __init__(self, state_dir: str | Path, *, host: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / SUBDIR
        self.host = host or socket.gethostname()
        self.clock = clock
        self.written = 0
        self.failed = 0
        self._checked: set[str] = set()  # files whose tail was checked in this process
        self._error: str | None = None

    # -- the hook -----------------------------------------------------------

    def __call__(self, totals: Any, keys: Iterable[tuple[str, str]]) -> None:
        """Called by ``WorkloadTotals.expire`` with the keys about to be dropped. Never raises."""
        try:
            records = [self.record(totals, k) for k in keys if _base(k[1]) not in _PSEUDO]
            if records:
                self.append(records)
        except Exception as exc:  # noqa: BLE001 — a record must never stop the tick
            self.failed += 1
            why = f"{type(exc).__name__}: {exc}"
            if why != self._error:
                log.error("per-job records: could not write to %s: %s", self.dir, why)
            self._error = why

    def record(self, totals: Any, k: tuple[str, str]) -> dict[str, Any]:
        uuid, key = k
        base, gi = _split(key)
        cost: dict[str, dict[str, float]] = {}
        for (u, wk, kind, cur), v in totals.cost.items():
            if u == uuid and wk == key:
                cost.setdefault(kind, {})[cur] = v
        last_seen = float(totals.last_seen.get(k, 0.0))
        now = self.clock()
        return {
            "v": VERSION,
            "id": record_id(self.host, uuid, key, last_seen),
            "host": self.host,
            "uuid": uuid,
            "gpu_instance": gi,
            "workload": base,
            "labels": dict(totals.labels.get(k, {})),
            "last_seen": last_seen,
            "ended": _iso(last_seen),
            "written": _iso(now),
            "energy_joules": float(totals.energy.get(k, 0.0)),
            "gpu_seconds": float(totals.seconds.get(k, 0.0)),
            "cost": cost,
        }

    # -- the file -----------------------------------------------------------

    def path_for(self, t: float) -> Path:
        """The file a record written at ``t`` goes to (the current one of that UTC month)."""
        month = time.strftime("%Y-%m", time.gmtime(t))
        base = self.dir / f"workloads-{month}.jsonl"
        n = 0
        path = base
        while True:
            nxt = self.dir / f"workloads-{month}.{n + 1}.jsonl"
            if nxt.exists():
                n += 1
                path = nxt
                continue
            break
        try:
            if path.stat().st_size >= MAX_FILE_BYTES:
                path = self.dir / f"workloads-{month}.{n + 1}.jsonl"
        except FileNotFoundError:
            pass
        return path

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` in one write, whole or not at all (raises OSError)."""
        data = b"".join(json.dumps(r, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"
                        for r in records)
        now = self.clock()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(now)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if str(path) not in self._checked:
                _cut_torn_tail(fd, path)
                self._checked.add(str(path))
            start = os.fstat(fd).st_size
            try:
                n = os.write(fd, data)
                if n != len(data):
                    raise OSError(f"short write ({n} of {len(data)} bytes)")
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, start)  # not half a record
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.dir)
            self._prune(now)
        self.written += len(records)
        if self._error is not None:
            log.info("per-job records: writing to %s again", self.dir)
            self._error = None

    def _prune(self, now: float) -> None:
        y, m = (int(x) for x in time.strftime("%Y %m", time.gmtime(now)).split())
        oldest = y * 12 + (m - 1) - (KEEP_MONTHS - 1)
        for p in self.dir.glob("workloads-*.jsonl"):
            match = _NAME.match(p.name)
            if match and int(match.group(1)) * 12 + int(match.group(2)) - 1 < oldest:
                try:
                    p.unlink()
                    log.info("per-job records: deleted %s (older than %d months)", p, KEEP_MONTHS)
                except OSError:
                    pass


def _base(key: str) -> str:
    return _split(key)[0]


def _split(key: str) -> tuple[str, str]:
    base, sep, gi = key.rpartition("#gi")
    return (base, gi) if sep and gi.isdigit() else (key, "")


def _cut_torn_tail(fd: int, path: Path) -> None:
    """Cut a last line without its newline (a write torn by a power loss) off the file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with open(path, "rb") as fh:
        back = min(size, 1 << 20)
        fh.seek(size - back)
        tail = fh.read(back)
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    keep = size - back + cut + 1 if cut >= 0 else (0 if back == size else size)
    if keep == size:
        return
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("per-job records: cut a torn last line (%d bytes) off %s", size - keep, path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
