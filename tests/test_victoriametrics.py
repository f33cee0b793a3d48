"""The fleet path past one Prometheus, end to end on Debian's VictoriaMetrics (deploy/victoriametrics/).

One agent and one VictoriaMetrics stack serve every test of this module: a demo agent (the
bundled H100 trace of two users' processes, at 5x speed, one tick per wall second), scraped
every second by ``vmagent`` as job ``gpu-cost-agent`` with the fleet's target labels and
remote-written to the single-node store; ``vmalert`` evaluates the project's rule files as
they are in deploy/prometheus/rules/ (each group every second) against the store and
writes the results back to it. Each process runs with the flags of its
``deploy/victoriametrics/*.default`` file (tests/vmserver.py replaces only addresses,
paths and intervals). The tests read everything back over the store's Prometheus API, as
Grafana does with deploy/victoriametrics/grafana-datasource.yml.

Where MetricsQL answers differently from PromQL on the same samples, the difference is
documented in docs/capacity.md#victoriametrics-and-promql and tested here.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest
import yaml
from agentproc import ROOT, AgentProcess, free_port
from dashboards import dashboard_queries, variable_queries
from promserver import JOB, TARGET_LABELS, PromQLError
from tools import need
from vmserver import DEPLOY, INSTALL, VictoriaMetricsStack, deploy_flags

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
AGENT_ARGS = ("demo", "--speed", "5", "--tick", "5", "--log-level", "warning")
SCRAPE = "1s"
RUN_SECONDS = 6    # wall seconds of scraping before the tests read back
# At most this long (from the agent's start) for every rule and panel to have data. VictoriaMetrics
# 1.79 finds a new series by its name about 10 s after its first sample (measured), and the
# deepest chain of records (raw -> instance month to date -> instance projection -> cluster
# projection) crosses that delay three times: 35 to 50 s measured on 2 busy cores.
RULE_WAIT = 75

#: As in tests/test_prometheus_e2e.py: the spike baseline looks a day and a week back.
NO_DATA_ALLOWED = {
    "instance_currency:gpucost_energy_cost_per_hour:baseline":
        "what the node spent around this time yesterday and a week ago: needs 22.5 h of history",
}


@dataclass
class Stack:
    vm: VictoriaMetricsStack
    agent: AgentProcess
    agent_ready: float   # Unix time the agent answered /healthz


@pytest.fixture(scope="module")
def stack():
    for tool in ("victoria-metrics", "vmagent", "vmalert"):
        need(tool, INSTALL)
    port = free_port()
    vm = VictoriaMetricsStack(f"127.0.0.1:{port}", rule_files=sorted(RULES_DIR.glob("*.yml")),
                              scrape_interval=SCRAPE, evaluation_interval="1s")
    agent = None
    state_dir = tempfile.mkdtemp(prefix="gpucost-state-")
    began = time.time()
    rc = None
    try:
        vm.start()
        agent = AgentProcess(*AGENT_ARGS, "--state-dir", state_dir, port=port)
        agent.wait_ready()
        ready = time.time()
        vm.wait_for(f'gpucost_agent_ticks_total{{job="{JOB}"}}', timeout=20)
        print(f"\nfirst sample in the store {time.time() - ready:.1f} s after the agent started")
        time.sleep(RUN_SECONDS)
        yield Stack(vm, agent, ready)
    finally:
        if agent is not None:
            rc = agent.stop()
        codes = vm.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        print(f"\nagent and VictoriaMetrics stopped; module took {time.time() - began:.1f} s")
    assert rc == 0, f"the agent exited with {rc}:\n{agent.output[-3000:]}"
    assert codes == [0, 0, 0], f"vmalert, vmagent, victoria-metrics exited with {codes}"


# -- the deploy files ---------------------------------------------------------


def test_the_deploy_files_pass_the_tools_own_checks():
    vmagent = need("vmagent", INSTALL)
    vmalert = need("vmalert", INSTALL)
    checked = subprocess.run([vmagent, f"-promscrape.config={DEPLOY / 'vmagent.yml'}", "-dryRun"],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run([vmalert, "-dryRun", f"-rule={RULES_DIR}/*.yml"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The flags name the project's rule files as deploy/prometheus/rules/ names them, and the
    # agents' job as the rules select it.
    rule_glob = dict(deploy_flags("vmalert"))["rule"]
    assert {p.name for p in RULES_DIR.glob(rule_glob.rsplit("/", 1)[1])} == {p.name for p in RULES_DIR.glob("*.yml")}
    jobs = [j["job_name"] for j in yaml.safe_load((DEPLOY / "vmagent.yml").read_text())["scrape_configs"]]
    assert jobs == [JOB]
    # Grafana: a Prometheus data source at the store's address.
    store = dict(deploy_flags("victoria-metrics"))["httpListenAddr"]
    [source] = yaml.safe_load((DEPLOY / "grafana-datasource.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"].endswith(store)


# -- agent -> vmagent -> remote write -> store ----------------------------------


def test_the_store_holds_what_the_agent_serves(stack):
    """Every gpucost_* family the agent serves arrives through vmagent's remote write, with the
    target labels; the agent's energy total, read between two scrapes, lies between the store's samples."""
    vm, agent = stack.vm, stack.agent
    served = {s.name for family in agent.metrics().values() for s in family if s.name.startswith("gpucost_")}
    stored = {s["metric"]["__name__"] for s in vm.query(f'group by (__name__) ({{__name__=~"gpucost_.*", job="{JOB}"}})')}
    assert served - stored == set(), "what the agent serves and the store lacks"
    for s in vm.query(f'gpucost_gpu_info{{job="{JOB}"}}'):
        assert {k: s["metric"].get(k) for k in TARGET_LABELS} == TARGET_LABELS

    name = "gpucost_gpu_energy_joules_total"
    before = time.time()
    total = sum(s.value for s in agent.metrics()["gpucost_gpu_energy_joules"] if s.name == name)
    after = time.time()
    time.sleep(3)  # a few more scrapes, and the remote write's flush
    samples: dict[float, float] = {}
    for s in vm.query(f'{name}{{job="{JOB}"}}[30s]'):
        for t, v in s["values"]:
            samples[t] = samples.get(t, 0.0) + float(v)
    below = max(v for t, v in samples.items() if t <= before)
    above = min(v for t, v in samples.items() if t >= after)
    print(f"{name}: store {below:.3f} <= agent {total:.3f} <= store {above:.3f}")
    # The store keeps a value to 12 or more significant digits (VictoriaMetrics' own encoding):
    # the bounds hold to 1e-9 relative.
    assert below * (1 - 1e-9) <= total <= above * (1 + 1e-9)


def test_increase_is_exact_where_prometheus_extrapolates(stack):
    """A documented difference: MetricsQL's increase() over a window that holds a counter's whole
    life is the last value less the first, with no extrapolation to the window's edges; counters
    that start at 0 give the agent's total exactly (Prometheus' increase() is off by up to a
    scrape interval's worth, tests/test_prometheus_e2e.py allows 1 %)."""
    vm = stack.vm
    name = "gpucost_node_it_energy_joules_total"
    series = vm.query(f'{name}{{job="{JOB}"}}[10m]')
    assert series
    last = min(s["values"][-1][0] for s in series)
    first = sum(float(s["values"][0][1]) for s in series)
    # The agent's total as the store has it at that moment, and increase() at the same moment:
    # both over the same samples (an instant query at a scrape's own timestamp may or may not
    # take that scrape's sample, as the store deduplicates per scrape interval).
    total = vm.value(f'sum(last_over_time({name}{{job="{JOB}"}}[10m]))', time=last)
    increase = vm.value(f'sum(increase({name}{{job="{JOB}"}}[10m]))', time=last)
    print(f"{name}: first samples {first}, increase {increase:.9g}, agent total {total:.9g}")
    assert first == 0.0, "the counters start at 0 (test_prometheus_e2e checks it on Prometheus)"
    assert increase == pytest.approx(total, rel=1e-9)


