"""Cost through the real agent process: spreadsheet figures from /metrics, totals across restarts."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timezone

import pytest
from agentproc import AgentProcess, saved_state, value
from helpers import counter_delta_joules

from agent.cli import main

UUID = "GPU-d9a96f9e-f458-7f0a-44e5-804222e7f75f"
KWH = 3.6e6


def config(tmp_path, body: str, name: str = "agent.toml"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def gpu_cost(m) -> float:
    return value(m, "gpucost_energy_cost_total", component="gpu", gpu="0", uuid=UUID, currency="EUR")


def counter_at(trace, t: float) -> float:
    """The trace's hardware counter at time t, interpolated between its 20 Hz rows. Units: J."""
    rows = trace.rows
    for a, b in zip(rows, rows[1:]):
        if a["t"] <= t <= b["t"]:
            ea, eb = a["gpus"]["0"]["energy_mj"], b["gpus"]["0"]["energy_mj"]
            return (ea + (eb - ea) * (t - a["t"]) / (b["t"] - a["t"])) / 1000.0
    raise ValueError(t)


def test_flat_tariff_cost_is_energy_times_pue_times_price(tmp_path, h100_trace):
    cfg = config(tmp_path, '[host]\nenabled = false\n[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n'
                           "[pue]\nvalue = 1.4\n")
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--config", cfg)
    try:
        agent.wait_ready()
        agent.wait_finished()
        m = agent.metrics()
    finally:
        assert agent.stop() == 0
    energy = counter_delta_joules(h100_trace)  # 35,151.24 J
    spreadsheet = energy / KWH * 1.4 * 0.30  # = 0.0041009 EUR
    assert gpu_cost(m) == pytest.approx(spreadsheet, rel=0.001)
    assert value(m, "gpucost_node_facility_energy_joules_total", component="gpu", gpu="0") == pytest.approx(
        energy * 1.4, rel=0.001)
    assert value(m, "gpucost_energy_price_per_kwh", currency="EUR", band="flat") == 0.30
    assert value(m, "gpucost_pue_ratio") == 1.4
    assert value(m, "gpucost_energy_cost_total", component="host") is None  # host disabled: no host cost


def test_time_of_use_boundary_inside_the_trace(tmp_path, h100_trace):
    """A band boundary 50 s into the trace: energy on each side priced at its own band."""
    start = h100_trace.start
    boundary = (int(start + 50) // 60) * 60  # a whole minute inside the trace
    assert start + 5 < boundary < h100_trace.end - 5
    hhmm = datetime.fromtimestamp(boundary, timezone.utc).strftime("%H:%M")
    cfg = config(tmp_path, f"""
[host]
enabled = false
[tariff]
currency = "EUR"
timezone = "UTC"
[[tariff.bands]]
name = "early"
price_per_kwh = 0.10
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "00:00"
end = "{hhmm}"
[[tariff.bands]]
name = "late"
price_per_kwh = 0.50
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "{hhmm}"
end = "00:00"
[pue]
value = 1.2
""")
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--config", cfg)
    try:
        agent.wait_ready()
        agent.wait_finished()
        m = agent.metrics()
    finally:
        assert agent.stop() == 0
    first = h100_trace.rows[0]["gpus"]["0"]["energy_mj"] / 1000.0
    last = h100_trace.rows[-1]["gpus"]["0"]["energy_mj"] / 1000.0
    at_boundary = counter_at(h100_trace, boundary)
    spreadsheet = ((at_boundary - first) * 0.10 + (last - at_boundary) * 0.50) * 1.2 / KWH
    assert gpu_cost(m) == pytest.approx(spreadsheet, rel=0.001)
    assert value(m, "gpucost_energy_price_per_kwh", currency="EUR", band="late") == 0.50


def state_file(d):
    return saved_state(d)


def gpu_energy_in_state(state) -> float:
    return sum(v for uuid, _src, v in state["gpu_energy_joules"] if uuid == UUID)


def test_kill_9_loses_at_most_one_persist_interval_and_totals_continue(tmp_path, h100_trace):
    state_dir = tmp_path / "state"
    cfg = config(tmp_path, '[agent]\npersist_interval_seconds = 1\n[tariff]\ncurrency = "EUR"\n'
                           "flat_price_per_kwh = 0.30\n")
    args = ("replay", "fixtures/h100_trace_a.jsonl", "--speed", "5", "--config", cfg, "--state-dir", str(state_dir))
    agent = AgentProcess(*args)
    try:
        agent.wait_ready()
        time.sleep(6)  # 30 s of trace: the matmul phase, the most energy per second
        before = value(agent.metrics(), "gpucost_gpu_energy_joules_total", gpu="0", source="counter")
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
    finally:
        agent.stop()
    persisted = gpu_energy_in_state(state_file(state_dir))
    # One persist interval is 1 s of real time = 5 s of trace, plus one 5 s counter interval;
    # at most 710 W (the H100 at its cap) over 10 s of trace.
    assert before - 7100 <= persisted <= before + 7100
    assert persisted > 0
    again = AgentProcess(*args)
    try:
        again.wait_ready()
        m = again.metrics()
        assert value(m, "gpucost_gpu_energy_joules_total", gpu="0", source="counter") >= persisted
        again.wait_finished(timeout=60)
        m = again.metrics()
    finally:
        assert again.stop() == 0
    # The restarted replay adds the whole trace on top of what was persisted: exact.
    total = value(m, "gpucost_gpu_energy_joules_total", gpu="0", source="counter")
    assert total == pytest.approx(persisted + counter_delta_joules(h100_trace), rel=1e-6)


def test_sigterm_loses_nothing_and_a_new_tariff_is_not_retroactive(tmp_path, h100_trace):
    state_dir = tmp_path / "state"
    cfg_a = config(tmp_path, '[agent]\npersist_interval_seconds = 3600\n[host]\nenabled = false\n'
                             '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n', "a.toml")
    cfg_b = config(tmp_path, '[agent]\npersist_interval_seconds = 3600\n[host]\nenabled = false\n'
                             '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 1.00\n', "b.toml")
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "10", "--config", cfg_a,
                         "--state-dir", str(state_dir))
    try:
        agent.wait_ready()
        time.sleep(3)
        scraped = value(agent.metrics(), "gpucost_gpu_energy_joules_total", gpu="0", source="counter")
    finally:
        assert agent.stop(signal.SIGTERM) == 0
    state = state_file(state_dir)
    persisted = gpu_energy_in_state(state)
    assert persisted >= scraped  # nothing lost: the stop even reads the counter once more
    cost_a = [v for key, cur, v in state["energy_cost"] if key == f"gpu:{UUID}" and cur == "EUR"][0]
    assert cost_a == pytest.approx(persisted / KWH * 0.30, rel=1e-9)
    # Restart with a new price: the old cost stays at the old price, new energy at the new one.
    again = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--config", cfg_b,
                         "--state-dir", str(state_dir))
    try:
        again.wait_ready()
        first = again.metrics()
        assert value(first, "gpucost_gpu_energy_joules_total", gpu="0", source="counter") == persisted
        again.wait_finished()
        m = again.metrics()
    finally:
        assert again.stop() == 0
    added = counter_delta_joules(h100_trace)
    assert gpu_cost(m) == pytest.approx(cost_a + added / KWH * 1.00, rel=1e-6)


