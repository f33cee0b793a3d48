"""Host power through the real agent process on this machine (no powercap: the model)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from agentproc import AgentProcess, saved_state, value

IPMI = Path(__file__).resolve().parents[1] / "fixtures" / "ipmi"
POWERCAP = Path(__file__).resolve().parents[1] / "fixtures" / "powercap"


def scrape_after_ticks(agent: AgentProcess, ticks: int = 4, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = agent.metrics()
        if (value(m, "gpucost_agent_ticks_total") or 0) >= ticks:
            return m
        time.sleep(0.1)
    raise AssertionError("agent did not tick")


def test_run_without_powercap_uses_the_model_and_says_so(tmp_path):
    # A powercap root that does not exist, on any machine (most real hosts have /sys/class/powercap).
    config = tmp_path / "config.toml"
    config.write_text(f'[host]\npowercap_root = "{tmp_path / "no-powercap"}"\n')
    agent = AgentProcess("run", "--tick", "0.2", "--config", str(config))
    try:
        agent.wait_ready()
        m = scrape_after_ticks(agent)
        assert value(m, "gpucost_host_power_watts", component="cpu", source="model") > 0
        assert value(m, "gpucost_host_power_watts", component="dram", source="model") > 0
        assert value(m, "gpucost_host_power_watts", component="platform", source="static") == 0.0
        assert value(m, "gpucost_host_power_watts", source="rapl") is None
        assert value(m, "gpucost_host_power_info", method="model") == 1
        assert value(m, "gpucost_host_energy_joules_total", component="cpu", source="model") > 0
        assert 0.0 <= value(m, "gpucost_host_cpu_utilization_ratio") <= 1.0
        assert value(m, "gpucost_node_it_power_watts") > 0  # the host flows into node IT power
    finally:
        assert agent.stop() == 0
    assert f"host power: model (no {tmp_path / 'no-powercap'})" in agent.output


def ipmi_config(tmp_path, fixture: str, basis: str) -> str:
    p = tmp_path / "agent.toml"
    p.write_text(f"""
[host]
platform_watts = 0
[host.ipmi]
enabled = true
command = ["{sys.executable}", "-c", "import sys; sys.stdout.write(open({str(IPMI / fixture)!r}).read())"]
interval_seconds = 0.5
cost_basis = "{basis}"
[tariff]
currency = "EUR"
flat_price_per_kwh = 0.30
""")
    return str(p)


def test_bmc_wall_power_is_exported_beside_the_components_and_can_be_the_cost_basis(tmp_path):
    agent = AgentProcess("run", "--tick", "0.2", "--config", ipmi_config(tmp_path, "dell_reading.txt", "wall"))
    try:
        agent.wait_ready()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = agent.metrics()
            if (value(m, "gpucost_energy_cost_total", component="other") or 0) > 0:
                break
            time.sleep(0.2)
        wall = value(m, "gpucost_node_wall_power_watts", source="dcmi")
        assert wall == 298.0  # "Instantaneous power reading: 298 Watts" in the recorded output
        components = sum(
            value(m, "gpucost_host_power_watts", component=c, source=s) or 0.0
            for c, s in (("cpu", "model"), ("dram", "model"), ("platform", "static"))
        )
        assert components < wall
        # Cost from the wall: what the components do not explain is priced as "other".
        assert value(m, "gpucost_energy_cost_total", component="other", currency="EUR") > 0
        assert value(m, "gpucost_node_it_power_watts") == wall
    finally:
        assert agent.stop() == 0


def test_bmc_error_is_logged_once_and_no_wall_power_is_exported(tmp_path):
    agent = AgentProcess("run", "--tick", "0.2", "--config", ipmi_config(tmp_path, "error_session.txt", "components"))
    try:
        agent.wait_ready()
        time.sleep(2.0)  # about four polls
        m = agent.metrics()
        assert value(m, "gpucost_node_wall_power_watts") is None
        assert value(m, "gpucost_energy_cost_total", component="other") is None
        assert value(m, "gpucost_agent_errors_total", kind="dcmi") >= 2
        assert value(m, "gpucost_energy_cost_total", component="host", currency="EUR") > 0
    finally:
        assert agent.stop() == 0
    assert agent.output.count("insufficient resources for session") == 1  # once, not every poll


def test_after_kill_9_the_rapl_counters_bridge_the_downtime_and_host_energy_never_goes_back(tmp_path):
    """The host's RAPL counters bridge a kill -9 the way the GPUs' energy counters do (same boot):
    the state holds the counters its host total ends at, and the restarted agent's first read
    counts, exact and through a wrap, everything used since, so the exported total never goes
    back below what was scraped. (A modelled host has no counter: it is not bridged.)"""
    import json
    import shutil
    import signal

    root = tmp_path / "powercap"
    shutil.copytree(POWERCAP / "wrap", root)  # package-0 328 850 µJ below its range: the next step wraps
    energy_uj = root / "intel-rapl:0" / "energy_uj"
    state_dir = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ntick_seconds = 0.5\n[gpu]\nenabled = false\n[host]\nmode = "rapl"\n'
                   f'powercap_root = "{root}"\n')
    env = {"STATE_DIRECTORY": str(state_dir)}

    def cpu_joules(agent: AgentProcess) -> float | None:
        return value(agent.metrics(), "gpucost_host_energy_joules_total", component="cpu", source="rapl")

    first = AgentProcess("run", "--config", str(cfg), env=env)
    first.wait_ready()  # its first tick read the counter at 262 143 000 000 µJ
    energy_uj.write_text("20000000\n")  # wrapped: +20.32885 J
    deadline = time.monotonic() + 10
    while cpu_joules(first) != pytest.approx(20.32885, abs=1e-6) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cpu_joules(first) == pytest.approx(20.32885, abs=1e-6)  # served, so saved first
    energy_uj.write_text("50000000\n")  # +30 J the agent reads but nobody scrapes
    time.sleep(1.5)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    state = saved_state(state_dir)
    saved = {(c, s): j for c, s, j in state["host_energy_joules"]}
    assert saved[("cpu", "rapl")] == pytest.approx(20.32885, abs=1e-6)  # what was served, no less
    assert state["host_counters"]["zones"] == [["intel-rapl:0", 20_000_000, 262_143_328_850]]  # counter at the save, range
    energy_uj.write_text("95000000\n")  # +45 J while no agent runs
    second = AgentProcess("run", "--config", str(cfg), env=env)
    try:
        second.wait_ready()
        assert cpu_joules(second) == pytest.approx(95.32885, abs=1e-6)  # 20.32885 + 30 + 45, not 20.33
    finally:
        assert second.stop() == 0
    assert "host: 75.000 J used in the" in second.output and "from the RAPL counters" in second.output
