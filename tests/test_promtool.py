"""Prometheus' own linter on real scrapes: naming, units, types, help text."""

from __future__ import annotations

import subprocess
import time

import pytest
from agentproc import AgentProcess, value
from tools import need


def lint(text: str) -> subprocess.CompletedProcess:
    promtool = need("promtool", "apt install prometheus")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args", [
    ("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--config", "deploy/config.tou.toml"),
    ("run", "--tick", "0.2", "--config", "deploy/config.flat.toml"),
])
def test_scrape_passes_promtool_check_metrics(args):
    agent = AgentProcess(*args)
    try:
        agent.wait_ready()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until cost and energy series exist
            m = agent.metrics()
            if value(m, "gpucost_node_it_energy_joules_total", component="host"):
                break
            time.sleep(0.2)
        status, text = agent.get("/metrics")
    finally:
        agent.stop()
    assert status == 200 and "gpucost_energy_cost_total" in text
    result = lint(text)
    assert result.returncode == 0, result.stdout + result.stderr
