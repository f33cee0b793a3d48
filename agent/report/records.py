"""The bill from per-job records (agent/jobrecords.py) instead of Prometheus.

``report --records DIR`` reads every ``workloads-*.jsonl`` under DIR (the agents' state
directories, or copies of their ``records/`` folders, one per node), keeps each record ``id``
once, and bills each workload **whole, in the period it ended in** (its ``last_seen``) — as
Slurm's accounting bills a job by its end. The Prometheus path instead bills what a workload
used inside the period; the two agree on every workload that began and ended inside it.

Records carry the identity labels (``user``, ``slurm_job``, ``namespace``, ``pod``…), the
workload key, the GPU (``uuid``) and the node (``host``, also as ``node``), not the scrape
config's target labels (``team``, ``cluster``). They hold no idle capacity and no node
totals, so a records bill has no reconciliation: it is the per-job view.

A line that is not a whole JSON object (a torn tail the writer has not yet cut) is skipped
and counted, never half-read.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from .bill import ALLOCATED, COST_KINDS, IDLE, UNALLOCATED, Bill, ReportError, Row, Section, classify, row_label
from .period import Period

NOT_BUSY = ("unallocated", "unknown")
J_PER_KWH = 3.6e6


def read_records(root: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every distinct record under ``root``; counts of files, lines, duplicates, unreadable lines."""
    if not root.exists():
        raise ReportError(f"--records {root}: no such directory")
    files = sorted(p for p in root.rglob("workloads-*.jsonl") if p.is_file())
    seen: set[str] = set()
    out = []
    stats = {"files": len(files), "lines": 0, "duplicates": 0, "unreadable": 0}
    for path in files:
        with open(path, "rb") as fh:
            for raw in fh:
                stats["lines"] += 1
                if not raw.endswith(b"\n"):
                    stats["unreadable"] += 1  # a torn last line
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    stats["unreadable"] += 1
                    continue
                if not _valid(rec):
                    stats["unreadable"] += 1
                    continue
                if rec["id"] in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(rec["id"])
                out.append(rec)
    return out, stats


def _valid(rec: Any) -> bool:
    if not isinstance(rec, dict) or rec.get("v") != 1 or not isinstance(rec.get("id"), str):
        return False
    if not isinstance(rec.get("labels"), dict) or not isinstance(rec.get("cost"), dict):
        return False
    nums = (rec.get("last_seen"), rec.get("energy_joules"), rec.get("gpu_seconds"))
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in nums):
        return False
    return all(isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
               for v in rec["cost"].values())


def labels_of(rec: dict[str, Any]) -> dict[str, str]:
    labels = {k: str(v) for k, v in rec["labels"].items() if isinstance(v, str)}
    labels.update(workload=str(rec.get("workload", "")), gpu_instance=str(rec.get("gpu_instance", "")),
                  uuid=str(rec.get("uuid", "")), host=str(rec.get("host", "")), node=str(rec.get("host", "")))
    return labels


def from_records(root: Path, period: Period, by: list[str], *,
                 progress: Callable[[str], None] | None = None) -> Bill:
    records, stats = read_records(root)
    mine = [r for r in records if period.start <= r["last_seen"] < period.end]
    if progress:
        progress(f"records: {len(records)} in {stats['files']} file(s) under {root}, {len(mine)} ended in "
                 f"{period.label}; {stats['duplicates']} duplicate(s), {stats['unreadable']} unreadable line(s) skipped")
    if not mine:
        raise ReportError(f"no records of workloads that ended in {period.label} under {root} "
                          f"({len(records)} record(s) in {stats['files']} file(s))")
    known = set().union(*(labels_of(r) for r in mine))
    for b in by:
        if b not in known:
            raise ReportError(f"--by {b}: records have no such label (they have: {', '.join(sorted(known))})")
    days = period.days()
    rows: dict[tuple, Row] = {}
    detail: dict[tuple, Row] = {}
    daily: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for rec in mine:
        labels = labels_of(rec)
        allocation, group = classify(by, tuple(labels.get(b, "") for b in by), labels["workload"])
        held = rec["gpu_seconds"] / 3600.0
        busy = 0.0 if labels["workload"] in NOT_BUSY or labels.get("kind") == "unknown" else held
        currencies = sorted({c for per in rec["cost"].values() for c in per}) or [""]
        day = next((d for d, a, b in days if a <= rec["last_seen"] < b), days[-1][0] if days else "")
        for cur in currencies:
            part = Row(cur, allocation, group, labels["host"], held, busy, rec["energy_joules"] / J_PER_KWH,
                       None, None, workloads=1)
            for kind in COST_KINDS:
                part.cost[kind] = float(rec["cost"].get(kind, {}).get(cur, 0.0))
            rows.setdefault((cur, allocation, group), Row(cur, allocation, group, facility_kwh=None,
                                                          emissions_g=None)).add(part)
            detail.setdefault((cur, allocation, group, part.node),
                              Row(cur, allocation, group, part.node, facility_kwh=None, emissions_g=None)).add(part)
            daily[cur][day][row_label(by, part)] += part.total
    order = {ALLOCATED: 0, UNALLOCATED: 1, IDLE: 2}
    sections = []
    for cur in sorted({k[0] for k in rows}):
        srows = sorted((r for k, r in rows.items() if k[0] == cur), key=lambda r: (order[r.allocation], -r.total, r.group))
        det = sorted((r for k, r in detail.items() if k[0] == cur), key=lambda r: (r.node, order[r.allocation], -r.total))
        sections.append(Section(cur, srows, det, {d: dict(v) for d, v in sorted(daily[cur].items())}, []))
    notes = [f"from per-job records: each workload billed whole in the period it ended in; no idle capacity and "
             f"no reconciliation (records hold workloads only); {len(mine)} record(s), {stats['duplicates']} "
             f"duplicate(s) and {stats['unreadable']} unreadable line(s) skipped"]
    bill = Bill(period, list(by), sections, f"records {root}", notes)
    bill.stats = {"records": len(mine), **stats}
    return bill
