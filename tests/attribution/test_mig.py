"""MIG: a GPU's measured energy split among its GPU instances, then among each instance's
workloads, through the real sampler, ledger and exporter (scripted MIG readings: no MIG
GPU is needed, and the GPU's MIG mode is never changed)."""

from __future__ import annotations

import math
import random

import pytest

from agent.accounting import Ledger
from agent.attribution.split import Attributor, split_instances
from agent.attribution.workloads import UNALLOCATED
from agent.cost import CostModel, PueConfig, TariffConfig
from agent.energy import EnergySlice
from agent.exporter import make_registry
from agent.sources.gpu import GpuError, MigComputeInstance, MigInstance
from fakes import FakeGpu, FakeSource

TARIFF = TariffConfig(currency="EUR", flat_price_per_kwh=0.30)
GIB = 1 << 30
UUID = "GPU-fake-0"

# Who each PID is: alice runs on GPU instances 1 and 5, bob on 1.
IDENTITIES = {501: ("user:1000", "alice"), 502: ("user:1001", "bob"), 601: ("user:1000", "alice")}


def key_of(pid: int):
    key, user = IDENTITIES[pid]
    labels = dict.fromkeys(("kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit"), "")
    labels.update(kind="user", user=user)
    return key, labels


def instance(gi: int, profile: str, slices: int | None, procs, activity: float | None) -> MigInstance:
    return MigInstance(gpu_instance=gi, profile=profile, slices=slices,
                       compute_instances=(MigComputeInstance(0, f"MIG-{gi}", slices, None),),
                       processes=tuple(procs), sm_activity=activity)


def h100_3g_2g_2g(act1: float | None = 0.8, act5: float | None = 0.4, act6: float | None = 0.0):
    """An H100 split 3g.40gb (GI 1: bob and alice) + 2g.20gb (GI 5: alice) + 2g.20gb (GI 6: idle)."""
    return [
        instance(1, "3g.40gb", 3, [(501, 8 * GIB), (502, 24 * GIB)], act1),
        instance(5, "2g.20gb", 2, [(601, 4 * GIB)], act5),
        instance(6, "2g.20gb", 2, [], act6),
    ]


def node(watts=lambda t: 500.0, *, mig=lambda t: h100_3g_2g_2g(), idle_watts=100.0,
         procs=lambda t: [(501, 8 * GIB), (502, 24 * GIB), (601, 4 * GIB)]):
    from agent.sampler import Sampler

    gpu = FakeGpu(watts)
    gpu.utilization = None  # NVML gives no whole-GPU utilisation in MIG mode
    gpu.procs = procs  # the parent's list: not used in MIG mode
    gpu.mig = mig
    src = FakeSource([gpu])
    led = Ledger(cost=CostModel(TARIFF, PueConfig(value=1.5)))
    stage = Attributor(led.workloads, key_of, idle_watts=idle_watts)
    sampler = Sampler(src, clock=src.clock, ledger=led, attribution=stage)
    sampler.tick()
    return src, sampler


def run(src, sampler, seconds: int) -> None:
    for _ in range(seconds):
        src.t += 1.0
        sampler.tick()


def gpu_total(sampler) -> float:
    return sum(sampler.snapshot.gpus[0].energy_joules.values())


def rows(sampler) -> dict[tuple[str, str], float]:
    """(workload, gpu_instance) → J."""
    return {(r.workload, r.gpu_instance): r.energy_joules for r in sampler.snapshot.workloads}


def metrics_text(sampler) -> str:
    from prometheus_client import generate_latest

    return generate_latest(make_registry(lambda: sampler.snapshot, process_metrics=False)).decode()


# -- the arithmetic ---------------------------------------------------------------------


def test_instances_split_idle_by_slices_and_the_rest_by_slices_times_activity():
    parts = split_instances(700.0, 140.0, {1: (3, 0.9), 5: (2, 0.3), 6: (2, 0.0)})
    active = 560.0 / (3 * 0.9 + 2 * 0.3)
    assert parts == pytest.approx({1: 60.0 + 3 * 0.9 * active, 5: 40.0 + 2 * 0.3 * active, 6: 40.0}, rel=1e-12)


