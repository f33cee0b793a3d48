"""The Prometheus rules in deploy/prometheus: promtool's own checks and unit tests, and the
conventions the runbook and the dashboards rely on (names, labels, annotations).

promtool comes with Debian's `prometheus` package, which `.ci/run` installs. Without it these
tests skip on a workstation, but fail where the environment variable CI is set, so a CI run
can never pass by skipping them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.test.yml"))
RUNBOOK = ROOT / "docs" / "alerts.md"

# level:metric:operations (https://prometheus.io/docs/practices/rules/)
RECORD_NAME = re.compile(r"^[a-z]+(_[a-z]+)*:gpucost_[a-z0-9_]+:[a-z][a-z0-9_]*$")
# Series users define by hand, not computed: a constant has no level or operation.
USER_INPUTS = {"gpucost:monthly_budget"}
SEVERITIES = {"critical", "warning", "info"}
# Alerts about a whole cluster or the whole job, not one node.
FLEET_ALERTS = {"GpuCostMonthlyBudgetProjectedOverrun", "GpuCostAgentTargetsMissing"}
# Alerts about one GPU: they name its model (from gpucost_gpu_info) and UUID.
GPU_ALERTS = {"GpuCostIdleGpu", "GpuCostGpuAtPowerCap", "GpuCostGpuLost"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_promtool() -> str:
    """promtool's path; skips the test without it, except under CI, where that fails."""
    path = shutil.which("promtool")
    if path is None:
        if in_ci():
            pytest.fail("promtool not found, and CI is set: install Debian's prometheus package")
        pytest.skip("promtool not installed (apt install prometheus)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_promtool(), *args], capture_output=True, text=True, timeout=60, cwd=PROM)


def load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def rules(kind: str) -> list[dict]:
    """Every rule of every rule file with `kind` ("alert" or "record"), with its file."""
    out = []
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    out.append({**rule, "_file": path.name, "_group": group["name"]})
    return out


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# -- promtool -------------------------------------------------------------------------


def test_there_are_rule_and_test_files():
    names = {p.name for p in RULE_FILES}
    assert {"gpucost.rules.yml", "gpucost-alerts.rules.yml", "gpucost-budget.rules.yml"} <= names
    assert len(TEST_FILES) >= 1


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    """The example scrape config parses and its rule_files exist."""
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(path):
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_missing_promtool_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        find_promtool()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        find_promtool()


# -- conventions ------------------------------------------------------------------------


def test_recording_rule_names_are_level_metric_operations():
    records = rules("record")
    assert records
    bad = [r["record"] for r in records if r["record"] not in USER_INPUTS and not RECORD_NAME.match(r["record"])]
    assert not bad, f"not level:metric:operations: {bad}"


def test_recording_rule_groups_are_named_gpucost():
    assert all(r["_group"].startswith("gpucost-") for r in rules("record") + rules("alert"))


def test_instance_records_keep_the_fleet_labels():
    """Every aggregation in an instance-level record keeps cluster, team, job and instance."""
    for r in rules("record"):
        name = r["record"]
        if not name.startswith("instance"):
            continue
        for by in re.findall(r"\bby\s*\(([^)]*)\)", r["expr"]):
            labels = {label.strip() for label in by.split(",")}
            assert {"cluster", "team", "job", "instance"} <= labels, (name, by)


def test_money_is_always_summed_by_currency():
    """A sum over money (cost, budget) without `currency` in its by() would add EUR to USD."""
    sums = 0
    for r in rules("record") + rules("alert"):
        for labels, inner in re.findall(r"\bsum\s+by\s*\(([^)]*)\)\s*\(\s*([^\s)]+)", r["expr"]):
            if re.search(r"cost|budget", inner.replace("gpucost", "")):
                sums += 1
                assert "currency" in labels, (r.get("record") or r.get("alert"), labels, inner)
    assert sums >= 10  # the pattern does find the sums


def test_every_alert_is_actionable():
    alerts = rules("alert")
    assert alerts
    anchors = github_anchors(RUNBOOK.read_text())
    for a in alerts:
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in SEVERITIES, name
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{name} has no {key}"
        assert ann["runbook_url"] == f"docs/alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/alerts.md has no section '{name}'"
        text = ann["summary"] + ann["description"]
        if name not in FLEET_ALERTS:
            assert "$labels.instance" in ann["summary"] and "$labels.instance" in ann["description"], \
                f"{name} does not name the node"
        if name in GPU_ALERTS:
            assert "$labels.uuid" in text and "gpucost_gpu_info" in text, f"{name} does not name the GPU's model and UUID"


def test_every_alert_is_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for path in TEST_FILES:
        for group in load(path)["tests"]:
            for t in group.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in rules("alert")}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_every_recording_rule_value_is_tested():
    exprs = " ".join(
        t["expr"]
        for path in TEST_FILES
        for group in load(path)["tests"]
        for t in group.get("promql_expr_test", [])
    )
    untested = [r["record"] for r in rules("record") if not re.search(re.escape(r["record"]) + r"(?![\w:])", exprs)]
    assert not untested, f"recording rules without a promql_expr_test: {untested}"


def test_every_rule_file_is_used_by_a_test():
    used = {
        (path.parent / f).resolve()
        for path in TEST_FILES
        for f in load(path)["rule_files"]
    }
    assert {p.resolve() for p in RULE_FILES} <= used
