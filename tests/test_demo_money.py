"""The quick start shows money: the demo's bundled config, today's band, counters from the first scrape."""

from __future__ import annotations

import time

from agentproc import AgentProcess, value

from datetime import datetime
from zoneinfo import ZoneInfo

COUNTERS_AT_START = [
    "gpucost_gpu_energy_joules_total",
    "gpucost_energy_cost_total",
    "gpucost_gpu_idle_cost_total",
    "gpucost_node_it_energy_joules_total",
    "gpucost_node_facility_energy_joules_total",
    "gpucost_emissions_grams_total",
    "gpucost_hardware_cost_total",
    "gpucost_agent_errors_total",
]


def samples(families: dict, name: str) -> list:
    return [s for fam in families.values() for s in fam if s.name == name]


def demo_band_now() -> tuple[float, str]:
    """The band of agent/data/demo.toml in force now, worked out from its text by hand (not by the
    agent's Tariff): weekdays 06-22 h peak 0.285, 22-06 h offpeak 0.215, weekends 0.195 EUR/kWh,
    in Europe/Berlin, no holidays."""
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    if now.weekday() >= 5:
        return 0.195, "weekend"
    return (0.285, "peak") if 6 <= now.hour < 22 else (0.215, "offpeak")


def test_demo_without_arguments_prices_energy_at_todays_band_and_says_which_tariff():
    agent = AgentProcess("demo")
    try:
        agent.wait_ready()
        first = agent.metrics()
        expected_band = demo_band_now()
        # Every counter family exists on the very first scrape, GPU energy and cost at 0 (the
        # counter is read every 5 s, so nothing has been measured yet): a true zero.
        for name in COUNTERS_AT_START:
            assert samples(first, name), f"{name} missing from the first scrape"
        for s in samples(first, "gpucost_gpu_energy_joules_total"):
            assert s.value == 0.0, s
        assert {s.labels["source"] for s in samples(first, "gpucost_gpu_energy_joules_total")} == {"counter", "polled"}
        for s in samples(first, "gpucost_agent_errors_total"):
            assert s.value == 0.0, s
        assert len(samples(first, "gpucost_agent_errors_total")) >= 12
        assert value(first, "gpucost_energy_cost_total", component="gpu", gpu="0") == 0.0
        assert value(first, "gpucost_gpu_idle_cost_total", gpu="0", currency="EUR") == 0.0
        # The band served is the one in force now on the wall clock (not the recorded day's).
        price = samples(first, "gpucost_energy_price_per_kwh")
        assert [(s.labels["band"], s.labels["currency"], s.value) for s in price] == [
            (expected_band[1], "EUR", expected_band[0])
        ]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = agent.metrics()
            if (value(m, "gpucost_energy_cost_total", component="gpu", gpu="0", currency="EUR") or 0) > 0:
                break
            time.sleep(0.3)
        assert value(m, "gpucost_energy_cost_total", component="gpu", gpu="0", currency="EUR") > 0
        assert value(m, "gpucost_cost_to_date", period="day", kind="energy", currency="EUR") > 0
        assert value(m, "gpucost_cost_to_date", period="month", kind="hardware", currency="EUR") > 0
        assert value(m, "gpucost_node_cost_rate_per_hour", kind="hardware", currency="EUR") > 1.0
    finally:
        agent.stop()
    assert "tariff: time-of-use in Europe/Berlin" in agent.output
    assert "bundled example config" in agent.output


def test_demo_with_a_config_uses_that_tariff_and_names_the_file():
    agent = AgentProcess("demo", "--config", "deploy/config.flat.toml")
    try:
        agent.wait_ready()
        m = agent.metrics()
        assert [s.value for s in samples(m, "gpucost_energy_price_per_kwh")] == [0.12]
    finally:
        agent.stop()
    assert "tariff: flat 0.12 USD/kWh, from the file deploy/config.flat.toml" in agent.output


def test_tariff_from_the_environment_is_named():
    agent = AgentProcess("demo", env={"GPUCOST_TARIFF__FLAT_PRICE_PER_KWH": "0.5", "GPUCOST_TARIFF__CURRENCY": "USD",
                                      "GPUCOST_TARIFF__BANDS": "null"})
    try:
        agent.wait_ready()
        m = agent.metrics()
        assert [(s.labels["currency"], s.value) for s in samples(m, "gpucost_energy_price_per_kwh")] == [("USD", 0.5)]
    finally:
        agent.stop()
    assert "from the environment (GPUCOST_TARIFF__BANDS, GPUCOST_TARIFF__CURRENCY, GPUCOST_TARIFF__FLAT_PRICE_PER_KWH)" \
        in agent.output


def test_run_without_a_tariff_says_so_once_and_dates_its_saves():
    agent = AgentProcess("run", "--tick", "0.2")
    try:
        agent.wait_ready()
        m = agent.metrics()
        saved = value(m, "gpucost_state_last_save_timestamp_seconds")
        assert saved is not None and abs(saved - time.time()) < 10  # saved once at start
        assert samples(m, "gpucost_energy_cost_total") == []  # no tariff: no cost series
        assert value(m, "gpucost_agent_errors_total", kind="state_write") == 0.0
        time.sleep(0.6)
    finally:
        agent.stop()
    assert agent.output.count("no [tariff] in the configuration") == 1
