"""Issue 14: every cost charged to whoever held the GPU, conserved.

Through the real sampler, ledger, attribution stage and exporter, on a fake node of three
GPUs — one shared by three processes (so that, with a low ``max_workloads``, workloads merge
into ``other``), one in MIG mode (three GPU instances, one of them empty) and one that nobody
uses — with host energy, amortisation (a per-GPU override), and node, per-GPU and overridden
running costs: per cost kind, the workloads (``unallocated`` and ``other`` included) add up to
the node's total on ``/metrics`` and in the saved state.
"""

from __future__ import annotations

import http.client
import json
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.accounting import Ledger
from agent.attribution.split import Attributor
from agent.attribution.workloads import OTHER, UNALLOCATED
from agent.config import Settings
from agent.exporter import make_registry
from agent.http import Listener, MetricsServer, bind
from agent.sources.gpu import MigComputeInstance, MigInstance
from fakes import FakeGpu, FakeSource

GIB = 1 << 30
LABELS = ("kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit")
#: pid → (workload, user)
WHO = {11: ("user:1", "ann"), 12: ("user:2", "ben"), 13: ("user:3", "cat"),
       21: ("user:4", "dan"), 22: ("user:5", "eve"), 23: ("user:4", "dan")}

SETTINGS = Settings(
    tariff={"currency": "EUR", "flat_price_per_kwh": 0.25},
    pue={"value": 1.3},
    hardware={"gpu_price": 25000, "node_price": 80000, "gpus": [{"index": 1, "price": 30000}]},
    running_costs=[
        {"name": "colocation", "amount": 2000, "period": "month"},
        {"name": "staff", "amount": 12000, "period": "year"},
        {"name": "support", "amount": 1500, "period": "year", "scope": "gpu", "gpus": [{"index": 2, "amount": 900}]},
    ],
)


def key_of(pid: int):
    key, user = WHO[pid]
    labels = dict.fromkeys(LABELS, "")
    labels.update(kind="user", user=user)
    return key, labels


def mig(t: float) -> list[MigInstance]:
    def gi(n, slices, procs, act):
        return MigInstance(gpu_instance=n, profile=f"{slices}g", slices=slices,
                           compute_instances=(MigComputeInstance(0, f"MIG-{n}", slices, None),),
                           processes=tuple(procs), sm_activity=act)
    return [gi(1, 3, [(21, 8 * GIB), (22, 24 * GIB)], 0.8), gi(5, 2, [(23, 4 * GIB)], 0.4), gi(6, 2, [], 0.0)]


