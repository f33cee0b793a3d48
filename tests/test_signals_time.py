"""Signals and clocks against the real process: reload on SIGHUP, a save on every stop
signal, and a wall clock stepped back and forward (libfaketime) that neither stalls
sampling nor adds or drops cost."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from agentproc import ROOT, AgentProcess, value

FAKE_NVML = ROOT / "tests" / "fakenvml"

FLAT = """
[tariff]
currency = "EUR"
flat_price_per_kwh = {price}
[hardware]
node_price = 8766          # 1 EUR per hour over one year of 8766 h
node_lifetime_years = 1
"""


def wait_for(fn, timeout: float = 10.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def price(agent: AgentProcess) -> float | None:
    return value(agent.metrics(), "gpucost_energy_price_per_kwh", currency="EUR")


def test_sighup_applies_a_valid_config_from_now_and_refuses_an_invalid_one(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(FLAT.format(price=0.10))
    agent = AgentProcess("run", "--tick", "0.2", "--config", str(cfg))
    try:
        agent.wait_ready()
        assert price(agent) == 0.10
        wait_for(lambda: (value(agent.metrics(), "gpucost_energy_cost_total", component="host") or 0) > 0)
        before = value(agent.metrics(), "gpucost_energy_cost_total", component="host")
        cfg.write_text(FLAT.format(price=100.0))  # 1000x: a re-pricing of old energy would show at once
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: price(agent) == 100.0)
        m = agent.metrics()
        after = value(m, "gpucost_energy_cost_total", component="host")
        # Only energy used since the reload carries the new price: a fraction of a second of host
        # power at 1000x, far from 1000x the total counted before.
        assert before <= after < before * 50
        assert agent.proc.poll() is None
        cfg.write_text("[pue]\nvalue = 0.5\n")  # invalid: PUE below 1
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert agent.proc.poll() is None and price(agent) == 100.0  # the running config stays
    finally:
        rc = agent.stop()
    assert rc == 0
    assert "tariff: flat 100 EUR/kWh" in agent.output
    refused = [ln for ln in agent.output.splitlines() if "new configuration refused" in ln]
    assert len(refused) == 1 and "pue.value" in refused[0]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGQUIT", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGTERM"])
def test_every_stop_signal_ends_through_the_final_save(tmp_path, sig):
    agent = AgentProcess("run", "--tick", "0.2", "--config", str(_write(tmp_path, FLAT.format(price=0.1))),
                         "--state-dir", str(tmp_path / "st"))
    try:
        agent.wait_ready()
        wait_for(lambda: (value(agent.metrics(), "gpucost_agent_ticks_total") or 0) >= 3)
        last = value(agent.metrics(), "gpucost_hardware_cost_total", component="node")
    finally:
        rc = agent.stop(getattr(signal, sig))
    assert rc == 0, agent.output
    assert f"received {sig}, stopping" in agent.output
    state = json.loads((tmp_path / "st" / "state.json").read_text())
    saved = dict(((k, c), v) for k, c, v in state["hardware_cost"])[("node", "EUR")]
    assert saved >= last  # the final save holds at least what was last served


def test_sigusr1_saves_now_and_keeps_running(tmp_path):
    st = tmp_path / "st"
    agent = AgentProcess("run", "--tick", "0.2", "--state-dir", str(st))
    try:
        agent.wait_ready()
        first = (st / "state.json").stat().st_mtime_ns  # saved once at start
        time.sleep(0.3)
        agent.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: (st / "state.json").stat().st_mtime_ns > first)
        assert agent.proc.poll() is None
    finally:
        assert agent.stop() == 0
    assert "received SIGUSR1: writing the totals now" in agent.output


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1") if os.path.exists(p)), None)


def test_wall_clock_steps_neither_stall_sampling_nor_change_amortisation(tmp_path):
    from tools import in_ci

    if LIBFAKETIME is None:
        if in_ci():
            pytest.fail("libfaketime not found, and CI is set: apt install faketime")
        pytest.skip("libfaketime not installed (apt install faketime)")
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    # One GPU on the scripted fake NVML drawing a constant 300 W: its energy counter runs on the
    # monotonic clock, as a real GPU's runs on its own, so its energy over any span is 300 W × span.
    script = tmp_path / "nvml.json"
    script.write_text(json.dumps({"gpus": {"0": {"watts": 300.0}}}))
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), str(ROOT)]),
           "FAKE_NVML_GPUS": "1", "FAKE_NVML_SCRIPT": str(script), "STATE_DIRECTORY": str(tmp_path / "state")}
    (tmp_path / "state").mkdir()
    config = _write(tmp_path, FLAT.format(price=0.1)
                    + "[agent]\ntick_seconds = 0.25\n[gpu]\nenergy_counter_interval_seconds = 0.5\n")
    agent = AgentProcess("run", "--config", str(config), env=env)
    phases = []
    try:
        agent.wait_ready()
        time.sleep(1.0)

        def observe(label: str) -> None:
            m = agent.metrics()
            phases.append((label, time.monotonic(), value(m, "gpucost_agent_ticks_total"),
                           value(m, "gpucost_hardware_cost_total", component="node"),
                           value(m, "gpucost_agent_last_sample_timestamp_seconds"), agent.health(),
                           sum(s.value for s in m["gpucost_gpu_energy_joules"] if s.name.endswith("_total"))))

        observe("start")
        time.sleep(2.0)
        observe("steady")
        offset.write_text("-1h\n")  # an NTP step back of an hour
        time.sleep(2.0)
        observe("after -1h")
        offset.write_text("+1h\n")  # and forward again, two hours ahead of the last reading
        time.sleep(2.0)
        observe("after +1h")
    finally:
        agent.stop()
    per_hour = 1.0  # node amortisation, EUR/h
    for (_, t0, ticks0, cost0, wall0, _, j0), (label, t1, ticks1, cost1, wall1, health, j1) in zip(phases, phases[1:]):
        elapsed = t1 - t0
        # Ticks every 0.25 s go on through both steps (the scheduler is paced by the monotonic clock).
        assert ticks1 - ticks0 >= elapsed / 0.25 - 2, (label, ticks1 - ticks0, elapsed)
        # Amortisation grows by real elapsed time: no hour added or lost (±2 ticks of slack).
        assert cost1 - cost0 == pytest.approx(per_hour * elapsed / 3600, abs=per_hour * 0.5 / 3600), label
        assert health["status"] in ("ok", "degraded") and 0 <= health["last_sample_age_seconds"] < 1.0, label
        # GPU energy grows by 300 W × real elapsed time: the counter is read every 0.5 s, so each
        # end may lag by one interval and a tick (an hour added or lost would be 1,080,000 J).
        assert j1 - j0 == pytest.approx(300.0 * elapsed, abs=300.0 * 1.5), (label, j1 - j0, elapsed)
    # The wall clock the agent saw did move: the samples are stamped with it.
    assert phases[2][4] - phases[1][4] < -3000 and phases[3][4] - phases[2][4] > 6000
    assert agent.output.count("wall clock stepped by") == 2
