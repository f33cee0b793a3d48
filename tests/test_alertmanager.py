"""The pages reach someone (issue 18): the shipped Alertmanager routing, checked by ``amtool``,
and one alert followed from the project's rules on a real Prometheus scraping the real agent,
through a real Alertmanager, to a webhook receiver in the test.

``amtool`` and ``prometheus-alertmanager`` come with Debian's ``prometheus-alertmanager`` package,
which ``.ci/run`` installs; without them these tests skip on a workstation and fail under CI.

The end-to-end test makes two faults real: the agent crash-loops (killed and restarted three
times; each new process is scraped), then stops for good. The rules are the project's, evaluated
every second, with one change: GpuCostAgentDown waits 3 s instead of 5 minutes. What the webhook
received is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from agentproc import ROOT, AgentProcess, free_port, value
from amserver import INSTALL, ROUTING, TEMPLATES, AlertmanagerServer, WebhookReceiver, alertmanager_binary
from promserver import JOB, TARGET_LABELS, PrometheusServer
from tools import need

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
ALERT_RULES = RULES_DIR / "gpucost-alerts.rules.yml"

#: Alerts about money go to FinOps; everything else (the agent, its state, the GPUs) to on-call.
MONEY = {"GpuCostSpike", "GpuCostMonthlyBudgetProjectedOverrun", "GpuCostIdleGpu", "GpuCostPriceAboveUsual",
         "GpuCostPueAboveUsual"}
ONCALL_PREFIXES = ("GpuCostAgent", "GpuCostState", "GpuCostGpu")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("amtool", INSTALL), *args], capture_output=True, text=True, timeout=60)


def expected_receiver(name: str, severity: str) -> str:
    team = "finops" if name in MONEY else "oncall"
    return f"{team}-info" if severity == "info" else team


# -- the routing, offline ---------------------------------------------------------------------


def test_amtool_check_config_passes_on_the_shipped_routing():
    result = amtool("check-config", str(ROUTING))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "1 templates" in result.stdout


def test_every_alert_is_classified():
    """A new alert must be put on purpose with FinOps (MONEY) or on-call (its name's prefix)."""
    for rule in alert_rules():
        name = rule["alert"]
        assert (name in MONEY) != name.startswith(ONCALL_PREFIXES), name


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_each_alert_routes_to_its_receiver(rule):
    """``amtool config routes test`` with the labels the alert carries (a node's alert has
    cluster, team, job and instance; a budget alert cluster and currency)."""
    name, severity = rule["alert"], rule["labels"]["severity"]
    labels = {"alertname": name, "severity": severity, "cluster": "eu", "team": "training", "job": JOB,
              "instance": "gpu-a:9842"}
    if name == "GpuCostMonthlyBudgetProjectedOverrun":
        labels = {"alertname": name, "severity": severity, "cluster": "eu", "currency": "EUR"}
    want = expected_receiver(name, severity)
    result = amtool("config", "routes", "test", f"--config.file={ROUTING}", f"--verify.receivers={want}",
                    *(f"{k}={v}" for k, v in labels.items()))
    assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    assert result.stdout.strip() == want


def test_the_templates_render_an_alert():
    data = {
        "receiver": "oncall", "status": "firing", "externalURL": "http://alertmanager.example:9093",
        "groupLabels": {"cluster": "eu", "instance": "gpu-a:9842"},
        "commonLabels": {"alertname": "GpuCostAgentDown", "cluster": "eu", "instance": "gpu-a:9842",
                         "severity": "warning"},
        "commonAnnotations": {},
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "GpuCostAgentDown", "cluster": "eu", "instance": "gpu-a:9842",
                       "job": JOB, "severity": "warning"},
            "annotations": {"summary": "gpu-cost-agent on gpu-a:9842 cannot be scraped",
                            "description": "Prometheus has failed to scrape it for 5 minutes.",
                            "runbook_url": "docs/alerts.md#gpucostagentdown"},
            "startsAt": "2026-03-01T05:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        }],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(data, f)
        f.flush()
        out = {}
        for name in ("gpucost.title", "gpucost.text", "gpucost.slack.text"):
            result = amtool("template", "render", f"--template.glob={TEMPLATES}/*.tmpl",
                            f"--template.text={{{{ template \"{name}\" . }}}}", f"--template.data={f.name}")
            assert result.returncode == 0, result.stderr
            out[name] = result.stdout
    assert out["gpucost.title"].strip() == "[FIRING:1] GpuCostAgentDown cluster eu, gpu-a:9842"
    assert "WARNING GpuCostAgentDown: gpu-cost-agent on gpu-a:9842 cannot be scraped" in out["gpucost.text"]
    assert "Runbook: docs/alerts.md#gpucostagentdown" in out["gpucost.text"]
    assert "*<docs/alerts.md#gpucostagentdown|GpuCostAgentDown>*" in out["gpucost.slack.text"]


# -- a real Alertmanager ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def alertmanager():
    binary = alertmanager_binary() or need("prometheus-alertmanager", INSTALL)
    hook = WebhookReceiver()
    am = AlertmanagerServer(binary, hook.port)
    try:
        am.start()
        yield am, hook
    finally:
        am.stop()
        hook.close()


def names(body: dict) -> set[str]:
    return {a["labels"]["alertname"] for a in body["alerts"]}


def test_alertmanager_routes_and_inhibits(alertmanager):
    """Alerts posted to a real Alertmanager: an agent down silences its GPU alerts on the same
    node, not on another; a money finding goes to FinOps."""
    am, hook = alertmanager
    node = {"cluster": "inhibit-test", "team": "training", "job": JOB}
    am.post_alerts([
        {"labels": {**node, "alertname": "GpuCostAgentDown", "severity": "warning", "instance": "n1:9842"},
         "annotations": {"summary": "down"}},
        {"labels": {**node, "alertname": "GpuCostGpuLost", "severity": "warning", "instance": "n1:9842", "gpu": "0"},
         "annotations": {"summary": "lost, but its agent is down"}},
        {"labels": {**node, "alertname": "GpuCostGpuLost", "severity": "warning", "instance": "n2:9842", "gpu": "0"},
         "annotations": {"summary": "lost"}},
        {"labels": {**node, "alertname": "GpuCostIdleGpu", "severity": "info", "instance": "n3:9842", "gpu": "1"},
         "annotations": {"summary": "idle"}},
    ])

    def on(path: str, instance: str):
        return lambda p, b: p == path and b["groupLabels"].get("instance") == instance \
            and b["commonLabels"].get("cluster") == "inhibit-test"

    _, n1 = hook.wait_for(on("/oncall", "n1:9842"), 15, "n1 notification")
    _, n2 = hook.wait_for(on("/oncall", "n2:9842"), 15, "n2 notification")
    _, n3 = hook.wait_for(on("/finops-info", "n3:9842"), 15, "n3 notification")
    assert names(n1) == {"GpuCostAgentDown"}
    assert names(n2) == {"GpuCostGpuLost"}
    assert names(n3) == {"GpuCostIdleGpu"}
    state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]
             for a in am.alerts() if a["labels"].get("cluster") == "inhibit-test"}
    assert state[("GpuCostGpuLost", "n1:9842")]["state"] == "suppressed"
    assert state[("GpuCostGpuLost", "n1:9842")]["inhibitedBy"]
    assert state[("GpuCostGpuLost", "n2:9842")]["state"] == "active"


