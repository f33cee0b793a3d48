"""Cost of today and of this month (``gpucost_cost_to_date``), and counters that exist from the start."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.accounting import Ledger
from agent.cost import Amortization, CostModel, HardwareConfig, PueConfig, TariffConfig
from agent.energy import EnergySlice

BERLIN = ZoneInfo("Europe/Berlin")


def at(*args: int) -> float:
    """Unix time of a Berlin wall time."""
    return datetime(*args, tzinfo=BERLIN).timestamp()


def ledger(hardware: bool = False) -> Ledger:
    # 0.36 EUR/kWh at PUE 1.0: 1 kWh (3.6 MJ) costs 0.36 EUR.
    cost = CostModel(TariffConfig(currency="EUR", timezone="Europe/Berlin", flat_price_per_kwh=0.36), PueConfig(value=1.0))
    amort = Amortization(HardwareConfig(gpu_price=8766.0, gpu_lifetime_years=1, node_price=0)) if hardware else None
    return Ledger(cost=cost, amortization=amort, hardware_currency="EUR" if hardware else None,
                  gpu_uuids={0: "GPU-a"})


def kwh(n: float) -> float:
    return n * 3_600_000.0


def test_day_and_month_restart_at_local_midnight_and_first_of_month():
    led = ledger()
    led.add([EnergySlice(0, at(2026, 11, 30, 22, 0), at(2026, 11, 30, 23, 0), kwh(1), "counter")])
    assert led.period_cost[("day", "energy", "EUR")] == pytest.approx(0.36)
    assert led.period_cost[("month", "energy", "EUR")] == pytest.approx(0.36)
    assert led.periods == {"day": "2026-11-30", "month": "2026-11"}
    # 00:00-01:00 Berlin on 1 December is 23:00-00:00 UTC on 30 November: a new day and month
    # in the tariff's zone, whatever UTC says.
    led.add([EnergySlice(0, at(2026, 12, 1, 0, 0), at(2026, 12, 1, 1, 0), kwh(2), "counter")])
    assert led.periods == {"day": "2026-12-01", "month": "2026-12"}
    assert led.period_cost[("day", "energy", "EUR")] == pytest.approx(0.72)
    assert led.period_cost[("month", "energy", "EUR")] == pytest.approx(0.72)
    # The totals keep everything.
    assert led.energy_cost[("gpu:GPU-a", "EUR")] == pytest.approx(1.08)
    # Next day, same month: the day restarts, the month goes on.
    led.add([EnergySlice(0, at(2026, 12, 2, 9, 0), at(2026, 12, 2, 10, 0), kwh(1), "counter")])
    assert led.period_cost[("day", "energy", "EUR")] == pytest.approx(0.36)
    assert led.period_cost[("month", "energy", "EUR")] == pytest.approx(1.08)


def test_a_late_slice_of_a_closed_day_is_not_added_to_the_new_day():
    led = ledger()
    led.roll_periods(at(2026, 12, 2, 0, 0, 3))  # the tick after midnight came first
    led.add([EnergySlice(0, at(2026, 12, 1, 23, 59, 0), at(2026, 12, 1, 23, 59, 58), kwh(1), "counter")])
    assert led.period_cost[("day", "energy", "EUR")] == 0.0
    assert led.period_cost[("month", "energy", "EUR")] == pytest.approx(0.36)  # still December
    assert led.energy_cost[("gpu:GPU-a", "EUR")] == pytest.approx(0.36)


def test_a_day_with_no_energy_still_restarts_at_midnight():
    led = ledger()
    led.open_accounts({"GPU-a": ("counter", "polled")})
    led.add([EnergySlice(0, at(2026, 12, 1, 10, 0), at(2026, 12, 1, 11, 0), kwh(1), "counter")])
    led.roll_periods(at(2026, 12, 2, 0, 0, 1))
    assert led.period_cost[("day", "energy", "EUR")] == 0.0
    assert ("day", "energy", "EUR") in led.period_cost  # the series stays, at 0


def test_hardware_amortisation_goes_to_its_own_kind():
    led = ledger(hardware=True)  # 8766 EUR over 1 year of 8766 h: 1 EUR per GPU-hour
    led.accrue_capacity(at(2026, 12, 1, 10, 0), at(2026, 12, 1, 12, 0))
    assert led.period_cost[("day", "hardware", "EUR")] == pytest.approx(2.0)
    assert led.period_cost[("month", "hardware", "EUR")] == pytest.approx(2.0)
    assert led.period_cost.get(("day", "energy", "EUR"), 0.0) == 0.0


def test_periods_survive_a_restart_within_the_day_and_restart_after_it():
    led = ledger()
    led.add([EnergySlice(0, at(2026, 12, 1, 10, 0), at(2026, 12, 1, 11, 0), kwh(1), "counter")])
    state = led.state()
    again = ledger()
    again.load_state(state)
    again.open_accounts({"GPU-a": ("counter", "polled")})  # keeps loaded values
    again.add([EnergySlice(0, at(2026, 12, 1, 12, 0), at(2026, 12, 1, 13, 0), kwh(1), "counter")])
    assert again.period_cost[("day", "energy", "EUR")] == pytest.approx(0.72)
    again.roll_periods(at(2026, 12, 2, 8, 0))
    assert again.period_cost[("day", "energy", "EUR")] == 0.0
    assert again.period_cost[("month", "energy", "EUR")] == pytest.approx(0.72)


def test_open_accounts_creates_every_total_at_zero_and_keeps_loaded_ones():
    led = ledger(hardware=True)
    led.gpu_energy[("GPU-a", "counter")] = 123.0  # as loaded from state
    led.open_accounts({"GPU-a": ("counter", "polled"), "GPU-b": ("polled",)}, host=True, other=True)
    assert led.gpu_energy == {("GPU-a", "counter"): 123.0, ("GPU-a", "polled"): 0.0, ("GPU-b", "polled"): 0.0}
    keys = {"gpu:GPU-a", "gpu:GPU-b", "host", "other"}
    assert set(led.it_energy) == keys and set(led.facility_energy) == keys
    assert set(led.energy_cost) == {(k, "EUR") for k in keys}
    assert set(led.idle_cost) == {("gpu:GPU-a", "EUR"), ("gpu:GPU-b", "EUR")}
    assert set(led.hardware_cost) == {("gpu:GPU-a", "EUR"), ("gpu:GPU-b", "EUR"), ("node", "EUR")}
    assert not led.emissions  # no [carbon]: no emissions series
    assert all(v == 0.0 for k, v in led.it_energy.items())