def test_without_activity_for_every_instance_or_any_activity_the_split_is_by_slices():
    by_slices = {1: 300.0, 5: 200.0, 6: 200.0}
    assert split_instances(700.0, 0.0, {1: (3, 0.9), 5: (2, None), 6: (2, 0.1)}) == pytest.approx(by_slices)
    assert split_instances(700.0, 100.0, {1: (3, 0.0), 5: (2, 0.0), 6: (2, 0.0)}) == pytest.approx(by_slices)
    # a slice count not known: evenly
    assert split_instances(600.0, 0.0, {1: (3, None), 5: (None, None), 6: (2, None)}) == pytest.approx(
        {1: 200.0, 5: 200.0, 6: 200.0})
    # no idle estimate: everything by slices × activity
    assert split_instances(100.0, 0.0, {1: (3, 0.5), 5: (2, 0.25)}) == pytest.approx({1: 75.0, 5: 25.0})


def test_instance_split_conserves_energy_exactly_over_random_inputs():
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 7)
        insts = {gi: (rng.choice([1, 2, 3, 4, 7, None]), rng.choice([None, 0.0, rng.random()])) for gi in range(n)}
        joules = rng.uniform(0, 5000) * rng.choice([1e-6, 1.0, 1e3])
        parts = split_instances(joules, rng.uniform(-10, 2 * joules), insts)
        assert set(parts) == set(insts)
        assert all(v >= -1e-9 * joules for v in parts.values())
        assert math.fsum(parts.values()) == joules  # to the last bit


# -- through the real sampler and ledger ------------------------------------------------


def test_3g_2g_2g_with_uneven_load_adds_up_to_the_gpu_per_instance():
    src, sampler = node()
    run(src, sampler, 30)
    sampler.tick(final=True)
    total = gpu_total(sampler)
    w = rows(sampler)
    assert total == pytest.approx(500.0 * 30, rel=1e-6)
    # Per second: idle 100 W by slices 3:2:2, active 400 W by 3×0.8 : 2×0.4 : 2×0 = 300 : 100 : 0.
    gi1, gi5, gi6 = 300.0 / 7 + 300.0, 200.0 / 7 + 100.0, 200.0 / 7
    expected = {
        ("user:1000", "1"): gi1 * 8 / 32 / 500.0,  # within GI 1 by GPU memory, 8 : 24 GiB
        ("user:1001", "1"): gi1 * 24 / 32 / 500.0,
        ("user:1000", "5"): gi5 / 500.0,
        (UNALLOCATED, "6"): gi6 / 500.0,            # a GPU instance with no process: idle waste
    }
    assert set(w) == set(expected)
    for k, share in expected.items():
        assert w[k] == pytest.approx(share * total, rel=1e-9), k
    # every joule counted once: the instances' parts (and unallocated) add up to the GPU
    assert math.fsum(w.values()) == pytest.approx(total, rel=1e-9)
    per_gi = {gi: math.fsum(v for (_, g), v in w.items() if g == gi) for gi in ("1", "5", "6")}
    assert per_gi == pytest.approx({"1": gi1 / 500 * total, "5": gi5 / 500 * total, "6": gi6 / 500 * total},
                                   rel=1e-9)
    # cost follows the same split
    cost = sampler.ledger.energy_cost[("gpu:" + UUID, "EUR")]
    costs = {(r.workload, r.gpu_instance): r.cost["EUR"] for r in sampler.snapshot.workloads}
    assert math.fsum(costs.values()) == pytest.approx(cost, rel=1e-9)
    assert costs[("user:1000", "5")] / cost == pytest.approx(w[("user:1000", "5")] / total, rel=1e-9)
    labels = {(r.workload, r.gpu_instance): r.labels for r in sampler.snapshot.workloads}
    assert labels[("user:1000", "5")]["user"] == "alice" and labels[(UNALLOCATED, "6")]["kind"] == "unallocated"