# -- vmalert: the project's rule files, unchanged --------------------------------


def _record_names_in_files() -> set[str]:
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def _alert_names_in_files() -> set[str]:
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["alert"] for r in group["rules"] if "alert" in r}
    return names


def test_vmalert_evaluates_every_rule_and_every_recording_rule_returns_data(stack):
    vm = stack.vm
    rules = vm.rules()
    recording = {r["name"] for r in rules if r["type"] == "recording"}
    assert recording == _record_names_in_files()
    assert {r["name"] for r in rules if r["type"] == "alerting"} == _alert_names_in_files()
    pending, results = set(recording) - set(NO_DATA_ALLOWED), {}
    deadline = stack.agent_ready + RULE_WAIT
    while True:
        for name in sorted(pending):
            results[name] = vm.query(name)
        pending = {n for n in pending if not results[n]}
        if not pending or time.time() > deadline:
            break
        time.sleep(0.5)
    print(f"{len(recording)} recording rules with data {time.time() - stack.agent_ready:.1f} s after the agent started")
    problems = [f"recording rule {n}: no data" for n in sorted(pending)]
    for r in vm.rules():  # health after the last evaluations
        if r["health"] != "ok" or r["lastError"]:
            problems.append(f"{r['type']} rule {r['name']} ({r['file']}): {r['health']} {r['lastError']}")
        if not r.get("lastEvaluation", "").startswith(time.strftime("%Y", time.gmtime())):
            problems.append(f"{r['type']} rule {r['name']}: never evaluated")
    for name in sorted(results):
        if results[name] and name.startswith(("instance", "cluster")):
            for s in results[name]:
                if "cluster" not in s["metric"]:
                    problems.append(f"{name}: {s['metric']} lost the cluster label")
    assert not problems, "\n".join(problems)


