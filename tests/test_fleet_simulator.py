"""benchmarks/fleet/simulate.py writes what the agent serves: the template is a real agent's
exposition, and the simulated nodes keep its families, label sets and counter semantics."""

from __future__ import annotations

import importlib.util
import re
import sys
import time

import pytest
from collections import defaultdict

from agentproc import ROOT, AgentProcess

SIMULATE = ROOT / "benchmarks" / "fleet" / "simulate.py"
TARGET = {"job", "instance", "cluster", "team"}


def load_simulate():
    spec = importlib.util.spec_from_file_location("fleet_simulate", SIMULATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def label_names(text: str) -> dict[str, set[frozenset[str]]]:
    """Sample name -> the label-name sets it comes with (comments and replay families left out)."""
    out: dict[str, set[frozenset[str]]] = defaultdict(set)
    for line in text.splitlines():
        if line and not line.startswith("#") and "gpucost_replay_" not in line:
            m = re.match(r"([\w:]+)(?:\{(.*)\})?\s", line)
            out[m.group(1)].add(frozenset(re.findall(r'(\w+)="', m.group(2) or "")))
    return dict(out)


def test_the_template_is_what_a_demo_agent_serves(tmp_path):
    agent = AgentProcess("demo", "--speed", "5", "--tick", "5", "--state-dir", str(tmp_path), "--log-level", "warning")
    template = (SIMULATE.parent / "template.prom").read_text()
    try:
        agent.wait_ready()
        # Workload and host power series appear with the first process samples, a few ticks in.
        deadline = time.monotonic() + 20
        while True:
            status, text = agent.get("/metrics")
            assert status == 200
            if label_names(text).keys() >= label_names(template).keys() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        agent.stop()
    assert label_names(template) == label_names(text), (
        "benchmarks/fleet/template.prom is stale: rewrite it with "
        ".venv/bin/python benchmarks/fleet/simulate.py --capture-template")


def test_a_simulated_node_keeps_the_families_labels_and_counters():
    sim = load_simulate()
    day = 86400.0
    fleet = sim.Fleet(nodes=2, gpus=4, mode="slurm", jobs_per_gpu_day=8, workloads=True, start=0.0, end=day)
    times = [k * 900.0 for k in range(97)]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for prefix, value, t in sim.samples(fleet, times):
        series[prefix].append((t, value))
    node_t, gpu_t, wl_t, _ = sim.read_template()
    jobs = [j for node in fleet.jobs for gpu in node for j in gpu if j.start < times[-1] and j.end + sim.RETENTION_S > 0]
    assert jobs, "no job in a day at 8 jobs per GPU per day"
    # 70 per node, 32 per GPU, 5 per workload: unallocated on every GPU and every job seen.
    expected = 2 * (len(node_t) + 1) + 2 * 4 * len(gpu_t) + 2 * 4 * len(wl_t) + len(jobs) * len(wl_t)
    assert len(series) == expected
    template = label_names((SIMULATE.parent / "template.prom").read_text())
    for prefix, points in series.items():
        name = prefix.split("{", 1)[0]
        labels = frozenset(re.findall(r'(\w+)="', prefix))
        assert TARGET <= labels, prefix
        if name != "up":
            assert labels - TARGET in template[name], prefix
        if name.endswith("_total"):
            values = [v for _, v in sorted(points)]
            assert values == sorted(values), f"{prefix} goes down: {values}"
    # A job is written at its start and its end, whatever the step.
    job = next(j for j in jobs if 0 < j.start and j.end + sim.RETENTION_S < times[-1])
    [prefix] = [p for p in series if f'slurm_job="{job.labels["slurm_job"]}"' in p
                and p.startswith("gpucost_workload_gpu_seconds_total")]
    seen = sorted(series[prefix])
    assert seen[0][0] == job.start and seen[-1][0] == job.end + sim.RETENTION_S
    assert seen[-1][1] == round(job.end - job.start, 3)


def test_a_simulated_gpus_seconds_and_joules_add_up_over_its_workloads():
    """Each GPU's time and energy are its jobs' plus ``unallocated``'s, as the agent's are."""
    sim = load_simulate()
    end = 86400.0
    fleet = sim.Fleet(nodes=2, gpus=2, mode="slurm", jobs_per_gpu_day=8, workloads=True, start=0.0, end=end)
    last: dict[str, float] = {}
    for prefix, value, t in sim.samples(fleet, [k * 3600.0 for k in range(25)]):
        if t <= end:
            last[prefix] = value
    for i in range(2):
        for g in range(2):
            uuid = f'uuid="GPU-{i:08x}-{g:04x}-'
            mine = {p: v for p, v in last.items() if uuid in p}
            secs = sum(v for p, v in mine.items() if p.startswith("gpucost_workload_gpu_seconds_total"))
            joules = sum(v for p, v in mine.items() if p.startswith("gpucost_workload_gpu_energy_joules_total"))
            [counter] = [v for p, v in mine.items()
                         if p.startswith("gpucost_gpu_energy_joules_total") and 'source="counter"' in p]
            jobs = [j for j in fleet.jobs[i][g] if j.start < end]
            # a job exported at the start that began before it: its series holds its time before the start too
            before = {id(j): min(j.end, 0.0) - j.start for j in jobs if j.start < 0 <= j.end + sim.RETENTION_S}
            assert secs == pytest.approx(end + sum(before.values()), abs=0.01)
            assert joules == pytest.approx(
                counter + sum(v * fleet.job_power(i, g, j) for j in jobs for k, v in before.items() if k == id(j)),
                abs=0.01 * len(mine))