def test_every_slice_adds_up_to_the_joule_while_the_load_moves():
    rng = random.Random(3)
    state = {"acts": (0.8, 0.4, 0.0)}

    def mig(t):
        return h100_3g_2g_2g(*state["acts"])

    src, sampler = node(lambda t: 300.0 + 200.0 * math.sin(t / 7.0), mig=mig)
    stage = sampler.attribution
    for _ in range(60):
        state["acts"] = tuple(rng.choice([None, 0.0, rng.random()]) for _ in range(3))
        src.t += 1.0
        sampler.tick()
        s = EnergySlice(0, src.t - rng.uniform(0.1, 3.0), src.t, rng.uniform(0.0, 2000.0), "counter")
        parts = stage.split(0, s)
        assert math.fsum(parts.values()) == pytest.approx(s.joules, rel=1e-9, abs=1e-12)
    sampler.tick(final=True)
    assert math.fsum(rows(sampler).values()) == pytest.approx(gpu_total(sampler), rel=1e-9)


def test_without_gpm_activity_instances_are_charged_by_slices():
    src, sampler = node(mig=lambda t: h100_3g_2g_2g(None, None, None))
    run(src, sampler, 20)
    sampler.tick(final=True)
    total = gpu_total(sampler)
    per_gi = {}
    for (_, gi), v in rows(sampler).items():
        per_gi[gi] = per_gi.get(gi, 0.0) + v
    assert per_gi == pytest.approx({"1": total * 3 / 7, "5": total * 2 / 7, "6": total * 2 / 7}, rel=1e-9)


def test_mig_mode_without_instances_charges_the_gpu_to_unallocated():
    src, sampler = node(mig=lambda t: [])
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert rows(sampler) == {(UNALLOCATED, ""): pytest.approx(gpu_total(sampler), rel=1e-12)}


def test_a_failed_mig_read_is_counted_and_the_last_instances_hold():
    calls = {"n": 0}

    def flaky(t):
        calls["n"] += 1
        if calls["n"] > 3:
            raise GpuError("MIG read failed")
        return h100_3g_2g_2g()

    src, sampler = node(mig=flaky)
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert sampler.errors["process_read"] >= 5
    assert {gi for _, gi in rows(sampler)} == {"1", "5", "6"}
    assert "processes" not in src.calls  # in MIG mode the instances carry the processes
    assert math.fsum(rows(sampler).values()) == pytest.approx(gpu_total(sampler), rel=1e-9)


def test_a_gpu_not_in_mig_mode_is_split_as_before_with_an_empty_gpu_instance():
    src, sampler = node(mig=None, procs=lambda t: [(502, GIB)])
    run(src, sampler, 10)
    sampler.tick(final=True)
    assert set(rows(sampler)) == {("user:1001", "")}
    assert src.calls["mig_instances"] >= 10  # asked every tick (the NVML source asks the driver every 30 s while off)


def test_mig_series_on_metrics_carry_the_gpu_instance():
    src, sampler = node()
    run(src, sampler, 10)
    sampler.tick(final=True)
    text = metrics_text(sampler)
    energy = [l for l in text.splitlines() if l.startswith("gpucost_workload_gpu_energy_joules_total{")]
    cost = [l for l in text.splitlines() if l.startswith("gpucost_workload_cost_total{")]
    assert len(energy) == len(cost) == 4
    got = {(l.split('workload="')[1].split('"')[0], l.split('gpu_instance="')[1].split('"')[0]) for l in energy}
    assert got == {("user:1000", "1"), ("user:1001", "1"), ("user:1000", "5"), (UNALLOCATED, "6")}
    exported = math.fsum(float(l.rsplit(" ", 1)[1]) for l in energy)
    assert exported == pytest.approx(gpu_total(sampler), rel=1e-9)
    assert "#gi" not in text  # the totals key never leaks into a label


# -- a trace with the 'mig' key, replayed by the real agent process, scraped over HTTP ----------


