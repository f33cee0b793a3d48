"""Memory of each store for the fleet's active series, scraped live (not backfilled).

One HTTP endpoint serves each node of the simulated fleet of benchmarks/fleet/simulate.py as
a target of its own (``/metrics?node=i``: the node's series with its own
``job``/``instance``/``cluster``/``team``, values at the time of the scrape); Prometheus
(``honor_labels: true``) and vmagent (remote-writing to a single-node VictoriaMetrics)
scrape every target every ``--interval`` for ``--scrapes`` scrapes. Then the script
reads each process's RSS, Prometheus' head series and the store's series, and prints JSON.
Backfilled blocks (simulate.py) never enter Prometheus' head: this is the head's memory.

    nice -n 10 .venv/bin/python benchmarks/fleet/scrape_ram.py --nodes 1000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fleet_simulate", HERE / "simulate.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sim
_spec.loader.exec_module(sim)


def expositions(fleet, t: float) -> list[bytes]:
    """Each node's exposition at ``t``: what its agent serves, with the target labels its
    scrape would add (``honor_labels: true`` keeps them)."""
    return ["".join(f"{p} {v!r}\n" for p, v, _ in sim.samples(fleet, [t], nodes=[i])
                    if not p.startswith("up{")).encode() for i in range(fleet.nodes)]


def metric(url: str, name: str) -> float | None:
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--no-workloads", action="store_true")
    ap.add_argument("--jobs-per-gpu-day", type=float, default=8.0)
    ap.add_argument("--interval", type=int, default=15)
    ap.add_argument("--scrapes", type=int, default=8)
    args = ap.parse_args(argv)

    now = time.time()
    fleet = sim.Fleet(args.nodes, args.gpus, "slurm", args.jobs_per_gpu_day, not args.no_workloads,
                      now - 86400, now + 86400)
    cache: dict[int, list[bytes]] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            node = int(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("node", ["0"])[0])
            slot = int(time.time() // args.interval)
            with lock:  # the first scrape of an interval writes every node's page
                if slot not in cache:
                    cache.clear()
                    cache[slot] = expositions(fleet, slot * args.interval)
                body = cache[slot][node]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.request_queue_size = 1024
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    t0 = time.time()
    pages = expositions(fleet, now)
    result = {"nodes": args.nodes, "gpus": args.gpus, "workloads": not args.no_workloads,
              "targets": args.nodes, "series_per_scrape": sum(p.count(b"\n") for p in pages),
              "exposition_s": round(time.time() - t0, 2), "interval_s": args.interval, "scrapes": args.scrapes}
    del pages

    work = Path(tempfile.mkdtemp(prefix="gpucost-scrape-ram-"))
    # one target per node, as a fleet is scraped; the page of node i is /metrics?node=i
    targets = "".join(f"      - {{targets: ['{address}'], labels: {{__param_node: '{i}', "
                      f"instance: '{fleet.target(i)['instance']}'}}}}\n" for i in range(args.nodes))
    scrape = (f"global: {{scrape_interval: {args.interval}s, scrape_timeout: {args.interval - 1}s}}\n"
              f"scrape_configs:\n  - job_name: fleet\n    honor_labels: true\n    static_configs:\n{targets}")
    (work / "scrape.yml").write_text(scrape)
    vm_port, agent_port, prom_port = sim.free_port(), sim.free_port(), sim.free_port()
    (work / "vm").mkdir()
    (work / "vmagent").mkdir()
    (work / "prom").mkdir()
    vm = sim.Store("victoriametrics", ["victoria-metrics", f"-storageDataPath={work / 'vm'}",
                                       f"-httpListenAddr=127.0.0.1:{vm_port}"], vm_port, work / "vm")
    vmagent = sim.Store("vmagent", ["vmagent", f"-promscrape.config={work / 'scrape.yml'}",
                                    f"-remoteWrite.url={vm.url}/api/v1/write",
                                    f"-remoteWrite.tmpDataPath={work / 'vmagent'}",
                                    f"-httpListenAddr=127.0.0.1:{agent_port}"], agent_port, work / "vmagent")
    prom = sim.Store("prometheus", ["prometheus", f"--config.file={work / 'scrape.yml'}",
                                    f"--storage.tsdb.path={work / 'prom'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                    "--log.level=warn"], prom_port, work / "prom")
    try:
        time.sleep(args.interval * args.scrapes)
        result["prometheus_head_series"] = metric(prom.url, "prometheus_tsdb_head_series")
        up = sim.Store.get(prom, "/api/v1/query", query="sum(up)")["data"]["result"]
        result["prometheus_targets_up"] = int(float(up[0]["value"][1])) if up else 0
        slow = sim.Store.get(prom, "/api/v1/query", query="max(scrape_duration_seconds)")["data"]["result"]
        result["prometheus_slowest_scrape_s"] = round(float(slow[0]["value"][1]), 3) if slow else None
        result["victoriametrics_series"] = int(sim.Store.get(vm, "/api/v1/series/count")["data"][0])
        for store in (prom, vm, vmagent):
            result[f"{store.name}_rss_mib"] = round(store.rss_mib(), 1)
    finally:
        for store in (prom, vmagent, vm):
            store.stop()
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
