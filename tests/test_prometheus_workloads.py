"""Per-workload cost through a real Prometheus: the workload rules and dashboard on real processes.

tests/test_prometheus_e2e.py checks them on the demo (two users' processes with their recorded
identities). Here a second stack checks them on another recording, with the roll-ups: an agent
replaying fixtures/h100_trace_c.jsonl (one H100, no process for 8.5 s, then two real CUDA
processes, PID 402 at full duty and PID 428 at 50 %) in a loop, priced by
the DaemonSet's config (deploy/kubernetes/config.toml), scraped by Debian's Prometheus with the
project's rule files (every group evaluated each second). Replayed, the processes are workloads
``pid:402`` and ``pid:428`` without identity labels; the seconds before the first process are
``unallocated``.

The module runs once the agent exports the workload families (issue 9, attribution), and skips
before with that reason; it needs no edit to start running.

Checked: every workload recording rule and every panel query of the workload dashboard returns
data (that config has no [hardware] and no running costs: the cost-kind panels show energy and 0
for the rest); what Prometheus holds adds up (workloads = the GPU in energy, = the node's counter of
each cost kind in money, to 1e-6; every roll-up rule = the per-node rule); the full-duty process is
the dearest workload.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time

import pytest
from agentproc import ROOT, AgentProcess, free_port
from tools import in_ci
from dashboards import dashboard_queries
from promserver import JOB, PROMETHEUS, TARGET_LABELS, PrometheusServer, PromQLError

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
WORKLOAD_RULES = RULES_DIR / "gpucost-workloads.rules.yml"
TRACE = ROOT / "fixtures" / "h100_trace_c.jsonl"
CONFIG = ROOT / "deploy" / "kubernetes" / "config.toml"
DASHBOARD = "gpucost-workloads"
FAMILIES = ("gpucost_workload_gpu_energy_joules", "gpucost_workload_cost")

SPEED = 5          # trace seconds per wall second: one 29 s loop every ~6 s
SCRAPE = "250ms"
WAIT = 25          # at most this long for every rule and panel to have data

IN_CI = in_ci()


def _record_names() -> list[str]:
    return re.findall(r"^\s*-\s*record:\s*([\w:]+)", WORKLOAD_RULES.read_text(encoding="utf-8"), re.M)


@pytest.fixture(scope="module")
def stack():
    if PROMETHEUS is None:
        if IN_CI:
            pytest.fail("prometheus not installed, and CI is set: install Debian's prometheus package")
        pytest.skip("prometheus not installed (apt install prometheus)")
    state_dir = tempfile.mkdtemp(prefix="gpucost-state-")
    port = free_port()
    agent = AgentProcess("replay", str(TRACE), "--loop", "--speed", str(SPEED), "--config", str(CONFIG),
                         "--state-dir", state_dir, "--log-level", "warning", port=port)
    rule_files = sorted(RULES_DIR.glob("*.yml"))
    prom = PrometheusServer(f"127.0.0.1:{port}", rule_files=rule_files, scrape_interval=SCRAPE)
    began = time.time()
    try:
        agent.wait_ready()
        prom.start()
        # Both processes charged (from 16.6 s of trace on), and the totals seen moving: the first
        # scrapes of an agent started before Prometheus hold a flat stretch (rate 0).
        prom.wait_for(f'gpucost_workload_cost_total{{job="{JOB}", workload="pid:428"}} > 0', timeout=WAIT)
        prom.wait_for("sum(instance_kind_currency:gpucost_workload_cost_per_hour:rate5m) > 0", timeout=WAIT)
        print(f"\nboth processes charged and the rules above 0 in Prometheus {time.time() - began:.1f} s after start")
        yield prom, agent
    finally:
        rc = agent.stop()
        prom.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    assert rc == 0, f"the agent exited with {rc}:\n{agent.output[-3000:]}"


def _wait_all(prom: PrometheusServer, exprs: dict[str, str]) -> dict[str, list]:
    """Query each until it has data or WAIT passes; name -> last result. Query errors fail at once."""
    deadline = time.time() + WAIT
    results: dict[str, list] = {}
    pending = dict(exprs)
    while pending:
        for name, expr in list(pending.items()):
            results[name] = prom.query(expr)
            if results[name]:
                del pending[name]
        if not pending or time.time() > deadline:
            break
        time.sleep(0.5)
    return results


def test_every_workload_rule_returns_data(stack):
    prom, _ = stack
    names = _record_names()
    assert len(names) == 9
    results = _wait_all(prom, {n: n for n in names})
    problems = [f"{n}: no data" for n in names if not results[n]]
    for r in prom.rules():
        if r["health"] == "err":
            problems.append(f"{r['name']}: {r['lastError']}")
    level_labels = {"instance": {"cluster", "team", "job", "instance"}, "kind": {"kind"}, "currency": {"currency"},
                    "namespace": {"namespace"}, "pod": {"pod"}, "user": {"user"}, "team": {"team"},
                    "cost-kind": {"cost_kind"}}
    for n in names:
        for s in results[n]:
            print(f"{n}{s['metric']} = {s['value'][1]}")
            level = n.split(":")[0].replace("cost_kind", "cost-kind")
            need = set().union(*(level_labels.get(p, set()) for p in level.split("_")))
            need -= {"namespace", "pod", "user"}  # empty in a replay: Prometheus drops empty labels
            if not need <= s["metric"].keys():
                problems.append(f"{n}: {s['metric']} lacks {sorted(need - s['metric'].keys())}")
    kinds = {s["metric"]["kind"] for s in results["instance_kind_currency:gpucost_workload_cost_per_hour:rate5m"]}
    assert "unallocated" in kinds, kinds
    cost_kinds = {s["metric"]["cost_kind"]
                  for s in results["instance_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m"]}
    assert "energy" in cost_kinds, cost_kinds
    assert not problems, "\n".join(problems)


def test_every_workload_panel_returns_data(stack):
    prom, agent = stack
    values = {"job": JOB, "instance": f"127.0.0.1:{agent.port}", "cluster": TARGET_LABELS["cluster"], "gpu": "0",
              "currency": "EUR"}
    queries = [q for q in dashboard_queries(values) if q.dashboard == DASHBOARD]
    assert len(queries) >= 15
    try:
        results = _wait_all(prom, {f"{q.panel}: {q.expr}": q.expr for q in queries})
    except PromQLError as exc:
        pytest.fail(f"a panel query is not valid PromQL: {exc}")
    empty = [name for name, result in results.items() if not result]
    print(f"{len(queries)} panel queries of {DASHBOARD}, {len(empty)} without data")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    top = next(r for name, r in results.items() if name.startswith("Top 20 workloads by cost:"))
    dearest = max(top, key=lambda s: float(s["value"][1]))
    print("top workloads by cost: " + ", ".join(f"{s['metric']['workload']} {s['value'][1]}" for s in top))
    assert dearest["metric"]["workload"] == "pid:402"  # the full-duty process


def test_what_prometheus_holds_adds_up(stack):
    """Workloads = the GPU in energy, and = the node in money per cost kind, at one scrape; every
    roll-up = the per-node rule."""
    prom, _ = stack
    sel = f'job="{JOB}"'
    checks = {
        "energy (J)": (f"sum(gpucost_workload_gpu_energy_joules_total{{{sel}}})",
                       f"sum(gpucost_gpu_energy_joules_total{{{sel}}})"),
    }
    for kind in ("energy", "hardware", "running"):  # the config prices energy only: the others are absent
        checks[f"{kind} cost (EUR)"] = (f'sum(gpucost_workload_cost_total{{{sel}, cost_kind="{kind}", currency="EUR"}})',
                                        f'sum(gpucost_{kind}_cost_total{{{sel}, currency="EUR"}})')
    at = time.time()
    for what, (workloads, node) in checks.items():
        w, g = prom.value(workloads, time=at), prom.value(node, time=at)
        if w is None and g is None:
            print(f"{what}: neither the workloads nor the node have any")
            continue
        print(f"{what}: workloads {w:.6f}, node {g:.6f}")
        assert g > 0 and w == pytest.approx(g, rel=1e-6), what
    assert prom.value(checks["energy cost (EUR)"][0], time=at), "no energy cost charged to workloads"
    base = "sum(instance_kind_currency:gpucost_workload_cost_per_hour:rate5m)"
    _wait_all(prom, {n: n for n in _record_names()})
    at = time.time()
    expected = prom.value(base, time=at)
    assert expected and expected > 0
    for name in _record_names():
        got = prom.value(f"sum({name})", time=at)
        print(f"sum({name}) = {got:.6g} (per node: {expected:.6g})")
        assert math.isclose(got, expected, rel_tol=1e-9), name