# -- Grafana on the store ------------------------------------------------------------


def _dashboard_values(stack: Stack) -> dict[str, str]:
    return {"job": JOB, "instance": f"127.0.0.1:{stack.agent.port}", "cluster": TARGET_LABELS["cluster"],
            "gpu": "0", "currency": "EUR"}


def test_every_dashboard_query_returns_data_on_victoriametrics(stack):
    vm = stack.vm
    queries = dashboard_queries(_dashboard_values(stack))
    assert queries
    deadline = stack.agent_ready + RULE_WAIT
    pending, errors = list(queries), {}
    while True:
        still = []
        for q in pending:
            try:
                if not vm.query(q.expr):
                    still.append(q)
            except PromQLError as exc:  # MetricsQL refuses it: waiting will not help
                errors[q] = str(exc)
        pending = still
        if not pending or time.time() > deadline:
            break
        time.sleep(0.5)
    problems = [f"{q.dashboard} / {q.panel}: {err}: {q.expr}" for q, err in errors.items()]
    problems += [f"{q.dashboard} / {q.panel}: no data: {q.expr}" for q in pending]
    variables = variable_queries(_dashboard_values(stack))
    for uid, var, selector, label in variables:
        values = {s["metric"].get(label) for s in vm.query(f"group by ({label}) ({selector})")} - {None, ""}
        if not values:
            problems.append(f"{uid} variable ${var}: label_values({selector}, {label}) offers no value")
    print(f"{len(queries)} panel queries of {len({q.dashboard for q in queries})} dashboards and "
          f"{len(variables)} variables with data {time.time() - stack.agent_ready:.1f} s after the agent started")
    assert not problems, "\n".join(problems)


def test_a_query_error_is_reported_not_empty(stack):
    """The dashboard check above would pass on a store that answered every query with nothing:
    MetricsQL's own errors do come back as errors."""
    with pytest.raises(PromQLError):
        stack.vm.query("sum(rate(gpucost_gpu_energy_joules_total[5m])")
    assert math.isfinite(stack.vm.value(f'sum(gpucost_agent_ticks_total{{job="{JOB}"}})'))
