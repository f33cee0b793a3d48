"""The capacity guide's tables from benchmarks/fleet/results/*.json (what simulate.py printed).

    .venv/bin/python benchmarks/fleet/table.py benchmarks/fleet/results/fleet-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STORES = (("victoriametrics", "VictoriaMetrics"), ("prometheus", "Prometheus"))


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def rows(result: dict) -> list[str]:
    out = []
    scope = f"{result['nodes']:,} × {result['gpus']}, {result['days']:g} d, " + (
        "per-workload on" if result["workloads"] else "per-workload off")
    for key, name in STORES:
        if f"{key}_raw_bytes" not in result:
            continue
        groups = result[f"{key}_rule_groups"]
        slow = max(groups, key=lambda g: groups[g]["seconds"])
        panels = result[f"{key}_fleet_panels"]
        bill = result.get(f"{key}_bill") or {}
        seconds = bill.get("seconds", "–")
        peak = f"{bill['store_peak_rss_mib']:,.0f}" if "store_peak_rss_mib" in bill else "–"
        report = f"{bill['report_peak_rss_mib']:,.0f}" if "report_peak_rss_mib" in bill else "–"
        sets = bill.get("stats", {}).get("node_sets", "–")
        out.append(
            f"| {scope} | {name} | {result['series']:,} | {result['series_created_per_day']:,} | "
            f"{result['samples']:,} | {mib(result[f'{key}_raw_bytes'])} | "
            f"{sum(g['seconds'] for g in groups.values()):.2f} ({slow} {groups[slow]['seconds']:.2f}) | "
            f"{panels['total_s']:.2f} ({panels['slowest'][1]:.2f}) | {seconds} | {sets} | {report} | {peak} | "
            f"{result[f'{key}_rss_mib']:,.0f} |")
    return out


def main(paths: list[str]) -> int:
    print("| fleet | store | series | series created / day | samples | disk MiB | rules s (slowest group) "
          "| 39 fleet panels s (slowest) | bill by team s | node sets | report peak RSS MiB "
          "| store peak RSS MiB (bill) | store RSS MiB (after) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for path in paths:
        for row in rows(json.loads(Path(path).read_text())):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
