"""Issue 17: per-job records — one line per workload when it expires, whole or not at all.

The writer (agent/jobrecords.py) on the real WorkloadTotals; a torn tail cut when the file is
next opened; a failed write cut back; rotation by month and size; a writer killed with
SIGKILL in the middle of its writes leaves only whole records; and the real agent (``run`` on
the fake NVML), killed with -9 and restarted while workloads come and go, records each
workload with its counters' final values as /metrics last showed them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentproc import ROOT, AgentProcess

from agent import jobrecords
from agent.attribution.workloads import UNALLOCATED, WorkloadTotals, pseudo_labels
from agent.jobrecords import JobRecords
from agent.report.records import read_records

LABELS = {"kind": "slurm", "user": "ann", "slurm_job": "42", "container": "", "pod_uid": "", "namespace": "",
          "pod": "", "unit": ""}
T0 = 1_791_000_000.0  # 2026-10-03


def totals_with_a_job(writer) -> WorkloadTotals:
    w = WorkloadTotals(retention_seconds=300)
    w.on_expire = writer
    w.charge("GPU-1", "slurm:42", LABELS, 1234.5, 0.1 / 3, "EUR", T0)
    w.charge_capacity("GPU-1", "slurm:42", LABELS, 60.0, {("hardware", "EUR"): 0.7, ("running", "EUR"): 1 / 7}, T0)
    w.charge("GPU-1", UNALLOCATED, pseudo_labels(UNALLOCATED), 10.0, 0.001, "EUR", T0)
    return w


def rec(n: int, **extra) -> dict:
    """A record as the writer makes them (what the reader accepts), numbered ``n``."""
    return {"v": 1, "id": f"test-{n}", "n": n, "host": "h", "uuid": "GPU-1", "gpu_instance": "", "workload": f"slurm:{n}",
            "labels": LABELS, "last_seen": T0, "energy_joules": 1.0, "gpu_seconds": 1.0,
            "cost": {"energy": {"EUR": 0.1}}, **extra}


def lines(directory: Path) -> list[bytes]:
    out = []
    for p in sorted(directory.rglob("*.jsonl")):
        out.extend(p.read_bytes().splitlines(keepends=True))
    return out


def test_a_workload_is_recorded_with_its_final_totals_when_it_expires(tmp_path):
    writer = JobRecords(tmp_path, host="node-a", clock=lambda: T0 + 400)
    w = totals_with_a_job(writer)
    assert w.expire(T0 + 200) == 0 and writer.written == 0
    assert w.expire(T0 + 301) == 2  # the job and unallocated expire; unallocated has no record
    (line,) = lines(tmp_path)
    rec = json.loads(line)
    assert rec["workload"] == "slurm:42" and rec["uuid"] == "GPU-1" and rec["host"] == "node-a"
    assert rec["labels"] == LABELS and rec["last_seen"] == T0 and rec["v"] == 1
    assert rec["energy_joules"] == 1234.5 and rec["gpu_seconds"] == 60.0
    assert rec["cost"] == {"energy": {"EUR": 0.1 / 3}, "hardware": {"EUR": 0.7}, "running": {"EUR": 1 / 7}}  # exact
    assert (tmp_path / "records" / "workloads-2026-10.jsonl").exists()
    assert rec["id"] == jobrecords.record_id("node-a", "GPU-1", "slurm:42", T0)


def test_a_torn_last_line_is_cut_when_the_file_is_opened_again(tmp_path):
    writer = JobRecords(tmp_path, host="h", clock=lambda: T0)
    writer.append([rec(1), rec(2)])
    path = writer.path_for(T0)
    with open(path, "ab") as fh:
        fh.write(b'{"v": 1, "n": 3, "half')  # a power loss in the middle of a write
    records, stats = read_records(tmp_path)  # the reader never half-reads it
    assert stats["unreadable"] == 1
    JobRecords(tmp_path, host="h", clock=lambda: T0).append([rec(4)])
    assert [json.loads(x)["n"] for x in lines(tmp_path)] == [1, 2, 4]
    assert all(x.endswith(b"\n") for x in lines(tmp_path))


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    writer = JobRecords(tmp_path, host="h", clock=lambda: T0)
    writer.append([rec(1)])
    real = os.write
    monkeypatch.setattr(jobrecords.os, "write", lambda fd, data: real(fd, data[: len(data) // 2]))  # disk full
    w = totals_with_a_job(writer)
    w.expire(T0 + 301)  # the hook never raises into the tick
    assert writer.failed == 1
    monkeypatch.setattr(jobrecords.os, "write", real)
    assert [json.loads(x)["n"] for x in lines(tmp_path)] == [1]
    writer.append([rec(2)])
    assert [json.loads(x).get("n") for x in lines(tmp_path)] == [1, 2]


def test_files_rotate_by_month_and_size_and_old_months_go(tmp_path, monkeypatch):
    monkeypatch.setattr(jobrecords, "MAX_FILE_BYTES", 700)
    now = [T0]
    writer = JobRecords(tmp_path, host="h", clock=lambda: now[0])
    for n in range(6):
        writer.append([rec(n, pad="x" * 80)])
    names = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert names == ["workloads-2026-10.1.jsonl", "workloads-2026-10.2.jsonl", "workloads-2026-10.jsonl"]
    now[0] = T0 + 400 * 86400  # 13 months later: 2026-10 is past KEEP_MONTHS
    writer.append([rec(99)])
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["workloads-2027-11.jsonl"]


def test_the_reader_keeps_each_record_once(tmp_path):
    writer = JobRecords(tmp_path, host="node-a", clock=lambda: T0 + 400)
    w = totals_with_a_job(writer)
    state = w.state()
    w.expire(T0 + 301)
    again = WorkloadTotals.parse_state(json.loads(json.dumps(state)))  # killed before the state was saved
    again.on_expire = writer
    again.configure(100, 300)
    again.expire(T0 + 302)  # recorded a second time, with the same id
    assert len(lines(tmp_path)) == 2
    records, stats = read_records(tmp_path)
    assert len(records) == 1 and stats["duplicates"] == 1


WRITER = r"""
import sys, time
from agent.jobrecords import JobRecords
sys.path.insert(0, sys.argv[2])
from test_jobrecords import rec
w = JobRecords(sys.argv[1], host="h")
n = 0
print("ready", flush=True)
while True:
    w.append([rec(n + k, pad="x" * 2000) for k in range(64)])  # 128 KB per write
    n += 64
