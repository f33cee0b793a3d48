"""The quick start shows whose money it is: the demo plays a real recording of two users'
processes sharing one H100 (agent/data/h100_demo.jsonl.gz, built by fixtures/make_demo_trace.py
from fixtures/h100_two_users.jsonl.gz), so `gpu-cost-agent demo` exports per-workload energy and
cost with the recorded identities, and the workloads add up to the GPU."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time

from agentproc import AgentProcess, past_first_loop, value
from helpers import ROOT, counter_delta_joules

from agent.cli import demo_trace_path
from agent.trace import load

RECORDING = ROOT / "fixtures" / "h100_two_users.jsonl.gz"
BUILDER = ROOT / "fixtures" / "make_demo_trace.py"
#: Who each recorded PID was (benchmarks/h100_attrib/run.sh): worker A as root, worker B as uid 65534.
EXPECTED = {"581": ("user:0", "0"), "610": ("user:65534", "65534")}
WORKLOADS = {"unallocated", "user:0", "user:65534"}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]


def test_the_demo_trace_is_the_recording_with_who_each_process_was():
    """Every reading of the demo trace is the recording's; only `identities` is added, once per
    PID on the row where it is first listed, and the committed file is what the builder makes."""
    assert demo_trace_path().name == "h100_demo.jsonl.gz" and demo_trace_path().exists()
    demo, rec = _lines(demo_trace_path()), _lines(RECORDING)
    assert len(demo) == len(rec) == 750
    assert {k: v for k, v in demo[0].items() if k != "note"} == {k: v for k, v in rec[0].items() if k != "note"}
    assert demo[0]["note"].startswith(rec[0]["note"])
    seen: dict[str, int] = {}
    for i, (d, r) in enumerate(zip(demo[1:], rec[1:]), 1):
        g = dict(d["gpus"]["0"])
        for pid, facts in g.pop("identities", {}).items():
            assert pid not in seen, f"PID {pid} described twice"
            seen[pid] = i
            workload, user = EXPECTED[pid]
            assert facts["workload"] == workload
            assert facts["labels"]["kind"] == "user" and facts["labels"]["user"] == user
        assert {**d, "gpus": {"0": g}} == r, f"row {i} differs from the recording"
    first_listed = {}
    for i, r in enumerate(rec[1:], 1):
        for pid, _ in r["gpus"]["0"].get("processes") or ():
            first_listed.setdefault(str(pid), i)
    assert seen == first_listed
    assert subprocess.run([sys.executable, str(BUILDER), "--check"], cwd=ROOT).returncode == 0


def _workloads(m: dict) -> dict[str, dict]:
    energy = {s.labels["workload"]: s for s in m["gpucost_workload_gpu_energy_joules"] if s.name.endswith("_total")}
    cost: dict[str, dict[str, float]] = {}
    for s in m["gpucost_workload_cost"]:
        if s.name.endswith("_total") and s.labels["currency"] == "EUR":
            cost.setdefault(s.labels["workload"], {})[s.labels["cost_kind"]] = s.value
    return {k: {"labels": s.labels, "joules": s.value, "eur": cost[k]["energy"], "kinds": cost[k]}
            for k, s in energy.items()}


#: Per cost kind, the node's totals it adds up to.
NODE_FAMILY = {"energy": "gpucost_energy_cost", "hardware": "gpucost_hardware_cost", "running": "gpucost_running_cost"}


def node_totals(m: dict) -> dict[str, float]:
    """The node's total per cost kind: every component's (GPUs, host, node) in EUR."""
    return {kind: math.fsum(s.value for s in m[family] if s.name.endswith("_total") and s.labels["currency"] == "EUR")
            for kind, family in NODE_FAMILY.items()}


def test_demo_exports_workloads_with_identities_that_add_up_to_the_gpu():
    """The real demo process over HTTP, a whole loop of the trace and more: the idle seconds are
    `unallocated`, the two users' processes are their workloads, and at every scrape the
    workloads' energy and cost are the GPU's."""
    one_loop = counter_delta_joules(load(demo_trace_path()))
    agent = AgentProcess("demo", "--speed", "25")
    try:
        agent.wait_ready()
        past_first_loop(agent)
        for _ in range(3):
            m = agent.metrics()
            w = _workloads(m)
            gpu_j = math.fsum(s.value for s in m["gpucost_gpu_energy_joules"] if s.name.endswith("_total"))
            gpu_eur = value(m, "gpucost_energy_cost_total", component="gpu", gpu="0", currency="EUR")
            assert set(w) == WORKLOADS
            assert gpu_j >= one_loop
            assert math.isclose(math.fsum(x["joules"] for x in w.values()), gpu_j, rel_tol=1e-9, abs_tol=0)
            # Fully loaded: per cost kind, the workloads (unallocated included) are the node's total.
            node = node_totals(m)
            assert all(node.values()), node
            for kind, total in node.items():
                charged = math.fsum(x["kinds"][kind] for x in w.values())
                assert math.isclose(charged, total, rel_tol=1e-9, abs_tol=0), (kind, charged, total)
            # Seconds held add up to the seconds the GPU's amortisation accrued over (30,000 EUR, 5 years).
            held = math.fsum(s.value for s in m["gpucost_workload_gpu_seconds"] if s.name.endswith("_total"))
            gpu_hw = value(m, "gpucost_hardware_cost_total", component="gpu", gpu="0", currency="EUR")
            assert math.isclose(held * 30000 / (5 * 365.25 * 86400), gpu_hw, rel_tol=1e-9), (held, gpu_hw)
            time.sleep(0.3)
        print(f"\ndemo after {value(m, 'gpucost_replay_loops_total'):.0f} loop(s): GPU {gpu_j:.3f} J, "
              f"{gpu_eur:.6f} EUR; " + ", ".join(f"{k} {x['joules']:.3f} J ({x['joules'] / gpu_j:.1%}) "
                                                   f"{x['eur']:.6f} EUR" for k, x in sorted(w.items())))
        for key, user in (("user:0", "0"), ("user:65534", "65534")):
            labels = w[key]["labels"]
            assert labels["kind"] == "user" and labels["user"] == user, labels
            assert labels["slurm_job"] == labels["unit"] == labels["pod"] == labels["namespace"] == "", labels
        assert w["unallocated"]["labels"]["kind"] == "unallocated" and w["unallocated"]["labels"]["user"] == ""
        # Worker A (8192² back to back) against worker B (4096² at 50 % duty); the idle seconds.
        assert w["user:0"]["joules"] > 4 * w["user:65534"]["joules"] > 0
        assert w["unallocated"]["joules"] > 0 and w["user:0"]["eur"] > w["user:65534"]["eur"] > 0
        # No read failed, no counter reset at the loop's seam (a tick skipped on a busy machine is not the data's).
        errors = {s.labels["kind"]: s.value for s in m["gpucost_agent_errors"] if s.name.endswith("_total")}
        assert not {k: v for k, v in errors.items() if v and k != "tick_skipped"}, errors
    finally:
        assert agent.stop() == 0
    assert "replaying" in agent.output and "h100_demo.jsonl.gz" in agent.output
