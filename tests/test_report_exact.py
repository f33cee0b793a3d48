"""Issue 17: the report's increase of a counter is exact where PromQL's increase() is not.

Hand-made histories (scrapes every 60 s) backfilled into a real Prometheus, one node per case,
billed over one UTC day with agent.report's own engine, each against a figure worked out by
hand: a series born inside the period counts its first value whole; a workload that expired
and came back (missing from a scrape of its GPU) starts a new life even where its first value
is higher than where the last one ended; a series missing together with its GPU (Prometheus
down) continues; a reset inside a step is read sample by sample; nothing is extrapolated.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import billhistory as bh
from tools import need

from agent.report.bill import ALLOCATED, IDLE, UNALLOCATED, bill_of, fetch, from_prometheus
from agent.report.period import between
from agent.report.promapi import PrometheusAPI

DAY = datetime(2026, 11, 10, tzinfo=timezone.utc).timestamp()
H = 3600.0


def at(hours: float) -> float:
    return DAY + hours * H


class History:
    def __init__(self) -> None:
        self.series: dict[str, list[tuple[dict, list[tuple[float, float]]]]] = {}

    def add(self, family: str, labels: dict, samples: list[tuple[float, float]]) -> None:
        self.series.setdefault(family, []).append((labels, samples))

    def text(self) -> str:
        out = []
        for fam, lst in self.series.items():
            out.append(f"# TYPE {fam} counter")
            for labels, samples in lst:
                lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                out.extend(f"{fam}_total{{{lab}}} {v!r} {t:.3f}" for t, v in samples)
        return "\n".join(out) + "\n# EOF\n"


def scrapes(a: float, b: float) -> list[float]:
    """Scrape times every 60 s in [a, b]."""
    n0, n1 = int(round(a / 60)), int(round(b / 60))
    return [k * 60.0 for k in range(n0, n1 + 1)]


def node(h: History, inst: str, times: list[float]) -> None:
    """A node's GPU energy counter (the reference scrapes) and its energy cost, 1 per scrape."""
    gpu = {"instance": inst, "job": "gpu-cost-agent", "component": "gpu", "gpu": "0", "uuid": f"GPU-{inst}"}
    if not inst:  # a target without an instance label (relabelled away)
        del gpu["instance"]
    h.add("gpucost_node_it_energy_joules", gpu, [(t, 1000.0 * k) for k, t in enumerate(times)])
    h.add("gpucost_energy_cost", {**gpu, "currency": "EUR"}, [(t, 0.5 * k) for k, t in enumerate(times)])


def workload(h: History, inst: str, key: str, samples: list[tuple[float, float]], user: str = "ann") -> None:
    labels = {"instance": inst, "job": "gpu-cost-agent", "gpu": "0", "uuid": f"GPU-{inst}", "workload": key,
              "kind": key.split(":")[0], "user": user, "cost_kind": "energy", "currency": "EUR"}
    if not inst:
        del labels["instance"]
    h.add("gpucost_workload_cost", labels, samples)


def rising(times: list[float], first: float, per: float = 1.0) -> list[tuple[float, float]]:
    return [(t, first + per * k) for k, t in enumerate(times)]


START, END = at(-4), at(28)
EXPECTED: dict[str, float] = {}


