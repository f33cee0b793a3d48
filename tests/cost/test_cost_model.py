"""CostModel with PUE and carbon schedules, summaries, idle; worked by hand.

2026-05-04 is a Monday. 1 kWh = 3.6e6 J.
"""

from __future__ import annotations

import math
import re
import tomllib
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.cost import (
    Amortization,
    CarbonConfig,
    CostModel,
    HardwareConfig,
    IdleConfig,
    PueConfig,
    Schedule,
    TariffConfig,
    is_idle,
    summarize,
)

BERLIN = "Europe/Berlin"
KWH = 3.6e6


def at(*args: int, tz: str = BERLIN) -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


def band(name, price, days, start, end):
    return {"name": name, "price_per_kwh": price, "days": days, "start": start, "end": end}


COMMERCIAL = TariffConfig(
    currency="EUR",
    timezone=BERLIN,
    bands=[
        band("peak", 0.34, ["weekday"], "08:00", "20:00"),
        band("offpeak", 0.22, ["weekday"], "20:00", "08:00"),
        band("weekend", 0.19, ["weekend"], "00:00", "00:00"),
    ],
)
FLAT = TariffConfig(currency="EUR", timezone=BERLIN, flat_price_per_kwh=0.30)
PUE_BY_MONTH = [1.5, 1.5, 1.4, 1.3, 1.2, 1.1, 1.1, 1.1, 1.2, 1.3, 1.4, 1.5]


def test_constant_pue_and_carbon():
    m = CostModel(FLAT, PueConfig(value=1.4), CarbonConfig(grams_per_kwh=380))
    # 1 kWh IT: facility 1 x 1.4 = 1.4 kWh; cost 1.4 x 0.30 = 0.42; 1.4 x 380 = 532 g
    (p,) = m.price(at(2026, 5, 4, 10), at(2026, 5, 4, 11), KWH)
    assert p.facility_joules == pytest.approx(1.4 * KWH)
    assert p.cost == pytest.approx(0.42)
    assert p.emissions_g == pytest.approx(532.0)
    assert (p.pue, p.grams_per_kwh, p.price_per_kwh, p.band) == (1.4, 380.0, 0.30, "flat")


def test_no_tariff_and_no_carbon_give_none():
    # Energy only: facility = IT x PUE (default 1.0), no money, no emissions.
    m = CostModel(None, None, CarbonConfig())
    (p,) = m.price(0.0, 10.0, 5000.0)
    assert (p.it_joules, p.facility_joules) == (5000.0, 5000.0)
    assert p.cost is p.price_per_kwh is p.band is p.emissions_g is None
    assert m.currency is None
    s = summarize([p])
    assert s.cost is None and s.emissions_g is None and s.by_band == {}


def test_pue_by_month_splits_at_local_month_start():
    m = CostModel(FLAT, PueConfig(by_month=PUE_BY_MONTH))
    # Mar 31 23:00 -> Apr 1 01:00 (Berlin) at 1 kW IT: 1 kWh in each month.
    #   March: 1 kWh x 1.4 = 1.4 kWh facility x 0.30 = 0.42
    #   April: 1 kWh x 1.3 = 1.3 kWh facility x 0.30 = 0.39
    #   total: 2.7 kWh = 9.72e6 J, 0.81
    parts = m.price(at(2026, 3, 31, 23), at(2026, 4, 1, 1), 2 * KWH)
    assert [p.pue for p in parts] == [1.4, 1.3]
    assert parts[0].t1 == at(2026, 4, 1)
    s = summarize(parts)
    assert s.it_joules == pytest.approx(2 * KWH)
    assert s.facility_joules == pytest.approx(9.72e6)
    assert s.cost == pytest.approx(0.81)


