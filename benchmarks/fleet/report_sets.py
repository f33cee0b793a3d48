"""The bill of a kept simulated fleet at several ``--nodes-per-query``: time, peak RSS, the bill.

Starts VictoriaMetrics on the data ``simulate.py --keep DIR --stores victoriametrics`` left,
bills the whole simulated period by team with ``gpu-cost-agent report`` once per set size, and
prints one JSON object per run: seconds, node sets, the report's peak RSS, each currency's
total and GPU-hours (every run must give the same bill).

    nice -n 10 .venv/bin/python benchmarks/fleet/simulate.py --nodes 1000 --days 7 \\
        --stores victoriametrics --skip-report --keep /tmp/fleet1000 > /tmp/fleet1000.json
    .venv/bin/python benchmarks/fleet/report_sets.py /tmp/fleet1000 /tmp/fleet1000.json 100 25
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("fleet_simulate", HERE / "simulate.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sim
_spec.loader.exec_module(sim)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("keep", type=Path, help="the directory simulate.py --keep wrote")
    ap.add_argument("result", type=Path, help="the JSON simulate.py printed for it (its period)")
    ap.add_argument("sets", nargs="+", type=int, help="--nodes-per-query values to try")
    args = ap.parse_args(argv)
    run = json.loads(args.result.read_text())
    start, end = float(run["start"]), float(run["end"])
    port = sim.free_port()
    vm = sim.Store("victoriametrics", ["victoria-metrics", f"-storageDataPath={args.keep / 'vm'}",
                                       f"-httpListenAddr=127.0.0.1:{port}", "-retentionPeriod=100y",
                                       "-search.latencyOffset=0s", "-search.disableCache",
                                       "-search.maxUniqueTimeseries=10000000", "-search.maxSamplesPerQuery=10000000000",
                                       "-search.maxQueryDuration=600s", "-search.maxSeries=100000000"], port, args.keep / "vm")
    try:
        for n in args.sets:
            out = args.keep / f"bill-{n}.json"
            t0 = time.time()
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "report", "--prometheus", vm.url,
                 "--from", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
                 "--to", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)), "--timezone", "UTC",
                 "--by", "team", "--nodes-per-query", str(n), "--json", str(out), "--quiet"],
                cwd=ROOT, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            bill = json.loads(out.read_text()) if os.waitstatus_to_exitcode(status) == 0 else None
            print(json.dumps({
                "nodes_per_query": n, "exit": os.waitstatus_to_exitcode(status), "seconds": round(time.time() - t0, 1),
                "report_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "node_sets": bill["stats"]["node_sets"] if bill else None,
                "total_cost": {s["currency"]: s["total"]["total_cost"] for s in bill["sections"]} if bill else None,
                "gpu_hours": {s["currency"]: s["total"]["gpu_hours"] for s in bill["sections"]} if bill else None,
            }), flush=True)
    finally:
        vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
