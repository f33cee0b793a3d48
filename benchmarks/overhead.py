"""Measure the agent's own cost: CPU per sampling tick, CPU per scrape, memory.

    python benchmarks/overhead.py [--gpus 8] [--ticks 2000]

Replays the reference H100 trace (fixtures/h100_trace_a.jsonl) as an N-GPU node (the same GPU N times) through
the real Sampler with host power and a time-of-use tariff, and reports CPU time
(time.process_time, i.e. what the node pays) per tick and per /metrics render.
The replay source costs nothing like NVML: on a real H100 the cheap reads add
~34 µs per GPU per tick and each energy counter read 3.8 ms (every 5 s), see
docs/performance.md; this measures everything around them.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402

from agent.cli import _make_ledger  # noqa: E402
from agent.config import load  # noqa: E402
from agent.exporter import make_registry  # noqa: E402
from agent.sampler import Sampler  # noqa: E402
from agent.sources.replay import ReplaySource  # noqa: E402
from agent.trace import Trace  # noqa: E402
from agent.trace import load as load_trace  # noqa: E402


def n_gpu_trace(trace: Trace, n: int) -> Trace:
    t = copy.deepcopy(trace)
    g0 = t.header["gpus"][0]
    t.header["gpus"] = [{**g0, "index": i, "uuid": f"{g0['uuid']}-{i}"} for i in range(n)]
    for row in t.rows:
        row["gpus"] = {str(i): row["gpus"]["0"] for i in range(n)}
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--ticks", type=int, default=2000)
    args = ap.parse_args()
    settings = load(ROOT / "deploy" / "config.tou.toml")
    trace = n_gpu_trace(load_trace(ROOT / "fixtures" / "h100_trace_a.jsonl"), args.gpus)
    src = ReplaySource(trace, loop=True)
    sampler = Sampler(src, clock=lambda: (src.t, src.t), ledger=_make_ledger(settings),
                      host=src.host_source(settings.host))
    registry = make_registry(lambda: sampler.snapshot)
    sampler.tick()
    for _ in range(50):  # warm up
        src.seek(src.t + 1.0)
        sampler.tick()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.ticks):
        src.seek(src.t + 1.0)
        sampler.tick()
    tick_cpu = (time.process_time() - cpu0) / args.ticks
    tick_wall = (time.perf_counter() - wall0) / args.ticks
    n_scrapes = 200
    cpu0 = time.process_time()
    for _ in range(n_scrapes):
        body = generate_latest(registry)
    scrape_cpu = (time.process_time() - cpu0) / n_scrapes
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.gpus} GPUs, {args.ticks} ticks of 1 s trace time, host model, TOU tariff, PUE, carbon, amortisation")
    print(f"CPU per tick:   {tick_cpu * 1e6:8.1f} µs  (wall {tick_wall * 1e6:.1f} µs) "
          f"= {tick_cpu * 100:.3f} % of one core at a 1 s tick")
    lines = body.count(b"\n")
    print(f"CPU per scrape: {scrape_cpu * 1e6:8.1f} µs  ({len(body)} bytes, {lines} lines)")
    print(f"peak RSS:       {rss_mib:8.1f} MiB (includes the {args.gpus}-GPU trace held in memory)")
    print(f"counter reads:  {sampler.counter_reads} ({sampler.counter_reads / args.gpus / (args.ticks + 50):.3f} per GPU per tick)")


if __name__ == "__main__":
    main()