def test_pue_and_carbon_schedules_by_hour_with_time_of_use():
    pue = PueConfig(
        bands=[
            {"start": "08:30", "end": "20:00", "value": 1.5},
            {"start": "20:00", "end": "08:30", "value": 1.2},
        ]
    )
    carbon = CarbonConfig(
        bands=[
            {"start": "07:45", "end": "19:00", "grams_per_kwh": 300},
            {"start": "19:00", "end": "07:45", "grams_per_kwh": 450},
        ]
    )
    m = CostModel(COMMERCIAL, pue, carbon)
    # Mon 07:30-09:00 at 1 kW IT: 1.5 kWh = 5.4e6 J over 5400 s; cuts at
    # 07:45 (carbon), 08:00 (tariff), 08:30 (PUE):
    #   07:30-07:45 0.25 kWh IT x1.2 = 0.30 kWh fac; x0.22 = 0.066;  x450 = 135 g
    #   07:45-08:00 0.25 kWh IT x1.2 = 0.30 kWh fac; x0.22 = 0.066;  x300 =  90 g
    #   08:00-08:30 0.50 kWh IT x1.2 = 0.60 kWh fac; x0.34 = 0.204;  x300 = 180 g
    #   08:30-09:00 0.50 kWh IT x1.5 = 0.75 kWh fac; x0.34 = 0.255;  x300 = 225 g
    #   totals: 1.95 kWh fac (7.02e6 J), 0.591, 630 g
    parts = m.price(at(2026, 5, 4, 7, 30), at(2026, 5, 4, 9), 5.4e6)
    assert [(p.band, p.pue, p.grams_per_kwh) for p in parts] == [
        ("offpeak", 1.2, 450.0),
        ("offpeak", 1.2, 300.0),
        ("peak", 1.2, 300.0),
        ("peak", 1.5, 300.0),
    ]
    assert [p.cost for p in parts] == pytest.approx([0.066, 0.066, 0.204, 0.255])
    assert [p.emissions_g for p in parts] == pytest.approx([135, 90, 180, 225])
    s = summarize(parts)
    assert s.facility_joules == pytest.approx(7.02e6)
    assert s.cost == pytest.approx(0.591)
    assert s.emissions_g == pytest.approx(630.0)
    assert s.by_band["offpeak"].cost == pytest.approx(0.132)
    assert s.by_band["peak"].facility_joules == pytest.approx(1.35 * KWH)


def test_schedule_timezone_defaults_to_the_tariffs():
    # PUE bands in Berlin time, via the tariff's zone: at 08:30 CEST (06:30 UTC).
    pue = PueConfig(
        bands=[
            {"start": "08:30", "end": "20:00", "value": 1.5},
            {"start": "20:00", "end": "08:30", "value": 1.2},
        ]
    )
    m = CostModel(FLAT, pue)
    assert m.pue.value_at(at(2026, 5, 4, 8, 29)) == 1.2
    assert m.pue.value_at(at(2026, 5, 4, 8, 30)) == 1.5
    # Its own timezone wins.
    m = CostModel(FLAT, pue.model_copy(update={"timezone": "UTC"}))
    assert m.pue.value_at(at(2026, 5, 4, 8, 30)) == 1.2  # 06:30 UTC
    # Without a tariff: UTC.
    assert CostModel(None, pue).pue.value_at(at(2026, 5, 4, 6, 30, tz="UTC")) == 1.2
    assert CostModel(None, pue).pue.value_at(at(2026, 5, 4, 8, 30, tz="UTC")) == 1.5


def test_carbon_by_month_and_schedule_segments():
    s = Schedule(by_month=list(range(100, 1300, 100)), timezone="UTC")
    # Jan = 100 ... Dec = 1200; 2026-01-31 23:00 UTC -> 2026-02-01 01:00 UTC
    segs = s.segments(at(2026, 1, 31, 23, tz="UTC"), at(2026, 2, 1, 1, tz="UTC"))
    assert [(b - a, v) for a, b, v in segs] == [(3600, 100.0), (3600, 200.0)]
    m = CostModel(None, None, CarbonConfig(by_month=[400] * 6 + [200] * 6))
    # 2 kWh IT in July at PUE 1: 2 x 200 = 400 g
    assert m.summarize(
        at(2026, 7, 1, tz="UTC"), at(2026, 7, 1, 1, tz="UTC"), 2 * KWH
    ).emissions_g == pytest.approx(400)


def test_zero_length_slice_and_backwards_slice():
    m = CostModel(COMMERCIAL)
    (p,) = m.price(at(2026, 5, 4, 9), at(2026, 5, 4, 9), 100.0)
    assert p.band == "peak" and p.it_joules == 100.0
    with pytest.raises(ValueError):
        m.price(10.0, 5.0, 1.0)


def test_parts_conserve_energy_over_a_week():
    m = CostModel(COMMERCIAL, PueConfig(by_month=PUE_BY_MONTH), CarbonConfig(grams_per_kwh=380))
    t0, t1 = at(2026, 3, 27, 13, 17), at(2026, 4, 3, 9, 2)
    parts = m.price(t0, t1, 123456789.0)
    assert parts[0].t0 == t0 and parts[-1].t1 == t1
    assert all(a.t1 == b.t0 for a, b in zip(parts, parts[1:]))
    assert math.fsum(p.it_joules for p in parts) == 123456789.0  # to the last bit