def history() -> History:
    h = History()
    all_times = scrapes(START, END)
    # a: always there, born long before the period: exactly its value at the end minus at the start
    node(h, "a:1", all_times)
    workload(h, "a:1", "slurm:1", rising(all_times, 0.0, 0.25))
    EXPECTED["a:1"] = 0.25 * (len(scrapes(at(0), at(24))) - 1)
    # b: born inside at 7.0 (its first share), ends at 07:00: counted whole
    node(h, "b:1", all_times)
    workload(h, "b:1", "slurm:2", rising(scrapes(at(5) + 60, at(7)), 7.0))
    EXPECTED["b:1"] = 7.0 + (len(scrapes(at(5) + 60, at(7))) - 1)
    # c: expires at 08:20, comes back at 08:31 *higher* (25 > 20), again at 10:10 (50 > 44)
    node(h, "c:1", all_times)
    lives = [scrapes(at(8), at(8) + 19 * 60), scrapes(at(8) + 31 * 60, at(8) + 50 * 60),
             scrapes(at(10) + 600, at(10) + 1200)]
    firsts = [1.0, 25.0, 50.0]
    workload(h, "c:1", "user:9", [s for life, f in zip(lives, firsts) for s in rising(life, f)], user="ben")
    EXPECTED["c:1"] = sum(f + len(life) - 1 for life, f in zip(lives, firsts))
    # d: Prometheus down 12:00-14:30 for the whole node: the workload continues (higher after)
    gap = [t for t in all_times if not at(12) < t < at(14.5)]
    node(h, "d:1", gap)
    workload(h, "d:1", "slurm:4", [(t, (t - START) / 60) for t in gap])
    EXPECTED["d:1"] = (at(24) - START) / 60 - (at(0) - START) / 60
    # e: the agent restarts at 15:30 without its state: node and workload counters start at 0
    # again, inside a step, and climb past where they were before the next step's end
    before = [t for t in all_times if t < at(15.5)]
    after = [t for t in all_times if t >= at(15.5)]
    h.add("gpucost_node_it_energy_joules", {"instance": "e:1", "job": "gpu-cost-agent", "component": "gpu",
                                            "gpu": "0", "uuid": "GPU-e:1"},
          [(t, 1000.0 * k) for k, t in enumerate(before)] + [(t, 1000.0 * k) for k, t in enumerate(after)])
    workload(h, "e:1", "slurm:5", rising(before, 100.0, 1.0) + rising(after, 0.0, 3.0))
    at_start = 100.0 + len([t for t in before if t <= at(0)]) - 1
    EXPECTED["e:1"] = (100.0 + len(before) - 1 - at_start) + 3.0 * (len([t for t in after if t <= at(24)]) - 1)
    # f: expired before the period (last 60 at 22:00 the day before), back at 03:00 with 70: whole
    node(h, "f:1", all_times)
    workload(h, "f:1", "slurm:6", rising(scrapes(at(-3), at(-2)), 0.0) + rising(scrapes(at(3), at(3) + 600), 70.0))
    EXPECTED["f:1"] = 70.0 + 10
    # g: a target whose instance label was relabelled away (billed in a node set of its own)
    node(h, "", all_times)
    workload(h, "", "slurm:7", rising(all_times, 0.0, 0.5), user="ann")
    EXPECTED[""] = 0.5 * (len(scrapes(at(0), at(24))) - 1)
    return h


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    need("promtool", "apt install prometheus")
    need("prometheus", "apt install prometheus")
    out = tmp_path_factory.mktemp("exact")
    (out / "h.om").write_text(history().text())
    server = bh.backfilled_server(out / "h.om").start(timeout=60)
    try:
        period = between("2026-11-10", "2026-11-11", "UTC")
        f = fetch(PrometheusAPI(server.url), period, progress=None)
        increase = {r["metric"].get("instance", ""): float(r["value"][1]) for r in server.query(
            "sum by (instance) (increase(gpucost_workload_cost_total[1d]))", time=period.end)}
        yield f, increase
    finally:
        server.stop()


@pytest.mark.parametrize("inst", ["a:1", "b:1", "c:1", "d:1", "e:1", "f:1", ""])
def test_each_case_is_exact(fetched, inst):
    f, increase = fetched
    got = sum(s.total for s in f.cost if s.labels.get("instance", "") == inst)
    assert got == pytest.approx(EXPECTED[inst], abs=1e-9), (inst, got, EXPECTED[inst])
    print(f"\n{inst}: report {got:g}, by hand {EXPECTED[inst]:g}, PromQL increase() {increase.get(inst, 0):g}")


def test_promql_increase_would_be_wrong_where_the_report_is_right(fetched):
    f, increase = fetched
    wrong = [i for i in ("b:1", "c:1", "f:1") if abs(increase.get(i, 0.0) - EXPECTED[i]) > 0.5]
    assert len(wrong) == 3, increase