def mig_trace(path, seconds: float = 20.0, every: float = 0.5, watts: float = 400.0) -> None:
    """A GPU in MIG mode (3g + 2g + 2g) at a constant ``watts``, as `record` writes it."""
    from agent.trace import TraceWriter, mig_to_json

    t0 = 1_800_000_000.0
    w = TraceWriter(path, {"gpus": [{"index": 0, "uuid": "GPU-mig-0", "name": "NVIDIA H100 80GB HBM3"}]})
    labels = {"kind": "user", "user": "", "slurm_job": "", "container": "", "pod_uid": "", "namespace": "",
              "pod": "", "unit": ""}
    ident = {str(pid): {"workload": key, "labels": {**labels, "user": user}}
             for pid, (key, user) in IDENTITIES.items()}
    for k in range(int(seconds / every) + 1):
        t = t0 + k * every
        g = {"power_mw": int(watts * 1000), "energy_mj": int(round(watts * k * every * 1000)),
             "processes": [[501, 8 * GIB], [502, 24 * GIB], [601, 4 * GIB]],
             "mig": mig_to_json(h100_3g_2g_2g())}
        if k == 0:
            g["identities"] = ident
        w.row({"t": t, "gpus": {"0": g}})
    w.close()


def test_a_mig_trace_on_metrics_of_the_real_process(tmp_path):
    from agentproc import AgentProcess

    trace = tmp_path / "mig.jsonl"
    mig_trace(trace)
    config = tmp_path / "config.toml"
    config.write_text('[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n\n[attribution]\nidle_watts = 100\n')
    agent = AgentProcess("replay", str(trace), "--speed", "10", "--config", str(config))
    try:
        agent.wait_ready()
        agent.wait_finished()
        fam = agent.metrics()
    finally:
        agent.stop()
    gpu = sum(s.value for s in fam["gpucost_gpu_energy_joules"] if s.name.endswith("_total"))
    gpu_cost = next(s.value for s in fam["gpucost_energy_cost"]
                    if s.name.endswith("_total") and s.labels["component"] == "gpu")
    key = lambda s: (s.labels["workload"], s.labels["gpu_instance"])  # noqa: E731
    energy = {key(s): s for s in fam["gpucost_workload_gpu_energy_joules"] if s.name.endswith("_total")}
    cost = {key(s): s for s in fam["gpucost_workload_cost"] if s.name.endswith("_total")}
    print("\nMIG trace on /metrics: GPU %.3f J, %.6f EUR; " % (gpu, gpu_cost) + ", ".join(
        f"{k[0]}@gi{k[1]} {energy[k].value:.3f} J" for k in sorted(energy)))
    assert gpu == pytest.approx(400.0 * 20, rel=1e-3)
    assert set(energy) == set(cost) == {("user:1000", "1"), ("user:1001", "1"), ("user:1000", "5"),
                                        (UNALLOCATED, "6")}
    assert math.fsum(s.value for s in energy.values()) == pytest.approx(gpu, rel=1e-6)
    assert math.fsum(s.value for s in cost.values()) == pytest.approx(gpu_cost, rel=1e-6)
    # 400 W: idle 100 W by slices 3:2:2, active 300 W by 2.4 : 0.8 : 0
    gi1, gi5, gi6 = 300 / 7 + 225.0, 200 / 7 + 75.0, 200 / 7
    assert energy[("user:1001", "1")].value == pytest.approx(gpu * gi1 * 0.75 / 400, rel=1e-3)
    assert energy[("user:1000", "5")].value == pytest.approx(gpu * gi5 / 400, rel=1e-3)
    assert energy[(UNALLOCATED, "6")].value == pytest.approx(gpu * gi6 / 400, rel=1e-3)
    assert energy[("user:1000", "5")].labels["user"] == "alice"
    assert energy[(UNALLOCATED, "6")].labels["kind"] == "unallocated"


# -- record and replay -----------------------------------------------------------------