"""


def test_a_writer_killed_with_sigkill_leaves_only_whole_records(tmp_path):
    rng = random.Random(5)
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ROOT / "tests")], cwd=ROOT,
                                stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records, stats = read_records(tmp_path)
        assert stats["unreadable"] <= 1  # at most a torn last line, never a half record read
        JobRecords(tmp_path, host="h").append([rec(-1 - round_)])  # the next open cuts a torn tail
        for x in lines(tmp_path):
            assert x.endswith(b"\n") and json.loads(x)["v"] == 1
    total = len(lines(tmp_path))
    assert total > 6 * 64
    print(f"\n{total} records written across 6 SIGKILLs; every line whole")


# -- the real agent ----------------------------------------------------------------------------


def _scenario(path: Path, pids: list[int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": {"0": {"processes": [[p, 1 << 30] for p in pids], "watts": 300.0}}}))
    os.replace(tmp, path)


def _cost(agent: AgentProcess) -> dict[tuple[str, str, str], float]:
    out = {}
    for s in agent.metrics().get("gpucost_workload_cost", []):
        if s.name.endswith("_total") and s.labels["workload"] != UNALLOCATED:
            out[(s.labels["workload"], s.labels["cost_kind"], s.labels["currency"])] = s.value
    return out


def test_the_real_agent_records_each_workload_and_survives_kill_9(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[agent]\ntick_seconds = 0.2\npersist_interval_seconds = 0.5\n'
        '[gpu]\nenergy_counter_interval_seconds = 0.2\n'
        '[attribution]\nretention_seconds = 1\n'
        '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.3\n'
        '[hardware]\ngpu_price = 25000\n')
    state = tmp_path / "state"
    scenario = tmp_path / "scenario.json"
    _scenario(scenario, [])
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fakenvml"), str(ROOT)]), "FAKE_NVML_GPUS": "1",
           "FAKE_NVML_SCRIPT": str(scenario)}
    rng = random.Random(11)
    sleepers = []
    finals: list[dict] = []  # the last values /metrics showed of each workload that then went away
    kills = 0
    agent = None
    try:
        for cycle in range(6):
            if agent is None:
                agent = AgentProcess("run", "--config", str(config), "--state-dir", str(state), env=env)
                agent.wait_ready()
            p = subprocess.Popen(["sleep", "120"])
            sleepers.append(p)
            _scenario(scenario, [p.pid])
            deadline = time.monotonic() + 10
            while not _cost(agent) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.6)
            _scenario(scenario, [])  # the process leaves the GPU: its workload expires 1 s later
            last: dict = {}
            deadline = time.monotonic() + 10
            killed = False
            while time.monotonic() < deadline:
                now = _cost(agent)
                if not now:
                    break
                last = now
                if cycle % 2 == 1 and not killed and rng.random() < 0.5:
                    agent.proc.send_signal(signal.SIGKILL)  # kill -9, while the workload is retained
                    agent.proc.wait()
                    kills += 1
                    killed = True
                    agent = AgentProcess("run", "--config", str(config), "--state-dir", str(state), env=env)
                    agent.wait_ready()
                    continue
                time.sleep(0.05)
            if not killed:
                finals.append(last)
            time.sleep(0.5)
        agent.stop()
        agent = None
    finally:
        if agent is not None:
            agent.stop(signal.SIGKILL)
        for p in sleepers:
            p.kill()
    for x in lines(state / "records"):
        assert x.endswith(b"\n") and json.loads(x)["v"] == 1
    records, stats = read_records(state / "records")
    assert stats["unreadable"] == 0
    # every record equals, to the bit, the last value /metrics showed of its workload
    by_value = {}
    for rec in records:
        for kind, per in rec["cost"].items():
            for cur, v in per.items():
                by_value.setdefault((rec["workload"], kind, cur), []).append(v)
    matched = 0
    for last in finals:
        for key, v in last.items():
            assert v in by_value.get(key, []), (key, v, by_value.get(key))
            matched += 1
    assert len(records) >= 6 and matched >= 3
    print(f"\n{len(records)} records, {stats['duplicates']} duplicate(s) dropped, {kills} kill -9, "
          f"{matched} final values matched exactly")
