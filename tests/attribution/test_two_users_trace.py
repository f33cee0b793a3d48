"""Two real processes of two users on a real H100, recorded by `gpu-cost-agent record` on the
lent GPU (benchmarks/h100_attrib/run.sh): worker A (uid 0, PID 581, bf16 8192² matmuls back to
back for 40 s) from ~10 s, worker B (uid 65534, PID 610, 4096² at 50 % duty for 28 s) from
~18 s. Replayed, PIDs become workloads ``pid:<pid>`` (they are the recording machine's)."""

from __future__ import annotations

import math

import pytest

from agent.trace import load
from helpers import ROOT, counter_delta_joules, replay_through_sampler

TRACE = ROOT / "fixtures" / "h100_two_users.jsonl.gz"
A, B = "pid:581", "pid:610"


def test_two_users_split_adds_up_to_the_counter_and_follows_the_load():
    trace = load(TRACE)
    sampler = replay_through_sampler(trace, attribution=True)
    gpu = sum(sampler.snapshot.gpus[0].energy_joules.values())
    w = {r.workload: r.energy_joules for r in sampler.snapshot.workloads}
    print("\nh100_two_users, 1 s ticks: GPU %.3f J; " % gpu
          + ", ".join(f"{k} {v:.3f} J ({v / gpu:.1%})" for k, v in sorted(w.items())))
    assert gpu == pytest.approx(counter_delta_joules(trace), abs=0.01)  # the counter path is exact
    assert math.fsum(w.values()) == pytest.approx(gpu, rel=1e-9)       # every joule once
    assert {A, B, "unallocated"} <= set(w)
    assert w[A] > 4 * w[B] > 0           # full duty at 8192² against 50 % duty at 4096²
    assert w["unallocated"] > 0          # the seconds before A's context exists