def test_resets_are_counted_and_steps_read_sample_by_sample(fetched):
    f, _ = fetched
    e = [s for s in f.cost if s.labels.get("instance") == "e:1"]
    assert e[0].resets == 1
    node_e = [s for s in f.it if s.labels.get("instance") == "e:1"]
    assert node_e[0].resets == 1
    assert f.stats["queries"] > 0


def test_rows_classify_idle_and_unallocated():
    from agent.report.bill import classify

    assert classify(["team", "user"], ("ml", ""), "unallocated") == (IDLE, ("ml", ""))
    assert classify(["team", "user"], ("ml", ""), "unknown") == (UNALLOCATED, ("ml", ""))
    assert classify(["team", "user"], ("ml", "ann"), "slurm:1") == (ALLOCATED, ("ml", "ann"))
    assert classify(["team"], ("ml",), "unknown") == (ALLOCATED, ("ml",))  # by team only: the team's


def test_a_period_with_no_data_is_a_clear_error(fetched):
    from agent.report.bill import ReportError
    from agent.report.period import month

    f, _ = fetched
    url = f.source.split(" ", 1)[1]
    with pytest.raises(ReportError, match=r"no data for 2026-01 .*did Prometheus scrape gpu-cost-agent"):
        fetch(PrometheusAPI(url), month("2026-01", "UTC"), progress=None)


def test_bill_of_by_user(fetched):
    f, _ = fetched
    bill = bill_of(f, ["user"])
    (eur,) = bill.sections
    rows = {r.group[0]: r for r in eur.rows}
    assert rows["ben"].cost["energy"] == pytest.approx(EXPECTED["c:1"])
    check = next(c for c in eur.checks if c.what == "energy cost")
    assert check.metered > 0  # the nodes' meter is there (these made-up workloads do not add up to it)


@pytest.mark.parametrize("per_query", [1, 2, 6, 7, 0])
def test_a_fleet_billed_node_set_by_node_set_is_the_bill_of_all_at_once(fetched, per_query):
    """``report --nodes-per-query``: the series of a few nodes at a time, added up, give the
    bill all series at once give — rows (ann's jobs run on six nodes in different sets),
    daily costs, the reconciliation, the counts of series and resets."""
    f, _ = fetched
    whole = bill_of(f, ["user"])
    api = PrometheusAPI(f.source.split(" ", 1)[1])
    parts = from_prometheus(api, f.period, ["user"], nodes_per_query=per_query, progress=None)
    # 6 instances + the target without one: sets of per_query, and one for series without instance
    sets = 1 if per_query in (0, 6, 7) else -(-6 // per_query) + 1
    assert parts.stats["node_sets"] == sets
    for k in ("series", "workload_series", "resets", "born_in_period"):
        assert parts.stats[k] == whole.stats[k], k
    assert [s.currency for s in parts.sections] == [s.currency for s in whole.sections]
    for a, b in zip(parts.sections, whole.sections):
        assert [(r.allocation, r.group) for r in a.rows] == [(r.allocation, r.group) for r in b.rows]
        for ra, rb in zip(a.rows, b.rows):
            assert ra.workloads == rb.workloads
            for kind in ra.cost:
                assert ra.cost[kind] == pytest.approx(rb.cost[kind], rel=1e-12, abs=1e-12), (ra.group, kind)
            assert ra.gpu_hours == pytest.approx(rb.gpu_hours, rel=1e-12)
        assert [(r.node, r.group) for r in a.detail] == [(r.node, r.group) for r in b.detail]
        assert [(c.what, c.info) for c in a.checks] == [(c.what, c.info) for c in b.checks]
        for ca, cb in zip(a.checks, b.checks):
            assert ca.report == pytest.approx(cb.report, rel=1e-12, abs=1e-12), ca.what
            assert ca.metered == cb.metered, ca.what  # math.fsum of the same increases
        assert a.daily.keys() == b.daily.keys()
        for day in a.daily:
            assert a.daily[day] == pytest.approx(b.daily[day], rel=1e-12), day
    ann = next(r for r in parts.sections[0].rows if r.group == ("ann",))
    assert ann.workloads == 6 and ann.cost["energy"] == pytest.approx(
        sum(v for k, v in EXPECTED.items() if k != "c:1"))  # ben's is c's
