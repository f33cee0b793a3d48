"""Identity facts travel in traces: `record` writes who each PID is, once, and a replay
attributes energy to those recorded workloads instead of bare PIDs."""

from __future__ import annotations

import math
import os

import pytest
from fakes import FakeGpu, real_time_source
from helpers import replay_through_sampler

from agent.record import record
from agent.trace import load


def test_record_writes_identities_once_and_replay_uses_them(tmp_path):
    me = os.getpid()  # a real process of this machine, resolved from /proc at record time
    live = real_time_source([FakeGpu(lambda t: 400.0)])
    t0 = live.t0
    live.gpus[0].procs = lambda t: [(me, 1 << 30)] if t > t0 + 0.3 else []
    live.gpus[0].util_samples = [(me, int((t0 + 0.4 + k * 0.1) * 1e6), 95, 30) for k in range(20)]
    path = tmp_path / "rec.jsonl.gz"
    record(live, str(path), duration=1.5, interval=0.05, energy_interval=0.05, samples_interval=0.5)
    trace = load(path)
    facts = [r["gpus"]["0"]["identities"] for r in trace.rows if "identities" in r["gpus"]["0"]]
    expected = f"user:{os.getuid()}"  # this test's own process: a plain process of its user
    assert facts == [{str(me): {"workload": expected, "labels": facts[0][str(me)]["labels"]}}]  # once
    assert expected.startswith("user:") and facts[0][str(me)]["labels"]["kind"] == "user"

    sampler = replay_through_sampler(trace, tick=0.25, attribution=True)
    rows = {r.workload: r for r in sampler.snapshot.workloads}
    assert set(rows) == {expected, "unallocated"}  # the recorded identity, not pid:<pid>
    assert rows[expected].labels["user"] == facts[0][str(me)]["labels"]["user"] != ""
    gpu = sum(sampler.snapshot.gpus[0].energy_joules.values())
    assert math.fsum(r.energy_joules for r in rows.values()) == pytest.approx(gpu, rel=1e-9)
    assert rows[expected].energy_joules > rows["unallocated"].energy_joules
