"""Issue 15, item 2: identity facts are untrusted input, bounded at the edge.

With Slurm's SLUID cgroup naming the job id comes from the process's own ``SLURM_JOB_ID``,
which its user sets. A newline in it, or 300 characters, or a 10 kB unit name in a cgroup
path, used to become a workload key and labels as they were: saved, then refused by the
loader at the next start, which set the whole state file aside (every GPU's totals from 0),
and exported whole on /metrics (a 10,254-character ``slurm_job``).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from agent.accounting import Ledger
from agent.attribution.identity import MAX_LABEL_CHARS, IdentityResolver, bounded
from agent.attribution.split import resolver_keys
from test_split import GIB, NODE, gpu_total, metrics_text, node, run

HOSTILE = {
    1500: "12\n34",             # a newline: the old loader's _KEY refused it
    1501: "9" * 300,            # too long for a key
    1502: "12_34",              # what a careless cleaning would merge with the first
}


def hostile_tree(tmp_path):
    root = tmp_path / "proc"
    shutil.copytree(NODE, root, symlinks=True)
    for pid, job in HOSTILE.items():
        d = root / str(pid)
        if not d.exists():
            shutil.copytree(root / "1500", d)
            stat = (d / "stat").read_text()
            (d / "stat").write_text(stat.replace("1500 (", f"{pid} (", 1))
        (d / "environ").write_bytes(b"PATH=/usr/bin\0SLURM_JOB_ID=" + job.encode() + b"\0SLURM_STEP_ID=0\0")
    # A systemd unit name of 10 kB in a cgroup path.
    unit = root / "1503"
    shutil.copytree(root / "1100", unit)
    (unit / "stat").write_text((unit / "stat").read_text().replace("1100 (", "1503 (", 1))
    (unit / "cgroup").write_text("0::/system.slice/" + "x" * 10_000 + ".service\n")
    return root


def test_bounded_values_are_safe_stable_and_never_merge():
    assert bounded("4242") == "4242" and bounded("user@1000.service") == "user@1000.service"
    a, b = bounded("12\n34"), bounded("12_34")
    assert a != b and b == "12_34" and re.fullmatch(r"12_34~[0-9a-f]{12}", a)
    long = bounded("9" * 300)
    assert len(long) == MAX_LABEL_CHARS and long == bounded("9" * 300) != bounded("9" * 301)
    assert bounded("") == "" and bounded(None) is None


def test_hostile_job_ids_and_units_are_bounded_on_metrics_and_never_cost_the_state(tmp_path):
    resolver = IdentityResolver(hostile_tree(tmp_path), lookup_user=lambda uid: None)
    src, sampler = node(key_of=resolver_keys(resolver))
    src.gpus[0].procs = lambda t: [(1500, GIB), (1501, GIB), (1502, GIB), (1503, GIB), (1100, GIB)]
    run(src, sampler, 6)
    sampler.tick(final=True)
    rows = {r.workload: r for r in sampler.snapshot.workloads}
    jobs = {r.labels["slurm_job"] for r in rows.values() if r.labels["kind"] == "slurm"}
    assert len(jobs) == 3 and "12_34" in jobs  # three jobs stay three
    assert all(len(k) <= MAX_LABEL_CHARS + len("container:") for k in rows)
    text = metrics_text(sampler)
    longest = max(len(line) for line in text.splitlines())
    assert longest < 1000, longest
    assert "\\n" not in "".join(line for line in text.splitlines() if line.startswith("gpucost_workload_"))
    # Saved, the state loads whole at the next start: the node's totals and the workloads'.
    state = json.loads(json.dumps(sampler.ledger.state()))
    again = Ledger()
    again.load_state(state)
    assert dict(again.gpu_energy) == dict(sampler.ledger.gpu_energy)
    assert again.workloads.rows() == sampler.ledger.workloads.rows()
    assert math.fsum(r.energy_joules for r in again.workloads.rows()) == pytest.approx(gpu_total(sampler), rel=1e-12)


def test_a_workload_row_the_loader_refuses_costs_only_the_workloads(caplog):
    """A state written before the edge bounded keys (or by hand): one bad key sets the
    workloads aside with one line, and the node's totals load."""
    src, sampler = node()
    src.gpus[0].procs = lambda t: [(3, GIB)]
    run(src, sampler, 6)
    state = json.loads(json.dumps(sampler.ledger.state()))
    state["workloads"]["rows"][0][1] = "slurm:12\n34"
    fresh = Ledger()
    fresh.load_state(state)
    assert dict(fresh.gpu_energy) == dict(sampler.ledger.gpu_energy) and len(fresh.workloads) == 0
    assert "workloads' totals were set aside" in caplog.text


def test_hostile_identities_through_the_real_process_keep_the_node_totals_across_a_restart(tmp_path):
    """The same hostile /proc tree read by the real daemon (``[attribution] proc_root``), its
    PIDs listed by the fake NVML on GPU 0: bounded labels on /metrics, three jobs stay three,
    and after a SIGTERM the next process loads the whole state (node and workloads) and counts on."""
    from test_faults import STEADY, Node, energy, until

    tree = hostile_tree(tmp_path)
    script = json.loads(json.dumps(STEADY))
    script["gpus"]["0"]["processes"] = [[pid, GIB] for pid in (1500, 1501, 1502, 1503, 1100)]
    node = Node(tmp_path, script)
    node.config.write_text(node.config.read_text() + f'[attribution]\nproc_root = "{tree}"\nuser_names = false\n')
    agent = node.agent()

    def jobs(m):
        return {s.labels["slurm_job"] for s in m.get("gpucost_workload_gpu_energy_joules", [])
                if s.labels.get("kind") == "slurm"}

    until(agent, lambda m: len(jobs(m)) == 3 and energy(m, 0) > 0, 10, "three Slurm jobs on GPU 0")
    status, text = agent.get("/metrics")
    assert status == 200
    workload_lines = [line for line in text.splitlines() if line.startswith("gpucost_workload_")]
    assert workload_lines and max(len(line) for line in text.splitlines()) < 1000
    assert not any("\\n" in line for line in workload_lines)  # no escaped newline in any label
    m = agent.metrics()
    assert "12_34" in jobs(m) and all(len(j) <= MAX_LABEL_CHARS for j in jobs(m))
    units = {s.labels["unit"] for s in m["gpucost_workload_gpu_energy_joules"]}
    assert max(len(u) for u in units) == MAX_LABEL_CHARS  # the 10 kB unit, shortened
    assert agent.stop() == 0
    saved = node.saved_energy()
    state = json.loads((node.state_dir / "state.json").read_text())
    assert len(state["workloads"]["rows"]) >= 5

    again = node.agent()
    try:
        m = until(again, lambda m: energy(m, 0) > saved[next(iter(sorted(saved)))], 10, "GPU 0 counting on")
        assert len(jobs(m)) == 3
    finally:
        assert again.stop() == 0
    assert "set aside" not in again.output, again.output[-2000:]