def test_parts_add_up_to_the_last_bit_over_random_slices():
    """Issue 16 item 5: the last part is the rest, solved so the parts' exact sum is the slice
    (before: "the rest" was total minus a rounded sum, and missed by an ulp in ~4 % of slices)."""
    import random

    m = CostModel(COMMERCIAL, PueConfig(by_month=PUE_BY_MONTH), CarbonConfig(grams_per_kwh=380))
    rng = random.Random(16)
    for _ in range(3000):
        t0 = at(2026, 3, 20) + rng.uniform(0, 20 * 86400)
        t1 = t0 + rng.choice([rng.uniform(0, 7200), rng.uniform(0, 4 * 86400)])
        joules = rng.choice([rng.uniform(0, 1e-3), rng.uniform(0, 1e4), rng.uniform(0, 1e8)])
        parts = m.price(t0, t1, joules)
        assert math.fsum(p.it_joules for p in parts) == joules
        assert all(p.it_joules >= 0 for p in parts)


@pytest.mark.parametrize(
    "util, threshold, idle",
    [
        (0.0, 0.05, True),
        (0.049, 0.05, True),
        (0.05, 0.05, False),  # strictly below: at the threshold it is busy
        (0.8, 0.05, False),
        (0.0, 0.0, False),  # threshold 0: never idle
        (0.99, 1.0, True),
    ],
)
def test_is_idle(util, threshold, idle):
    assert is_idle(util, IdleConfig(utilization_threshold=threshold)) is idle


def test_german_example_from_the_docs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "cost.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if "[pue]" in b)
    cfg = tomllib.loads(block)
    m = CostModel(
        TariffConfig.model_validate(cfg["tariff"]),
        PueConfig.model_validate(cfg["pue"]),
        CarbonConfig.model_validate(cfg["carbon"]),
    )
    # Tue 2026-05-05 10:00, 1 kWh IT: 1 x 1.4 = 1.4 kWh facility
    #   x 0.2850 = 0.3990 EUR (peak); x 380 = 532 g
    (p,) = m.price(at(2026, 5, 5, 10), at(2026, 5, 5, 11), KWH)
    assert p.band == "peak"
    assert p.cost == pytest.approx(0.399)
    assert p.emissions_g == pytest.approx(532.0)
    # Thu 2026-05-14 (Ascension) is a holiday priced like a Sunday:
    #   1.4 kWh x 0.1950 = 0.2730
    (p,) = m.price(at(2026, 5, 14, 10), at(2026, 5, 14, 11), KWH)
    assert (p.band, p.cost) == ("weekend", pytest.approx(0.273))
    # Amortisation of the node: 8 x 30000 / 43830 + 60000 / 43830 = 6.844627 EUR/h
    a = Amortization(HardwareConfig.model_validate(cfg["hardware"]))
    assert 8 * a.gpu_cost_per_hour(0) + a.node_cost_per_hour() == pytest.approx(6.844627, abs=1e-6)


def test_constant_over_is_the_one_part_price_gives_and_none_across_any_boundary():
    """The ledger prices a slice from constant_over when it holds: the same values as the single
    part of price(), and None wherever price() cuts the slice (band, month, midnight, DST)."""
    import random

    m = CostModel(COMMERCIAL, PueConfig(by_month=PUE_BY_MONTH), CarbonConfig(grams_per_kwh=380))
    rng = random.Random(7)
    # Half a second before: a band change, DST (no change of price), midnight and a month (PUE),
    # DST again, a band change.
    boundaries = [at(2026, 5, 4, 8), at(2026, 3, 29, 3), at(2026, 6, 1), at(2026, 10, 25, 2),
                  at(2026, 6, 5, 20)]
    cut = whole = 0
    for b in boundaries:
        t = b - 0.5
        for i in range(400):
            dt = 1.0 if i == 0 else rng.choice([0.0, 0.25, 1.0, 1.0, 1.0, 5.0])
            one = m.constant_over(t, t + dt)
            parts = m.price(t, t + dt, 1234.5)
            if one is None:
                assert i == 0 and dt > 0  # only the slice over the boundary
                cut += len(parts) > 1
            else:
                whole += 1
                (p,) = parts
                assert (p.price_per_kwh, p.band, p.pue, p.grams_per_kwh) == one[2:]
            t += dt
    assert cut == 3 and whole == 5 * 400 - 3  # band, midnight + month, band; a DST change alone: whole


def test_constant_over_without_tariff_or_carbon():
    m = CostModel(None, PueConfig(value=1.3), None)
    assert m.constant_over(100.0, 101.0)[2:] == (None, None, 1.3, None)
    assert m.constant_over(101.0, 100.0) is None