def node(max_workloads: int = 4):
    from agent.sampler import Sampler

    shared = FakeGpu(lambda t: 450.0)
    # ann holds the GPU throughout; ben comes at 10 s; cat, a sliver of memory, from 5 to 20 s.
    shared.procs = lambda t: ([(11, 30 * GIB)] + ([(12, 10 * GIB)] if t >= shared_t0 + 10 else [])
                              + ([(13, GIB // 4)] if shared_t0 + 5 <= t < shared_t0 + 20 else []))
    migged = FakeGpu(lambda t: 500.0)
    migged.utilization = None
    migged.mig = mig
    unused = FakeGpu(lambda t: 70.0)
    src = FakeSource([shared, migged, unused])
    shared_t0 = src.t0
    led = Ledger.from_settings(SETTINGS)
    led.workloads.configure(max_workloads, 300.0)
    stage = Attributor(led.workloads, key_of)
    sampler = Sampler(src, clock=src.clock, ledger=led, attribution=stage)
    sampler.tick()
    return src, sampler


def run(src, sampler, seconds: int, host_watts: float = 600.0) -> None:
    for _ in range(seconds):
        src.t += 1.0
        sampler.ledger.add_host("platform", "model", src.t - 1.0, src.t, host_watts)  # 1 s at 600 W
        sampler.tick()


class Served:
    """The sampler's snapshots served by the agent's own HTTP server on a loopback port."""

    def __init__(self, sampler) -> None:
        registry = make_registry(lambda: sampler.snapshot, process_metrics=False)
        listener = Listener(bind("127.0.0.1:0"), "127.0.0.1:0", None)
        self.server = MetricsServer("", 0, registry, lambda: (True, {"status": "ok"}),
                                    snapshot=lambda: sampler.snapshot, listener=listener)
        self.server.start()

    def scrape(self) -> dict[str, list]:
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            assert r.status == 200
            text = r.read().decode()
        finally:
            conn.close()
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def close(self) -> None:
        self.server.stop()


NODE_FAMILY = {"energy": "gpucost_energy_cost", "hardware": "gpucost_hardware_cost", "running": "gpucost_running_cost"}


def check_scrape(m: dict[str, list]) -> tuple[dict[str, float], set]:
    """Per cost kind, Σ workloads == the node's total (1e-9 relative) in one scrape."""
    charged: dict[str, float] = {}
    workloads = set()
    for s in m["gpucost_workload_cost"]:
        if s.name.endswith("_total"):
            charged[s.labels["cost_kind"]] = charged.get(s.labels["cost_kind"], 0.0) + s.value
            workloads.add((s.labels["gpu"], s.labels["workload"], s.labels["gpu_instance"]))
    node_total = {kind: math.fsum(s.value for s in m[fam] if s.name.endswith("_total")) for kind, fam in NODE_FAMILY.items()}
    for kind, total in node_total.items():
        assert math.isclose(charged.get(kind, 0.0), total, rel_tol=1e-9, abs_tol=0), (kind, charged.get(kind), total)
    return node_total, workloads


def test_per_kind_the_workloads_add_up_to_the_node_on_metrics_mig_and_other_included():
    """Scraped over HTTP from the agent's server after every tick, and once more after the last."""
    src, sampler = node()
    served = Served(sampler)
    # What a scraper keeps of each workload series: its last value (a series that is no longer
    # exported keeps the value it was last scraped with), as the report and increase() read them.
    kept: dict[tuple, float] = {}

    def scrape() -> dict[str, list]:
        m = served.scrape()
        for s in m["gpucost_workload_cost"]:
            if s.name.endswith("_total"):
                kept[tuple(sorted(s.labels.items()))] = s.value
        return m

    try:
        for _ in range(40):
            run(src, sampler, 1)
            check_scrape(scrape())
        sampler.tick(final=True)
        m = scrape()
    finally:
        served.close()
    node_total, workloads = check_scrape(m)
    # The shared GPU: ann, ben and `other` (cat, the smallest, folded in on the tick she came,
    # before any scrape showed her); the MIG GPU: dan on two instances, eve, and the empty
    # instance's unallocated; the unused GPU: unallocated.
    assert ("0", OTHER, "") in workloads and ("0", "user:1", "") in workloads
    assert not any(dict(k)["workload"] == "user:3" for k in kept)  # never shown: no series
    # Every cost counted once by a scraper: the series' last values add up to the node's totals
    # (moving cat's total into `other` would count it twice: in her series and in other's jump).
    for kind, total in node_total.items():
        seen = math.fsum(v for k, v in kept.items() if dict(k)["cost_kind"] == kind)
        assert seen == pytest.approx(total, rel=1e-9), (kind, seen, total)
    assert {("1", "user:4", "1"), ("1", "user:5", "1"), ("1", "user:4", "5"), ("1", UNALLOCATED, "6")} <= workloads
    assert ("2", UNALLOCATED, "") in workloads
    print("\nnode " + ", ".join(f"{k} {v:.9f} EUR" for k, v in node_total.items()))
    assert all(v > 0 for v in node_total.values())
    # Seconds held: per GPU, the 41 s the agent counted (the baseline tick holds none).
    held: dict[str, float] = {}
    for s in m["gpucost_workload_gpu_seconds"]:
        if s.name.endswith("_total"):
            held[s.labels["gpu"]] = held.get(s.labels["gpu"], 0.0) + s.value
    assert held == pytest.approx({"0": 40.0, "1": 40.0, "2": 40.0}, rel=1e-12)


def test_capacity_follows_time_held_and_memory_share():
    src, sampler = node(max_workloads=100)
    run(src, sampler, 40)
    rows = {(r.uuid, r.workload, r.gpu_instance): r for r in sampler.snapshot.workloads}
    hw = {k: r.costs.get(("hardware", "EUR"), 0.0) for k, r in rows.items()}
    sec = {k: r.seconds for k, r in rows.items()}
    g0 = "GPU-fake-0"
    # ann alone for the ticks at 1..4 s (4 s), with cat (30 : 0.25 GiB) at 5..9 s, with ben (30 : 10) and
    # cat at 10..19 s, with ben at 20..40 s (21 s).
    ann = 4 + 5 * 30 / 30.25 + 10 * 30 / 40.25 + 21 * 30 / 40
    assert sec[(g0, "user:1", "")] == pytest.approx(ann, rel=1e-12)
    assert sec[(g0, "user:3", "")] == pytest.approx(5 * 0.25 / 30.25 + 10 * 0.25 / 40.25, rel=1e-12)
    # The unused GPU: every second and every cent of its capacity is idle capacity.
    g2 = "GPU-fake-2"
    assert set(k for k in rows if k[0] == g2) == {(g2, UNALLOCATED, "")}
    assert sec[(g2, UNALLOCATED, "")] == pytest.approx(40.0)
    # Its hardware: its own amortisation (25,000 over 5 years) + a third of the node's (80,000).
    per_s = (25000 + 80000 / 3) / (5 * 365.25 * 86400)
    assert hw[(g2, UNALLOCATED, "")] == pytest.approx(40 * per_s, rel=1e-9)
    # MIG: dan and eve share GI 1 (3 of 7 slices) 8 : 24 GiB; dan alone on GI 5; GI 6 empty.
    g1 = "GPU-fake-1"
    per_slice = 40.0 / 7
    assert sec[(g1, "user:4", "1")] == pytest.approx(3 * per_slice * 8 / 32, rel=1e-12)
    assert sec[(g1, "user:5", "1")] == pytest.approx(3 * per_slice * 24 / 32, rel=1e-12)
    assert sec[(g1, "user:4", "5")] == pytest.approx(2 * per_slice, rel=1e-12)
    assert sec[(g1, UNALLOCATED, "6")] == pytest.approx(2 * per_slice, rel=1e-12)


def test_the_saved_state_adds_up_and_comes_back():
    src, sampler = node()
    run(src, sampler, 25)
    state = json.loads(json.dumps(sampler.ledger.state()))
    again = Ledger.from_settings(SETTINGS)
    again.load_state(state)
    assert again.workloads.rows() == sampler.ledger.workloads.rows()
    node_total = {
        "energy": math.fsum(v for _, _, v in state["energy_cost"]),
        "hardware": math.fsum(v for _, _, v in state["hardware_cost"]),
        "running": math.fsum(v for *_, v in state["running_cost"]),
    }
    charged: dict[str, float] = {}
    for _, _, kind, _, v in state["workloads"]["cost"]:
        charged[kind] = charged.get(kind, 0.0) + v
    for kind, total in node_total.items():
        assert math.isclose(charged[kind], total, rel_tol=1e-9), kind
    # States saved before cost kinds ([uuid, workload, currency, value] rows) load as energy cost.
    old = json.loads(json.dumps(state))
    old["workloads"]["cost"] = [[u, k, c, v] for u, k, kind, c, v in state["workloads"]["cost"] if kind == "energy"]
    del old["workloads"]["seconds"], old["running_cost"]
    older = Ledger.from_settings(SETTINGS)
    older.load_state(old)
    assert {(r.uuid, r.workload, r.gpu_instance): r.cost for r in older.workloads.rows()} == \
        {(r.uuid, r.workload, r.gpu_instance): r.cost for r in sampler.ledger.workloads.rows()}
