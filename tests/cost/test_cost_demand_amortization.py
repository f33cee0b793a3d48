"""Demand peaks and amortisation, worked by hand."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.cost import Amortization, DemandTracker, HardwareConfig, TariffConfig


def at(*args: int, tz: str = "UTC") -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


# --------------------------------------------------------------------------- demand


def test_window_averages_and_peak():
    d = DemandTracker(window_minutes=15, tz="UTC", price_per_kw_month=12.5)
    # 10:00-10:15 at 40 kW: 40000 W x 900 s = 36e6 J -> average 36e6 / 900 = 40000 W
    d.add(at(2026, 5, 4, 10), at(2026, 5, 4, 10, 15), 36e6)
    # 10:15-10:20 at 20 kW, then nothing: 20000 x 300 = 6e6 J -> 6e6 / 900 = 6666.67 W
    d.add(at(2026, 5, 4, 10, 15), at(2026, 5, 4, 10, 20), 6e6)
    assert d.window_power_w(at(2026, 5, 4, 10, 5)) == pytest.approx(40000)
    assert d.window_power_w(at(2026, 5, 4, 10, 16)) == pytest.approx(6666.6667)
    assert d.peak_w == pytest.approx(40000)
    assert d.peak_window_start == at(2026, 5, 4, 10)
    # demand charge: 40 kW x 12.5 = 500.0
    assert d.demand_charge == pytest.approx(500.0)


def test_slice_across_windows_and_several_feeders():
    d = DemandTracker(15, "UTC")
    # 10:10-10:20 at 60 kW = 36e6 J, half in each window: 18e6 J -> 18e6 / 900 = 20000 W each.
    d.add(at(2026, 5, 4, 10, 10), at(2026, 5, 4, 10, 20), 36e6)
    assert d.peak_w == pytest.approx(20000)
    # Eight GPUs feed the 10:15 window, 1 s at 700 W each: +5600 J
    #   -> (18e6 + 5600) / 900 = 20006.22 W
    for _ in range(8):
        d.add(at(2026, 5, 4, 10, 25), at(2026, 5, 4, 10, 25, 1), 700.0)
    assert d.peak_w == pytest.approx((18e6 + 5600) / 900)
    assert d.peak_window_start == at(2026, 5, 4, 10, 15)
    assert d.demand_charge is None  # no price configured


def test_windows_are_aligned_to_the_local_clock():
    # Asia/Kathmandu is UTC+05:45: hour windows start at local :00, i.e. UTC :15.
    d = DemandTracker(60, "Asia/Kathmandu")
    t = at(2026, 5, 4, 10, 7, tz="Asia/Kathmandu")
    assert d.window_start(t) == at(2026, 5, 4, 10, 0, tz="Asia/Kathmandu")
    assert datetime.fromtimestamp(d.window_start(t), ZoneInfo("UTC")).minute == 15
    # Berlin 15 min windows line up across the DST jump (02:00 CET -> 03:00 CEST).
    b = DemandTracker(15, "Europe/Berlin")
    jump = at(2026, 3, 29, 1)  # UTC instant of the jump
    assert b.window_start(jump - 1) == jump - 900
    assert b.window_start(jump) == jump


def test_monthly_reset_in_local_time():
    d = DemandTracker(15, "Europe/Berlin", price_per_kw_month=10.0)
    # Mar 31 23:50-24:00 local at 100 kW: 100000 x 600 = 60e6 J in the 23:45
    # window -> 60e6 / 900 = 66666.67 W. March charge 66.667 kW x 10 = 666.67
    d.add(
        at(2026, 3, 31, 23, 50, tz="Europe/Berlin"), at(2026, 4, 1, 0, 0, tz="Europe/Berlin"), 60e6
    )
    assert d.month == "2026-03"
    assert d.peak_w == pytest.approx(66666.667)
    assert d.demand_charge == pytest.approx(666.66667)
    # Apr 1 00:00-00:15 local (still Mar 31 22:00 UTC) at 10 kW: 9e6 J -> 10000 W.
    d.add(at(2026, 4, 1, 0, 0, tz="Europe/Berlin"), at(2026, 4, 1, 0, 15, tz="Europe/Berlin"), 9e6)
    assert d.month == "2026-04"
    assert d.peak_w == pytest.approx(10000)
    assert d.demand_charge == pytest.approx(100.0)
    # Late energy for March no longer counts.
    d.add(
        at(2026, 3, 31, 23, 0, tz="Europe/Berlin"),
        at(2026, 3, 31, 23, 15, tz="Europe/Berlin"),
        900e6,
    )
    assert d.peak_w == pytest.approx(10000)
    # Time passing into May resets without energy.
    d.advance(at(2026, 5, 1, 0, 0, 1, tz="Europe/Berlin"))
    assert (d.month, d.peak_w, d.demand_charge) == ("2026-05", 0.0, 0.0)


def test_state_round_trip():
    cfg = TariffConfig(
        currency="EUR",
        timezone="Europe/Berlin",
        flat_price_per_kwh=0.3,
        demand_charge_per_kw_month=10.0,
    )
    d = DemandTracker.from_tariff(cfg)
    t = at(2026, 5, 4, 10, tz="Europe/Berlin")
    d.add(t, t + 600, 18e6)  # 18e6 / 900 = 20000 W so far
    saved = json.loads(json.dumps(d.state()))
    e = DemandTracker.from_tariff(cfg)
    e.load_state(saved)
    assert (e.month, e.peak_w, e.peak_window_start) == ("2026-05", pytest.approx(20000), t)
    # The open window continues: +300 s at 120 kW = 36e6 J -> (18e6 + 36e6) / 900 = 60000 W
    e.add(t + 600, t + 900, 36e6)
    assert e.peak_w == pytest.approx(60000)
    assert e.demand_charge == pytest.approx(600.0)
    # A snapshot from another window length is not comparable: ignored.
    f = DemandTracker(30, "Europe/Berlin")
    f.load_state(saved)
    assert f.month is None and f.peak_w == 0.0


# --------------------------------------------------------------------------- amortisation


def test_amortisation_per_hour():
    a = Amortization(HardwareConfig(gpu_price=30000, gpu_lifetime_years=5, node_price=60000))
    # 5 years = 5 x 365.25 x 24 = 43830 h; 30000 / 43830 = 0.6844626967830... per hour
    assert a.gpu_cost_per_hour(0, "NVIDIA H100 80GB HBM3") == pytest.approx(
        0.684462696783, rel=1e-12
    )
    # per second: 0.6844626967830 / 3600 = 1.901285268842e-4
    assert a.gpu_cost_per_second(0) == pytest.approx(1.901285268842e-4, rel=1e-12)
    # node: 60000 / 43830 = 1.368925393566 per hour
    assert a.node_cost_per_hour() == pytest.approx(1.368925393566, rel=1e-12)
    # 8 GPUs + node: 8 x 0.684462696783 + 1.368925393566 = 6.844626967830 per hour
    total = 8 * a.gpu_cost_per_hour(0) + a.node_cost_per_hour()
    assert total == pytest.approx(6.84462696783, rel=1e-12)
    assert a.enabled


def test_amortisation_overrides_by_index_then_model():
    cfg = HardwareConfig.model_validate(
        {
            "gpu_price": 30000,
            "gpus": [
                {"index": 3, "price": 25000},
                {"model": "a100", "price": 15000, "lifetime_years": 4},
            ],
        }
    )
    a = Amortization(cfg)
    # index 3: 25000 / 43830 = 0.570385580652 per hour
    assert a.gpu_cost_per_hour(3, "NVIDIA A100-SXM4-80GB") == pytest.approx(
        0.570385580652, rel=1e-12
    )
    # A100 by name (case-insensitive): 4 years = 35064 h; 15000 / 35064 = 0.427789185489 per hour
    assert a.gpu_cost_per_hour(1, "NVIDIA A100-SXM4-80GB") == pytest.approx(
        0.427789185489, rel=1e-12
    )
    # no match: default 30000 / 43830
    assert a.gpu_cost_per_hour(1, "NVIDIA H100") == pytest.approx(0.684462696783, rel=1e-12)
    assert a.node_cost_per_second() == 0.0


def test_no_hardware_prices_means_zero():
    a = Amortization(HardwareConfig())
    assert not a.enabled
    assert a.gpu_cost_per_second(0, "x") == 0.0 and a.node_cost_per_second() == 0.0


def test_window_start_with_the_offset_kept_per_window_equals_the_lookup_across_dst():
    for window in (15, 60):
        d = DemandTracker(window, "Europe/Berlin")
        fresh = DemandTracker(window, "Europe/Berlin")
        for start in (at(2026, 3, 29, 0, 40), at(2026, 10, 25, 0, 40)):  # spring and autumn DST
            t = start
            while t < start + 3 * 3600:
                off = datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")).utcoffset().total_seconds()
                expect = (t + off) // (window * 60) * (window * 60) - off
                assert d.window_start(t) == expect
                fresh._offset_known = (float("inf"), float("-inf"), 0.0)  # no memory: the plain lookup
                assert fresh.window_start(t) == expect
                t += 7.3
