"""Splitting GPU energy among workloads: the arithmetic, and through the real sampler and ledger."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest

from agent.accounting import Ledger
from agent.attribution.identity import IdentityResolver
from agent.attribution.split import Attributor, apportion, replay_keys, resolver_keys, split_slice
from agent.attribution.workloads import OTHER, UNALLOCATED, WorkloadTotals
from agent.cost import CostModel, PueConfig, TariffConfig
from agent.exporter import make_registry
from fakes import FakeGpu, FakeSource

REPO = Path(__file__).resolve().parents[2]
NODE = REPO / "fixtures" / "proc" / "node"
TARIFF = TariffConfig(currency="EUR", flat_price_per_kwh=0.30)
GIB = 1 << 30


# -- the arithmetic ---------------------------------------------------------------------


def test_split_conserves_energy_exactly_over_random_inputs():
    rng = random.Random(9)
    for _ in range(5000):
        n = rng.randint(1, 8)
        keys = [f"w{i}" for i in range(n)]
        joules = rng.choice([rng.uniform(0, 1e-6), rng.uniform(0, 1e3), rng.uniform(0, 1e7)])
        memory = {k: rng.choice([None, 0, rng.randint(1, 80 * GIB)]) for k in keys}
        sm = {k: rng.choice([0, rng.uniform(0, 100) * rng.randint(1, 25)]) for k in keys if rng.random() < 0.7}
        idle = rng.uniform(-10, 2 * joules)
        parts = split_slice(joules, idle, sm, memory)
        assert set(parts) == set(keys)
        assert math.fsum(parts.values()) == joules  # to the last bit, as the split promises
        assert all(v >= -1e-12 * joules for v in parts.values())


def test_apportion_puts_the_remainder_on_the_largest_part():
    parts = apportion(1.0, {"a": 1, "b": 1, "c": 1})
    assert math.fsum(parts.values()) == 1.0
    assert parts["b"] == parts["c"] == 1 / 3
    with pytest.raises(ValueError):
        apportion(1.0, {"a": 0})


def test_active_part_by_sm_share_idle_part_by_memory_share():
    # 100 J with 40 J idle; A holds 3 GiB and did all the SM work, B holds 1 GiB and did none.
    parts = split_slice(100.0, 40.0, {"A": 97.0 * 5}, {"A": 3 * GIB, "B": 1 * GIB})
    assert parts["A"] == pytest.approx(60.0 + 30.0)
    assert parts["B"] == pytest.approx(10.0)  # holding memory but absent from the samples: no active share


def test_sm_shares_are_the_sums_of_the_samples():
    parts = split_slice(100.0, 0.0, {"A": 97.0 * 3, "B": 55.0 * 1}, {"A": GIB, "B": GIB})
    assert parts["A"] == pytest.approx(100.0 * 291 / 346)
    assert parts["B"] == pytest.approx(100.0 * 55 / 346)


def test_no_sm_samples_everything_by_memory_and_evenly_when_memory_unknown():
    assert split_slice(90.0, 30.0, {}, {"A": 2 * GIB, "B": 1 * GIB}) == pytest.approx({"A": 60.0, "B": 30.0})
    assert split_slice(90.0, 30.0, {}, {"A": 2 * GIB, "B": None}) == pytest.approx({"A": 45.0, "B": 45.0})
    assert split_slice(90.0, 30.0, {"A": 0.0}, {"A": 0, "B": 0}) == pytest.approx({"A": 45.0, "B": 45.0})
    # idle estimate above the slice: all of it is idle, by memory
    assert split_slice(90.0, 500.0, {"A": 10.0}, {"A": 2 * GIB, "B": 1 * GIB}) == pytest.approx({"A": 60.0, "B": 30.0})


# -- through the real sampler and ledger ------------------------------------------------


def node(watts=lambda t: 300.0, *, gpus: int = 1, cost: bool = True, max_workloads: int = 100,
         retention: float = 300.0, key_of=replay_keys, idle_watts=None, procs=None):
    """A fake node sampled by the real Sampler, with attribution, counter every 5 s.

    ``procs``: GPU index → its process list, already listed on the baseline tick (a process first
    listed on a later tick is taken to have come during the tick before, not at the start)."""
    from agent.sampler import Sampler

    src = FakeSource([FakeGpu(watts) for _ in range(gpus)])
    for i, listing in (procs or {}).items():
        src.gpus[i].procs = listing
    led = Ledger(cost=CostModel(TARIFF, PueConfig(value=1.5))) if cost else Ledger()
    led.workloads.configure(max_workloads, retention)
    stage = Attributor(led.workloads, key_of, idle_watts=idle_watts)
    sampler = Sampler(src, clock=src.clock, ledger=led, attribution=stage, counter_interval=5.0)
    sampler.tick()
    return src, sampler


def run(src, sampler, seconds: int) -> None:
    for _ in range(seconds):
        src.t += 1.0
        sampler.tick()


def gpu_total(sampler, index: int = 0) -> float:
    return sum(sampler.snapshot.gpus[index].energy_joules.values())


def workloads(sampler, uuid: str = "GPU-fake-0") -> dict[str, float]:
    return {r.workload: r.energy_joules for r in sampler.snapshot.workloads if r.uuid == uuid}


def util_samples(pid: int, start: float, end: float, sm: int, every: float = 0.2):
    n = int(round((end - start) / every))
    return [(pid, int(round((start + k * every) * 1e6)), sm, 10) for k in range(n)]


def test_a_gpu_without_processes_charges_everything_to_unallocated():
    src, sampler = node()
    run(src, sampler, 20)
    sampler.tick(final=True)
    assert workloads(sampler) == {UNALLOCATED: pytest.approx(gpu_total(sampler), rel=1e-12)}
    assert gpu_total(sampler) == pytest.approx(300.0 * 20, rel=1e-6)
    row = sampler.snapshot.workloads[0]
    assert row.labels["kind"] == "unallocated"
    cost = sampler.ledger.energy_cost[("gpu:GPU-fake-0", "EUR")]
    assert row.cost["EUR"] == pytest.approx(cost, rel=1e-12)


def test_two_processes_split_by_sm_activity_above_idle_and_memory_below():
    t0 = 1_800_000_000.0
    src, sampler = node(lambda t: 500.0, idle_watts=100.0)
    g = src.gpus[0]
    g.procs = lambda t: [(402, 3 * GIB), (428, 1 * GIB)]
    # A at 90 % SM on 4 of every 5 samples, B at 90 % on 1 of 5.
    g.util_samples = sorted(util_samples(402, t0, t0 + 40, 90, 0.25) + util_samples(428, t0 + 0.1, t0 + 40, 90, 1.0),
                            key=lambda s: s[1])
    run(src, sampler, 30)
    sampler.tick(final=True)
    w = workloads(sampler)
    total = gpu_total(sampler)
    assert set(w) == {"pid:402", "pid:428"}
    assert math.fsum(w.values()) == pytest.approx(total, rel=1e-12)
    # active 400 W split 4:1, idle 100 W split 3:1 (memory)
    assert w["pid:402"] == pytest.approx(30 * (400 * 0.8 + 100 * 0.75), rel=0.02)
    assert w["pid:428"] == pytest.approx(30 * (400 * 0.2 + 100 * 0.25), rel=0.05)
    cost = sampler.ledger.energy_cost[("gpu:GPU-fake-0", "EUR")]
    costs = {r.workload: r.cost["EUR"] for r in sampler.snapshot.workloads}
    assert math.fsum(costs.values()) == pytest.approx(cost, rel=1e-12)
    assert costs["pid:402"] / cost == pytest.approx(w["pid:402"] / total, rel=1e-9)


def test_idle_power_estimated_from_ticks_at_zero_utilisation():
    src, sampler = node(lambda t: 80.0 if t < 1_800_000_010 else 480.0)
    g = src.gpus[0]
    g.utilization = 0.0
    run(src, sampler, 10)
    assert sampler.attribution.idle_watts_of(0) == 80.0
    g.utilization = 1.0
    g.procs = lambda t: [(1, GIB), (2, GIB)]
    g.util_samples = util_samples(1, 1_800_000_010, 1_800_000_040, 100)
    run(src, sampler, 20)
    sampler.tick(final=True)
    w = workloads(sampler)
    assert w[UNALLOCATED] == pytest.approx(80 * 10, rel=1e-6)  # the 10 s without a process
    # process 2 holds half the memory and never computes: half the 80 W idle, none of the 400 W above it
    assert w["pid:2"] == pytest.approx(20 * 40.0, rel=0.1)
    assert w["pid:1"] == pytest.approx(20 * (400 + 40.0), rel=0.1)
    assert math.fsum(w.values()) == pytest.approx(gpu_total(sampler), rel=1e-12)


def test_processes_the_agent_cannot_see_are_unknown_never_dropped(tmp_path):
    src, sampler = node(key_of=resolver_keys(IdentityResolver(tmp_path)), procs={0: lambda t: [(4242, GIB), (4343, None)]})
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert set(workloads(sampler)) == {"unknown"}
    assert workloads(sampler)["unknown"] == pytest.approx(gpu_total(sampler), rel=1e-12)
    assert sampler.snapshot.workloads[0].labels["kind"] == "unknown"


def test_identities_from_proc_become_workloads_with_their_labels():
    resolver = IdentityResolver(NODE, lookup_user=lambda uid: {1000: "alice", 1001: "bob"}.get(uid))
    src, sampler = node(key_of=resolver_keys(resolver))
    src.gpus[0].procs = lambda t: [(1100, GIB), (1300, GIB), (1700, GIB), (1200, GIB), (1601, GIB), (9999, GIB)]
    run(src, sampler, 5)
    sampler.tick(final=True)
    rows = {r.workload: r for r in sampler.snapshot.workloads}
    assert rows["user:1000"].labels["user"] == "alice"
    assert rows["slurm:4242"].labels["slurm_job"] == "4242" and rows["slurm:4242"].labels["user"] == "bob"
    pod = next(r for k, r in rows.items() if k.startswith("pod:"))
    assert pod.labels["kind"] == "kubernetes" and pod.labels["pod_uid"] == pod.workload[4:]
    assert any(k.startswith("unit:") for k in rows) and any(k.startswith("container:") for k in rows)
    assert "unknown" in rows
    assert math.fsum(r.energy_joules for r in rows.values()) == pytest.approx(gpu_total(sampler), rel=1e-12)
    text = metrics_text(sampler)
    series = [l for l in text.splitlines() if l.startswith("gpucost_workload_")]
    assert any('workload="slurm:4242"' in l for l in series)
    assert not any('workload="pid:' in l or "pid=" in l for l in series)  # PIDs are never labels


def metrics_text(sampler) -> str:
    from prometheus_client import generate_latest

    return generate_latest(make_registry(lambda: sampler.snapshot, process_metrics=False)).decode()


def test_beyond_max_workloads_the_smallest_merge_into_other_and_sums_hold():
    # no SM samples: by memory
    src, sampler = node(max_workloads=2, procs={0: lambda t: [(1, 8 * GIB), (2, 4 * GIB), (3, 2 * GIB), (4, 1 * GIB)]})
    run(src, sampler, 20)
    sampler.tick(final=True)
    w = workloads(sampler)
    assert set(w) == {"pid:1", "pid:2", OTHER}
    total = gpu_total(sampler)
    assert math.fsum(w.values()) == pytest.approx(total, rel=1e-12)
    assert w[OTHER] == pytest.approx(total * 3 / 15, rel=1e-9)
    cost = sampler.ledger.energy_cost[("gpu:GPU-fake-0", "EUR")]
    assert math.fsum(r.cost["EUR"] for r in sampler.snapshot.workloads) == pytest.approx(cost, rel=1e-12)
    other = next(r for r in sampler.snapshot.workloads if r.workload == OTHER)
    assert other.labels["kind"] == OTHER


def test_a_finished_workload_stays_for_the_retention_then_disappears():
    src, sampler = node(retention=30.0)
    g = src.gpus[0]
    g.procs = lambda t: [(7, GIB)] if t < src.t0 + 10 else []
    run(src, sampler, 20)
    energy_7 = workloads(sampler)["pid:7"]
    assert energy_7 == pytest.approx(300 * 9, rel=1e-6)  # listed on the ticks at 1 … 9 s
    run(src, sampler, 15)  # 25 s after it was last listed: still exported, unchanged
    assert workloads(sampler)["pid:7"] == energy_7
    run(src, sampler, 15)  # 40 s: gone; its joules stay inside the GPU's total
    w = workloads(sampler)
    assert "pid:7" not in w
    assert gpu_total(sampler) - math.fsum(w.values()) == pytest.approx(energy_7, rel=1e-9)


def test_gpus_are_split_separately():
    src, sampler = node(gpus=2, procs={1: lambda t: [(5, GIB)]})
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert set(workloads(sampler, "GPU-fake-0")) == {UNALLOCATED}
    assert workloads(sampler, "GPU-fake-1") == {"pid:5": pytest.approx(gpu_total(sampler, 1), rel=1e-12)}


def test_a_gpu_that_cannot_list_processes_is_not_attributed():
    src, sampler = node()
    src.gpus[0].procs = None
    run(src, sampler, 10)
    assert workloads(sampler) == {}


def test_failed_process_reads_are_counted_and_the_last_list_holds():
    from agent.sources.gpu import GpuError

    calls = {"n": 0}

    def flaky(t):
        calls["n"] += 1
        if calls["n"] > 3:
            raise GpuError("process list failed")
        return [(9, GIB)]

    src, sampler = node(procs={0: flaky})
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert sampler.errors["process_read"] >= 5
    assert set(workloads(sampler)) == {"pid:9"}


# -- persistence --------------------------------------------------------------------------


def test_workload_totals_persist_and_bad_ones_are_set_aside_not_the_nodes(caplog):
    src, sampler = node()
    src.gpus[0].procs = lambda t: [(3, GIB)]
    run(src, sampler, 10)
    sampler.tick(final=True)
    state = json.loads(json.dumps(sampler.ledger.state()))
    again = Ledger(cost=CostModel(TARIFF, PueConfig(value=1.5)))
    again.load_state(state)
    assert again.workloads.rows() == sampler.ledger.workloads.rows()
    older = {k: v for k, v in state.items() if k != "workloads"}  # saved before attribution
    Ledger().load_state(older)
    for path, bad, message in [
        (("rows", 0, 2), -1.0, "workloads.rows[0][2]: -1 is negative"),
        (("rows", 0, 4), "x", "workloads.rows[0][4]: expected an object of labels"),
        (("cost", 0, 4), float("nan"), "workloads.cost[0][4]: nan is not a finite number"),
        (("cost", 0, 2), "rent", "workloads.cost[0][2]: expected a cost kind"),
        (("seconds", 0, 2), -2.0, "workloads.seconds[0][2]: -2 is negative"),
        (("cost", 0, 1), "nobody", "which has no energy row"),
    ]:
        broken = json.loads(json.dumps(state))
        node_ = broken["workloads"]
        for p in path[:-1]:
            node_ = node_[p]
        node_[path[-1]] = bad
        fresh = Ledger()
        with caplog.at_level(logging.WARNING, logger="agent.accounting"):
            caplog.clear()
            fresh.load_state(broken)
        # The workloads' part is set aside, with one line naming the bad value; the node's totals load.
        assert message in caplog.text and "the node's totals are kept" in caplog.text
        assert len(fresh.workloads) == 0 and fresh.gpu_energy == sampler.ledger.gpu_energy


def test_workload_series_on_metrics_carry_every_label():
    src, sampler = node()
    src.gpus[0].procs = lambda t: [(3, GIB)]
    run(src, sampler, 6)
    text = metrics_text(sampler)
    line = next(l for l in text.splitlines() if l.startswith("gpucost_workload_gpu_energy_joules_total{"))
    for label in ("gpu", "uuid", "gpu_instance", "workload", "kind", "user", "slurm_job", "container", "pod_uid",
                  "namespace", "pod", "unit"):
        assert f'{label}="' in line
    assert any(l.startswith("gpucost_workload_cost_total{") and 'currency="EUR"' in l for l in text.splitlines())


def test_attribution_off_exports_no_workload_family():
    from agent.sampler import Sampler

    src = FakeSource([FakeGpu(lambda t: 100.0)])
    sampler = Sampler(src, clock=src.clock)
    sampler.tick()
    run(src, sampler, 6)
    assert sampler.snapshot.workloads is None
    assert "gpucost_workload" not in metrics_text(sampler)
    assert "processes" not in src.calls


def test_totals_class_merges_and_expires_directly():
    t = WorkloadTotals(max_workloads=1, retention_seconds=10)
    labels = {"kind": "user"}
    t.charge("G", "user:1", labels, 5.0, 1.0, "EUR", 100.0)
    t.charge("G", "user:2", labels, 3.0, 0.5, "EUR", 100.0)
    assert t.enforce_max() == 1
    assert {r.workload: (r.energy_joules, r.cost["EUR"]) for r in t.rows()} == {"user:1": (5.0, 1.0), OTHER: (3.0, 0.5)}
    t.charge("G", "user:2", labels, 1.0, 0.25, "EUR", 105.0)  # merged: goes straight to other
    assert {r.workload: r.energy_joules for r in t.rows()} == {"user:1": 5.0, OTHER: 4.0}
    assert t.expire(112.0) == 1  # user:1 last seen at 100
    assert [r.workload for r in t.rows()] == [OTHER]


def test_a_shown_workload_folded_into_other_keeps_its_series_and_is_counted_once():
    """A workload a snapshot has shown (a scrape may have read it) keeps its totals and its
    series when it is folded into ``other``; only its later use goes to ``other``. A scraper
    that keeps each series' last value then counts every joule once: were its totals moved,
    ``other`` would jump by them and they would be counted twice."""
    t = WorkloadTotals(max_workloads=2, retention_seconds=10)
    labels = {"kind": "user"}
    scraped: dict[str, float] = {}

    def scrape() -> None:
        scraped.update({r.workload: r.energy_joules for r in t.frozen_rows()})

    t.charge("G", "user:1", labels, 5.0, 1.0, "EUR", 100.0)
    t.charge("G", "user:2", labels, 3.0, 0.5, "EUR", 100.0)
    assert t.enforce_max() == 0
    scrape()  # user:1 and user:2 shown
    t.charge("G", "user:3", labels, 9.0, 2.0, "EUR", 101.0)
    assert t.enforce_max() == 1  # user:2, the smallest, folded
    t.charge("G", "user:2", labels, 1.0, 0.25, "EUR", 102.0)  # folded: its later use goes to other
    rows = {r.workload: (r.energy_joules, r.cost["EUR"]) for r in t.rows()}
    assert rows == {"user:1": (5.0, 1.0), "user:2": (3.0, 0.5), "user:3": (9.0, 2.0), OTHER: (1.0, 0.25)}
    scrape()
    assert math.fsum(scraped.values()) == 5.0 + 3.0 + 9.0 + 1.0  # every joule once
    t.charge("G", "user:4", labels, 0.5, 0.1, "EUR", 103.0)  # never shown, beyond the bound: moved
    assert t.enforce_max() == 1
    assert {r.workload: r.energy_joules for r in t.rows()}[OTHER] == 1.5
    assert "user:4" not in {r.workload for r in t.rows()}
    t.charge("G", "user:1", labels, 1.0, 0.2, "EUR", 101.0)
    assert t.expire(110.5) == 1  # user:2, 10 s after its own last charge (at 100), like a finished workload
    assert {r.workload for r in t.rows()} == {"user:1", "user:3", OTHER}
    scrape()
    assert math.fsum(scraped.values()) == 6.0 + 3.0 + 9.0 + 1.5


def test_pod_names_from_the_kubelet_label_the_pod_that_holds_the_gpu():
    """[attribution] pod_resources: the kubelet's answer (GPU UUID -> pod containers) names the pod
    of a /proc pod process on that GPU; a GPU shared by two pods keeps the names empty (the kubelet
    does not say which PID is whose), a failed ask keeps the previous answer and is counted."""
    from agent.attribution.podresources import PodContainer

    resolver = IdentityResolver(NODE, lookup_user=lambda uid: None)
    src, sampler = node(key_of=resolver_keys(resolver), gpus=2)
    stage = sampler.attribution
    answers = [
        {"GPU-fake-0": (PodContainer("ml", "train-7f9c", "trainer", "nvidia.com/gpu"),),
         "GPU-fake-1": (PodContainer("ml", "a", "c", "nvidia.com/gpu"), PodContainer("web", "b", "c", "nvidia.com/gpu"))},
    ]

    def ask():
        if not answers:
            raise RuntimeError("kubelet pod-resources List failed: UNAVAILABLE: connection refused")
        return answers.pop()

    stage.pods = ask
    for g in src.gpus:
        g.procs = lambda t: [(1701, GIB)]  # a BestEffort pod on cgroup v2
    run(src, sampler, 6)  # charged before the kubelet's first answer: names learnt later fill in
    assert {r.labels["pod"] for r in sampler.snapshot.workloads} == {""}
    stage.refresh_pods()
    run(src, sampler, 5)
    stage.refresh_pods()  # fails: the previous answer stays
    assert sampler.errors["process_read"] == 1
    run(src, sampler, 5)
    sampler.tick(final=True)
    by_gpu = {r.uuid: r for r in sampler.snapshot.workloads if r.workload.startswith("pod:")}
    named, shared = by_gpu["GPU-fake-0"], by_gpu["GPU-fake-1"]
    assert (named.labels["namespace"], named.labels["pod"]) == ("ml", "train-7f9c")
    assert named.labels["pod_uid"] == named.workload[4:]
    assert (shared.labels["namespace"], shared.labels["pod"]) == ("", "")
    for i, uuid in enumerate(("GPU-fake-0", "GPU-fake-1")):
        parts = [r.energy_joules for r in sampler.snapshot.workloads if r.uuid == uuid]
        assert math.fsum(parts) == pytest.approx(gpu_total(sampler, i), rel=1e-12)
    text = metrics_text(sampler)
    assert any('namespace="ml"' in l and 'pod="train-7f9c"' in l for l in text.splitlines()
               if l.startswith("gpucost_workload_gpu_energy_joules_total"))


def test_command_lines_only_when_switched_on_and_on_their_own_info_family():
    """[attribution] cmdline = true: gpucost_workload_command_info{workload, command} 1; off (the
    default): no command anywhere on /metrics. Never a label of the energy or cost families."""
    texts = {}
    for on in (False, True):
        resolver = IdentityResolver(NODE, cmdline=on, lookup_user=lambda uid: None)
        src, sampler = node(key_of=resolver_keys(resolver))
        src.gpus[0].procs = lambda t: [(1300, GIB), (1200, GIB)]
        run(src, sampler, 6)
        texts[on] = metrics_text(sampler)
    assert "command" not in texts[False]
    info = [l for l in texts[True].splitlines() if l.startswith("gpucost_workload_command_info{")]
    assert len(info) == 2 and all(l.endswith(" 1.0") for l in info)
    slurm = next(l for l in info if 'workload="slurm:4242"' in l)
    cmdline = (NODE / "1300" / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()
    assert f'command="{cmdline}"' in slurm
    assert not any("command=" in l for l in texts[True].splitlines() if l.startswith("gpucost_workload_gpu_energy"))


def test_labels_of_thousands_of_short_lived_workloads_stay_bounded_and_totals_unchanged(monkeypatch):
    """A node running many short jobs: 3,000 processes, each its own workload, each listed on one
    tick. The attributor's labels of workloads stay bounded by what its held process lists name
    (not one entry per workload ever seen), and every total is what it is without the pruning."""

    def drive(prune: bool):
        if not prune:
            monkeypatch.setattr(Attributor, "_prune_labels", lambda self: None, raising=False)
        first = 1_800_000_000  # FakeSource's t0
        # one new job a second, one daemon
        src, sampler = node(retention=30.0, procs={0: lambda t: [(10_000 + int(t) - first, GIB), (7, GIB)]})
        src.energy_between = lambda i, a, b: 300.0 * (b - a)  # the fake's counter in closed form: O(1) a read
        seen = set()
        for _ in range(3000):
            src.t += 1.0
            sampler.tick()
            seen.update(sampler.ledger.workloads.energy)
        sampler.tick(final=True)
        monkeypatch.undo()
        return sampler, seen

    (pruned, seen), (reference, _) = drive(True), drive(False)
    assert len(seen) >= 3000  # every job was a workload of its own, exported for the retention
    assert len(reference.attribution._labels) >= 3000  # without pruning: one entry per workload ever seen
    assert len(pruned.attribution._labels) <= 100, len(pruned.attribution._labels)
    ledger, ref = pruned.ledger.workloads, reference.ledger.workloads
    assert dict(ledger.energy) == dict(ref.energy) and dict(ledger.cost) == dict(ref.cost)
    assert ledger.labels == ref.labels and ledger.last_seen == ref.last_seen
    assert ledger.energy[("GPU-fake-0", "pid:7")] == pytest.approx(150.0 * 3000, rel=1e-6)  # half: by memory
    assert ledger.labels[("GPU-fake-0", "pid:7")]["kind"] == "unknown"  # replay keys: pid workloads


@pytest.mark.parametrize("window", [1.0, 5.0])
def test_the_sm_window_reaches_back_before_a_short_slice(window):
    """Issue 16 item 4: ``[attribution] window_seconds`` widens a short slice's SM window. A works
    alone for 20 s, then B alone; both hold the GPU throughout. With the window at the slice (1 s)
    A gets no active share after 20 s; with 5 s the four slices after the switch still see A's
    last samples: 80, 60, 40, 20 % of their 400 W active part, 800 J more."""
    from agent.sampler import Sampler

    t0 = 1_800_000_000.0
    src = FakeSource([FakeGpu(lambda t: 500.0)])
    g = src.gpus[0]
    g.procs = lambda t: [(402, GIB), (428, GIB)]
    g.util_samples = sorted(util_samples(402, t0 + 0.1, t0 + 20, 90, 0.2) + util_samples(428, t0 + 20.1, t0 + 40, 90, 0.2),
                            key=lambda s: s[1])
    led = Ledger(cost=CostModel(TARIFF, PueConfig(value=1.5)))
    stage = Attributor(led.workloads, replay_keys, window_seconds=window, idle_watts=100.0)
    sampler = Sampler(src, clock=src.clock, ledger=led, attribution=stage, counter_interval=5.0)
    sampler.tick()
    run(src, sampler, 40)
    sampler.tick(final=True)
    w = workloads(sampler)
    assert math.fsum(w.values()) == pytest.approx(gpu_total(sampler), rel=1e-12)
    # 20 s of A's work: 400 W active + half of 100 W idle; the window adds A's tail after the switch.
    expected = 20 * 400 + 40 * 50 + (800 if window == 5.0 else 0)
    assert w["pid:402"] == pytest.approx(expected, rel=0.03), w