def rules_for_test(directory: Path) -> list[Path]:
    """The project's rule files, GpuCostAgentDown waiting 3 s instead of 5 minutes."""
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        text = path.read_text()
        if path == ALERT_RULES:
            text, n = re.subn(r"(- alert: GpuCostAgentDown\n(?:.*\n)*?\s+for: )5m", r"\g<1>3s", text)
            assert n == 1
        copy = directory / path.name
        copy.write_text(text)
        out.append(copy)
    return out


def test_a_crash_loop_and_a_stopped_agent_page_oncall_end_to_end(alertmanager, tmp_path):
    am, hook = alertmanager
    need("prometheus", "install Debian's prometheus package")
    port = free_port()
    instance = f"127.0.0.1:{port}"
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    rules = rules_for_test(tmp_path)
    prom = PrometheusServer(instance, rule_files=rules, alertmanager=am.address)
    agent = None
    began = time.monotonic()

    def start_agent() -> AgentProcess:
        a = AgentProcess("demo", "--log-level", "warning", "--state-dir", str(state_dir), port=port)
        a.wait_ready()
        return a

    def scraped_start(a: AgentProcess) -> float:
        """Wait until Prometheus has scraped this process's start time."""
        start = value(a.metrics(), "process_start_time_seconds")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            v = prom.value(f'process_start_time_seconds{{job="{JOB}"}}')
            if v is not None and abs(v - start) < 1e-3:
                return start
            time.sleep(0.2)
        raise AssertionError("Prometheus never scraped the new agent process")

    try:
        prom.start()
        agent = start_agent()
        starts = [scraped_start(agent)]
        # The crash loop: killed (no clean stop) and started again, three times.
        for _ in range(3):
            agent.stop(signal.SIGKILL)
            agent = start_agent()
            starts.append(scraped_start(agent))
        assert len(set(starts)) == 4
        ours = {**TARGET_LABELS, "instance": instance}

        def to_oncall_with(alertname: str):
            return lambda path, body: path == "/oncall" and body["groupLabels"].get("instance") == instance \
                and any(a["labels"]["alertname"] == alertname and a["status"] == "firing" for a in body["alerts"])

        _, looping = hook.wait_for(to_oncall_with("GpuCostAgentRestarting"), 30, "GpuCostAgentRestarting at /oncall")
        print(f"\nGpuCostAgentRestarting delivered {time.monotonic() - began:.1f} s into the test")
        # The agent stops for good.
        agent.stop()
        agent = None
        _, down = hook.wait_for(to_oncall_with("GpuCostAgentDown"), 30, "GpuCostAgentDown at /oncall")
        print(f"GpuCostAgentDown delivered {time.monotonic() - began:.1f} s into the test")
        print("payload received at /oncall:\n" + json.dumps(down, indent=2))
    finally:
        if agent is not None:
            agent.stop()
        prom_log = prom.log_tail()
        prom.stop()

    restarting = next(a for a in looping["alerts"] if a["labels"]["alertname"] == "GpuCostAgentRestarting")
    assert restarting["labels"] == {**ours, "alertname": "GpuCostAgentRestarting", "job": JOB, "severity": "warning"}
    assert int(re.search(r"dropping out: (\d+) times", restarting["annotations"]["summary"]).group(1)) >= 3
    assert restarting["annotations"]["runbook_url"] == "docs/alerts.md#gpucostagentrestarting"

    assert down["receiver"] == "oncall" and down["status"] == "firing"
    assert down["groupLabels"] == {"cluster": TARGET_LABELS["cluster"], "instance": instance}
    alert = next(a for a in down["alerts"] if a["labels"]["alertname"] == "GpuCostAgentDown")
    assert alert["labels"] == {**ours, "alertname": "GpuCostAgentDown", "job": JOB, "severity": "warning"}, prom_log
    assert alert["annotations"]["summary"] == f"gpu-cost-agent on {instance} cannot be scraped"
    assert alert["annotations"]["description"].startswith(
        f"Prometheus has failed to scrape gpu-cost-agent at {instance} (cluster {TARGET_LABELS['cluster']}) for 5 minutes.")
    assert alert["annotations"]["runbook_url"] == "docs/alerts.md#gpucostagentdown"
    # the link back to the rule's expression on the Prometheus that fired it
    assert f":{prom.port}/graph?g0.expr=up%7Bjob%3D%22gpu-cost-agent%22%7D+%3D%3D+0" in alert["generatorURL"]
