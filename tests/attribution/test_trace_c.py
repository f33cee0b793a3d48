"""Issue 9, Done-means: the real two-process H100 recording, split among its workloads.

fixtures/h100_trace_c.jsonl: one H100, no process listed until 8.5 s; A (PID 402, a
full-duty bf16 8192² matmul loop) listed from 8.5 s; B (PID 428, 4096² at 50 % duty)
listed from 16.6 s. Replayed, PIDs become workloads ``pid:<pid>`` (they are the
recording machine's).
"""

from __future__ import annotations

import math

import pytest

from agent.trace import load
from agentproc import AgentProcess
from helpers import H100_TRACE_C, counter_at, replay_through_sampler

A, B = "pid:402", "pid:428"


def test_trace_c_through_the_sampler_adds_up_and_the_full_duty_process_gets_more():
    trace = load(H100_TRACE_C)
    sampler = replay_through_sampler(trace, attribution=True)
    gpu = sum(sampler.snapshot.gpus[0].energy_joules.values())
    w = {r.workload: r.energy_joules for r in sampler.snapshot.workloads}
    print("\ntrace_c, counter path, 1 s ticks: GPU %.3f J; " % gpu
          + ", ".join(f"{k} {v:.3f} J" for k, v in sorted(w.items())))
    assert set(w) == {A, B, "unallocated"}
    assert math.fsum(w.values()) == pytest.approx(gpu, rel=1e-9)
    assert w[A] > 5 * w[B]
    # Before 8.5 s no process is listed: the ticks at 1 … 8 s go to unallocated, nothing after.
    before = counter_at(trace, trace.start + 8.0) - counter_at(trace, trace.start)
    assert w["unallocated"] == pytest.approx(before, rel=0.05)


def test_nothing_after_the_first_listing_goes_to_unallocated():
    trace = load(H100_TRACE_C)
    from agent.accounting import Ledger
    from agent.attribution.split import Attributor, replay_keys
    from agent.sampler import Sampler
    from agent.sources.replay import ReplaySource

    src = ReplaySource(trace)
    led = Ledger()
    sampler = Sampler(src, clock=lambda: (src.t, src.t), ledger=led,
                      attribution=Attributor(led.workloads, replay_keys), counter_interval=5.0)
    sampler.tick()
    seen = {}
    while not src.finished:
        src.advance(1.0)
        sampler.tick(final=src.finished)
        seen[round(src.t - trace.start)] = {r.workload: r.energy_joules for r in sampler.snapshot.workloads}
    # The counter interval closing at 10 s settles the ticks up to it: unallocated is final from then on.
    assert seen[10]["unallocated"] == seen[max(seen)]["unallocated"] > 0
    assert A not in seen[5] and B not in seen[15]


def test_trace_c_on_metrics_of_the_real_process(tmp_path):
    agent = AgentProcess("replay", str(H100_TRACE_C), "--speed", "20", "--config", "deploy/config.tou.toml")
    try:
        agent.wait_ready()
        agent.wait_finished()
        fam = agent.metrics()
    finally:
        agent.stop()
    gpu = sum(s.value for s in fam["gpucost_gpu_energy_joules"] if s.name.endswith("_total"))
    gpu_cost = next(s.value for s in fam["gpucost_energy_cost"]
                    if s.name.endswith("_total") and s.labels["component"] == "gpu")
    # The energy kind of the workloads' cost: the GPU's energy and the host's, if any (one GPU: all of it).
    node_energy_cost = math.fsum(s.value for s in fam["gpucost_energy_cost"] if s.name.endswith("_total"))
    assert node_energy_cost >= gpu_cost  # the trace holds no host readings: equal here
    energy = {s.labels["workload"]: s for s in fam["gpucost_workload_gpu_energy_joules"] if s.name.endswith("_total")}
    cost = {s.labels["workload"]: s for s in fam["gpucost_workload_cost"]
            if s.name.endswith("_total") and s.labels["cost_kind"] == "energy"}
    hardware = math.fsum(s.value for s in fam["gpucost_workload_cost"]
                         if s.name.endswith("_total") and s.labels["cost_kind"] == "hardware")
    assert hardware == pytest.approx(math.fsum(s.value for s in fam["gpucost_hardware_cost"]
                                               if s.name.endswith("_total")), rel=1e-9)
    print("\ntrace_c on /metrics: GPU %.3f J, %.6f EUR; " % (gpu, gpu_cost) + ", ".join(
        f"{k} {energy[k].value:.3f} J {cost[k].value:.6f} EUR" for k in sorted(energy)))
    assert set(energy) == set(cost) == {A, B, "unallocated"}
    assert math.fsum(s.value for s in energy.values()) == pytest.approx(gpu, rel=1e-6)
    assert math.fsum(s.value for s in cost.values()) == pytest.approx(node_energy_cost, rel=1e-9)
    assert energy[A].value > energy[B].value
    assert energy["unallocated"].labels["kind"] == "unallocated"
    for s in energy.values():
        assert set(s.labels) == {"gpu", "uuid", "gpu_instance", "workload", "kind", "user", "slurm_job",
                                 "container", "pod_uid", "namespace", "pod", "unit"}
    assert {s.labels["currency"] for s in cost.values()} == {"EUR"}