def test_record_writes_mig_and_the_identities_of_mig_processes_and_replay_splits_it(tmp_path):
    import os

    from agent.record import record
    from agent.trace import load
    from fakes import real_time_source
    from helpers import replay_through_sampler

    me = os.getpid()  # a real process of this machine, listed only inside GPU instance 5
    live = real_time_source([FakeGpu(lambda t: 400.0)])
    live.gpus[0].procs = lambda t: []
    live.gpus[0].mig = lambda t: [instance(1, "3g.40gb", 3, [], 0.5), instance(5, "2g.20gb", 2, [(me, GIB)], 0.5)]
    path = tmp_path / "rec.jsonl.gz"
    record(live, str(path), duration=1.0, interval=0.05, energy_interval=0.05, samples_interval=0.5)
    trace = load(path)
    rows_ = [r["gpus"]["0"] for r in trace.rows]
    assert all(g["mig"][1]["processes"] == [[me, GIB]] and g["mig"][0]["sm_active_pct"] == 50.0 for g in rows_)
    facts = [g["identities"] for g in rows_ if "identities" in g]
    assert len(facts) == 1 and list(facts[0]) == [str(me)]
    key = facts[0][str(me)]["workload"]

    sampler = replay_through_sampler(trace, tick=0.25, attribution=True)
    w = rows(sampler)
    assert set(w) == {(key, "5"), (UNALLOCATED, "1")}
    gpu = gpu_total(sampler)
    # no idle estimate (none configured, no utilisation in MIG mode): by slices × activity, 3 : 2
    assert w[(key, "5")] == pytest.approx(gpu * 2 / 5, rel=1e-9)
    assert math.fsum(w.values()) == pytest.approx(gpu, rel=1e-9)


def test_bad_mig_values_in_a_trace_are_refused_with_where():
    from agent.trace import mig_from_json, mig_to_json

    good = mig_to_json(h100_3g_2g_2g())
    assert mig_from_json(good) == h100_3g_2g_2g()
    with pytest.raises(ValueError, match=r"\[1\]\.sm_active_pct: expected a number from 0 to 100"):
        mig_from_json([good[0], {**good[1], "sm_active_pct": 140}])
    with pytest.raises(ValueError, match=r"\[2\]: GPU instance 1 appears twice"):
        mig_from_json([good[0], good[1], {**good[2], "gpu_instance": 1}])


def test_a_pod_holding_a_mig_device_gets_its_names_on_that_instance():
    from types import SimpleNamespace

    src, sampler = node()
    stage = sampler.attribution

    def pod_keys(pid):
        key, labels = key_of(pid)
        if pid == 601:  # alice's process in GI 5 runs in a pod
            labels = {**labels, "kind": "kubernetes", "user": "", "pod_uid": "uid-601"}
            return "pod:uid-601", labels
        return key, labels

    stage.key_of = pod_keys
    stage.pods = lambda: {"MIG-5": (SimpleNamespace(namespace="ml", pod="trainer-0"),),
                          "MIG-1": (SimpleNamespace(namespace="ml", pod="other"),)}
    stage.refresh_pods()
    run(src, sampler, 5)
    labels = {(r.workload, r.gpu_instance): r.labels for r in sampler.snapshot.workloads}
    assert (labels[("pod:uid-601", "5")]["namespace"], labels[("pod:uid-601", "5")]["pod"]) == ("ml", "trainer-0")
    assert labels[("user:1001", "1")]["pod"] == ""  # not a pod's process: no name


def test_pruning_the_labels_keeps_those_the_mig_instances_name():
    """The labels the attributor prunes (agent.attribution.split.Attributor._prune_labels) are
    those no held process list names; on a MIG GPU the names are in the instances' lists."""
    src, sampler = node()
    stage = sampler.attribution
    stage._labels["user:9999"] = {"kind": "user", "user": "gone"}  # a workload no list names any more
    for _ in range(5):
        src.t += 1.0
        sampler.tick()
        stage._prune_labels()
        assert set(stage._labels) == {"user:1000", "user:1001"}
    sampler.tick(final=True)
    labels = {(r.workload, r.gpu_instance): r.labels for r in sampler.snapshot.workloads}
    assert labels[("user:1000", "5")]["user"] == "alice" and labels[("user:1001", "1")]["user"] == "bob"