def test_corrupt_state_file_is_set_aside_and_the_agent_carries_on(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text('{"version": 1, "gpu_energy_joules": [[\n')
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--state-dir", str(state_dir))
    try:
        agent.wait_ready()
        agent.wait_finished()
        assert value(agent.metrics(), "gpucost_gpu_energy_joules_total", gpu="0", source="counter") > 0
    finally:
        assert agent.stop() == 0
    aside = list(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"version": 1')
    assert "state file" in agent.output and "unusable (line 2" in agent.output
    assert gpu_energy_in_state(state_file(state_dir)) > 0  # a fresh, good state was written


def test_unwritable_state_dir_is_an_error_at_start(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rc = main(["replay", "fixtures/h100_trace_a.jsonl", "--state-dir", str(blocker / "state"),
               "--listen", "127.0.0.1:0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "state directory" in err and "is not writable" in err


@pytest.mark.parametrize(
    "body, field",
    [
        ('[tariff]\ncurrency = "EURO"\nflat_price_per_kwh = 0.3\n', "tariff.currency:"),
        ('[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = -0.3\n', "tariff.flat_price_per_kwh:"),
        ('[tariff]\ncurrency = "EUR"\ntimezone = "Mars/Olympus_Mons"\nflat_price_per_kwh = 0.3\n', "tariff.timezone:"),
        ('[tariff]\ncurrency = "EUR"\n'
         '[[tariff.bands]]\nname = "a"\nprice_per_kwh = 0.2\ndays = ["weekday", "weekend"]\nstart = "00:00"\nend = "00:00"\n'
         '[[tariff.bands]]\nname = "b"\nprice_per_kwh = 0.3\ndays = ["mon"]\nstart = "08:00"\nend = "09:00"\n',
         "tariff.bands[1]: overlaps"),
        ("[pue]\nvalue = 0.8\n", "pue.value:"),
        ("[hardware]\ngpu_price = 30000\n", "hardware.currency is required"),
    ],
)
def test_malformed_config_one_line_naming_the_field(tmp_path, capsys, body, field):
    cfg = config(tmp_path, body)
    assert main(["check-config", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1
    assert main(["run", "--config", cfg]) == 2
    assert field in capsys.readouterr().err


def test_check_config_prints_the_weekly_tariff_table(capsys):
    assert main(["check-config", "deploy/config.tou.toml"]) == 0
    out = capsys.readouterr().out
    assert "PUE: 1.4" in out and "380 g CO2e/kWh" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:2].isdigit()}
    assert lines["10"] == ["0.285"] * 5 + ["0.195"] * 2  # weekday peak, weekend
    assert lines["23"] == ["0.215"] * 5 + ["0.195"] * 2  # weekday night
    assert main(["check-config", "deploy/config.flat.toml"]) == 0
