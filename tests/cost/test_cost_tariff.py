"""Tariffs: worked examples computed by hand in the comments.

Reference tariff ("commercial", Europe/Berlin), used unless said otherwise:
    peak     0.34 /kWh  mon-fri 08:00-20:00
    offpeak  0.22 /kWh  mon-fri 20:00-08:00 (wraps within the day)
    weekend  0.19 /kWh  sat, sun all day
2026-05-04 is a Monday; 2026-05-08 a Friday; 2026-05-01 a Friday (holiday).
1 kWh = 3.6e6 J; 1 kW for 1 h = 3.6e6 J.
"""

from __future__ import annotations

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.cost import CostModel, Tariff, TariffConfig, tariff_table

BERLIN = "Europe/Berlin"
KWH = 3.6e6


def at(*args: int, tz: str = BERLIN) -> float:
    """Unix time of a local wall time (first occurrence if repeated)."""
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


def band(name, price, days, start, end):
    return {"name": name, "price_per_kwh": price, "days": days, "start": start, "end": end}


COMMERCIAL = [
    band("peak", 0.34, ["weekday"], "08:00", "20:00"),
    band("offpeak", 0.22, ["weekday"], "20:00", "08:00"),
    band("weekend", 0.19, ["weekend"], "00:00", "00:00"),
]


def commercial(**kw) -> TariffConfig:
    return TariffConfig(currency="EUR", timezone=BERLIN, bands=COMMERCIAL, **kw)


# Night/day every day, for DST days (which are Sundays).
NIGHT_DAY = [
    band("night", 0.20, ["weekday", "weekend"], "22:00", "06:00"),
    band("day", 0.30, ["weekday", "weekend"], "06:00", "22:00"),
]


def cost(cfg: TariffConfig, t0: float, t1: float, joules: float) -> float:
    return CostModel(cfg).summarize(t0, t1, joules).cost


def test_flat_tariff():
    cfg = TariffConfig(currency="USD", flat_price_per_kwh=0.30)
    # 1 kW for 1 h = 1 kWh -> 1 x 0.30 = 0.30
    assert cost(cfg, 0, 3600, 3.6e6) == pytest.approx(0.30)
    # 250 W for 90 min = 250 x 5400 = 1.35e6 J = 0.375 kWh -> 0.375 x 0.30 = 0.1125
    parts = CostModel(cfg).price(1000.0, 6400.0, 1.35e6)
    assert len(parts) == 1
    assert parts[0].band == "flat" and parts[0].price_per_kwh == 0.30
    assert parts[0].cost == pytest.approx(0.1125)
    # A flat tariff never cuts a slice, not even at midnight.
    assert Tariff(cfg).segments(0.0, 3 * 86400.0) == [(0.0, 3 * 86400.0, 0.30, "flat")]


def test_weekday_peak_offpeak_and_weekend_prices():
    t = Tariff(commercial())
    assert t.price_at(at(2026, 5, 4, 7, 59)) == (0.22, "offpeak")  # mon before 08:00
    assert t.price_at(at(2026, 5, 4, 8, 0)) == (0.34, "peak")  # start is inclusive
    assert t.price_at(at(2026, 5, 4, 19, 59)) == (0.34, "peak")
    assert t.price_at(at(2026, 5, 4, 20, 0)) == (0.22, "offpeak")  # end is exclusive
    assert t.price_at(at(2026, 5, 9, 12, 0)) == (0.19, "weekend")  # saturday
    # mon 10:00-12:00 at 3 kW = 6 kWh x 0.34 = 2.04
    assert cost(commercial(), at(2026, 5, 4, 10), at(2026, 5, 4, 12), 3000 * 7200) == pytest.approx(
        2.04
    )
    # sun 10:00-12:00 at 3 kW = 6 kWh x 0.19 = 1.14
    assert cost(
        commercial(), at(2026, 5, 10, 10), at(2026, 5, 10, 12), 3000 * 7200
    ) == pytest.approx(1.14)
    # A whole weekday at 1 kW: 12 h peak + 12 h offpeak
    #   = 12 x 0.34 + 12 x 0.22 = 4.08 + 2.64 = 6.72
    assert cost(commercial(), at(2026, 5, 5), at(2026, 5, 6), 1000 * 86400) == pytest.approx(6.72)
    # A whole week at 1 kW: 5 x 6.72 + 2 x 24 x 0.19 = 33.60 + 9.12 = 42.72
    assert cost(commercial(), at(2026, 5, 4), at(2026, 5, 11), 1000 * 7 * 86400) == pytest.approx(
        42.72
    )


def test_band_crossing_midnight():
    t = Tariff(commercial())
    # mon 23:00 -> tue 01:00 is offpeak on both days: one segment, not two.
    segs = t.segments(at(2026, 5, 4, 23), at(2026, 5, 5, 1))
    assert segs == [(at(2026, 5, 4, 23), at(2026, 5, 5, 1), 0.22, "offpeak")]
    # 2 kW for those 2 h = 4 kWh x 0.22 = 0.88
    assert cost(commercial(), at(2026, 5, 4, 23), at(2026, 5, 5, 1), 2000 * 7200) == pytest.approx(
        0.88
    )
    # fri 23:00 -> sat 01:00 at 1 kW: the calendar day decides,
    #   fri 23-24 offpeak 1 kWh x 0.22 + sat 00-01 weekend 1 kWh x 0.19 = 0.41
    parts = CostModel(commercial()).price(at(2026, 5, 8, 23), at(2026, 5, 9, 1), 1000 * 7200)
    assert [(p.band, p.it_joules) for p in parts] == [("offpeak", 3.6e6), ("weekend", 3.6e6)]
    assert sum(p.cost for p in parts) == pytest.approx(0.41)


def test_slice_straddling_a_boundary_is_split_proportionally():
    # mon 07:50-08:20 at 1.2 kW: 0.6 kWh = 2.16e6 J over 1800 s.
    #   07:50-08:00 is 600 s  -> 2.16e6 x 600/1800  = 0.72e6 J = 0.2 kWh x 0.22 = 0.044
    #   08:00-08:20 is 1200 s -> 2.16e6 x 1200/1800 = 1.44e6 J = 0.4 kWh x 0.34 = 0.136
    #   total 0.180
    parts = CostModel(commercial()).price(at(2026, 5, 4, 7, 50), at(2026, 5, 4, 8, 20), 2.16e6)
    assert [p.band for p in parts] == ["offpeak", "peak"]
    assert parts[0].t1 == parts[1].t0 == at(2026, 5, 4, 8)
    assert parts[0].it_joules == pytest.approx(0.72e6)
    assert parts[1].it_joules == pytest.approx(1.44e6)
    assert parts[0].cost == pytest.approx(0.044)
    assert parts[1].cost == pytest.approx(0.136)
    assert sum(p.it_joules for p in parts) == 2.16e6  # exactly: the last part takes the remainder


def test_dst_spring_forward_day_has_23_hours():
    cfg = TariffConfig(currency="EUR", timezone=BERLIN, bands=NIGHT_DAY)
    t0, t1 = at(2026, 3, 29), at(2026, 3, 30)
    assert t1 - t0 == 23 * 3600  # 02:00 CET jumps to 03:00 CEST
    # 1 kW all local day: 23 kWh.
    #   night 00:00-06:00 is 5 real hours (02:00-03:00 does not exist)
    #         + 22:00-24:00 2 h = 7 kWh x 0.20 = 1.40
    #   day   06:00-22:00 16 h = 16 kWh x 0.30 = 4.80
    #   total 6.20 (a naive 24 h day would give 8 x 0.20 + 16 x 0.30 = 6.40)
    s = CostModel(cfg).summarize(t0, t1, 1000 * (t1 - t0))
    assert s.facility_joules == pytest.approx(23 * KWH)
    assert s.by_band["night"].facility_joules == pytest.approx(7 * KWH)
    assert s.by_band["day"].facility_joules == pytest.approx(16 * KWH)
    assert s.cost == pytest.approx(6.20)
    # A slice across the jump, 01:30 CET -> 03:30 CEST: 2 h on the wall clock,
    # 1 h real. 1 kW for 3600 s = 1 kWh x 0.20 = 0.20.
    a, b = at(2026, 3, 29, 1, 30), at(2026, 3, 29, 3, 30)
    assert b - a == 3600
    assert cost(cfg, a, b, 1000 * (b - a)) == pytest.approx(0.20)
    # 01:00 CET -> 07:00 CEST is 5 h real at 1 kW (18e6 J):
    #   night until 06:00 CEST = 4 h x 0.20 = 0.80; day 06-07 = 1 h x 0.30 = 0.30; total 1.10
    a, b = at(2026, 3, 29, 1), at(2026, 3, 29, 7)
    parts = CostModel(cfg).price(a, b, 18e6)
    assert [(p.band, p.it_joules) for p in parts] == [("night", 4 * KWH), ("day", 1 * KWH)]
    assert sum(p.cost for p in parts) == pytest.approx(1.10)


def test_dst_fall_back_day_has_25_hours():
    cfg = TariffConfig(currency="EUR", timezone=BERLIN, bands=NIGHT_DAY)
    t0, t1 = at(2026, 10, 25), at(2026, 10, 26)
    assert t1 - t0 == 25 * 3600  # 03:00 CEST goes back to 02:00 CET
    # 1 kW all local day: 25 kWh.
    #   night 00:00-06:00 is 7 real hours + 22:00-24:00 2 h = 9 kWh x 0.20 = 1.80
    #   day   06:00-22:00 16 h x 0.30 = 4.80
    #   total 6.60
    s = CostModel(cfg).summarize(t0, t1, 1000 * (t1 - t0))
    assert s.facility_joules == pytest.approx(25 * KWH)
    assert s.by_band["night"].facility_joules == pytest.approx(9 * KWH)
    assert s.cost == pytest.approx(6.60)
    # 01:00 CEST -> 07:00 CET is 7 h real at 1 kW (25.2e6 J):
    #   night until 06:00 CET = 6 h x 0.20 = 1.20; day 1 h x 0.30 = 0.30; total 1.50
    a, b = at(2026, 10, 25, 1), at(2026, 10, 25, 7)
    assert b - a == 7 * 3600
    parts = CostModel(cfg).price(a, b, 25.2e6)
    assert [(p.band, p.it_joules) for p in parts] == [("night", 6 * KWH), ("day", 1 * KWH)]
    assert sum(p.cost for p in parts) == pytest.approx(1.50)
    # The weekend band of the commercial tariff covers the whole Sunday:
    #   25 kWh x 0.19 = 4.75
    assert cost(commercial(), t0, t1, 1000 * (t1 - t0)) == pytest.approx(4.75)


def test_band_boundaries_inside_the_changed_hour():
    # a 00:00-02:30, b 02:30-02:45, c 02:45-24:00, every day.
    cfg = TariffConfig(
        currency="EUR",
        timezone=BERLIN,
        bands=[
            band("a", 0.1, ["weekday", "weekend"], "00:00", "02:30"),
            band("b", 0.2, ["weekday", "weekend"], "02:30", "02:45"),
            band("c", 0.3, ["weekday", "weekend"], "02:45", "00:00"),
        ],
    )
    t = Tariff(cfg)
    # Spring: 02:00-03:00 does not exist, so b never applies and c starts at
    # the jump (01:00 UTC). a: 00:00-02:00 CET = 2 h; c: 03:00-24:00 CEST = 21 h.
    day0, day1 = at(2026, 3, 29), at(2026, 3, 30)
    segs = t.segments(day0, day1)
    jump = datetime(2026, 3, 29, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    assert [(s[3], s[1] - s[0]) for s in segs] == [("a", 2 * 3600), ("c", 21 * 3600)]
    assert segs[0][1] == jump
    # Autumn: each boundary applies when the clock first shows it (CEST);
    # the repeated 02:00-03:00 CET is then c. a 2.5 h, b 0.25 h, c 22.25 h = 25 h.
    day0, day1 = at(2026, 10, 25), at(2026, 10, 26)
    segs = t.segments(day0, day1)
    assert [(s[3], s[1] - s[0]) for s in segs] == [("a", 9000), ("b", 900), ("c", 80100)]
    # price_at agrees with segments in the repeated hour: 02:10 CET is c.
    second_0210 = datetime(2026, 10, 25, 2, 10, fold=1, tzinfo=ZoneInfo(BERLIN)).timestamp()
    assert t.price_at(second_0210) == (0.3, "c")
    assert t.price_at(at(2026, 10, 25, 2, 35)) == (0.2, "b")  # first 02:35 (CEST)


def test_holidays_priced_like_sunday():
    cfg = commercial(holidays=["2026-05-01"], holidays_priced_as="sun")
    # Fri 2026-05-01 at 1 kW for the day: weekend price all day, 24 x 0.19 = 4.56
    # (an ordinary Friday: 6.72, see above).
    assert cost(cfg, at(2026, 5, 1), at(2026, 5, 2), 1000 * 86400) == pytest.approx(4.56)
    assert cost(cfg, at(2026, 5, 8), at(2026, 5, 9), 1000 * 86400) == pytest.approx(6.72)
    # Thu 23:00 -> Fri (holiday) 01:00 at 1 kW: 1 kWh offpeak 0.22 + 1 kWh weekend 0.19 = 0.41
    parts = CostModel(cfg).price(at(2026, 4, 30, 23), at(2026, 5, 1, 1), 7.2e6)
    assert [p.band for p in parts] == ["offpeak", "weekend"]
    assert sum(p.cost for p in parts) == pytest.approx(0.41)


def test_holidays_as_their_own_day_type():
    cfg = TariffConfig(
        currency="EUR",
        timezone=BERLIN,
        holidays=["2026-05-01", "2026-12-25"],
        holidays_priced_as="holiday",
        bands=[*COMMERCIAL, band("holiday", 0.15, ["holiday"], "00:00", "00:00")],
    )
    t = Tariff(cfg)
    assert t.price_at(at(2026, 12, 25, 12)) == (0.15, "holiday")
    assert t.price_at(at(2026, 12, 24, 12)) == (0.34, "peak")
    # 1 kW all of 2026-05-01: 24 kWh x 0.15 = 3.60
    assert cost(cfg, at(2026, 5, 1), at(2026, 5, 2), 1000 * 86400) == pytest.approx(3.60)


def test_segments_tile_the_interval_and_match_price_at():
    t = Tariff(commercial(holidays=["2026-10-26"]))
    rng = random.Random(7)
    base = at(2026, 10, 20)
    for _ in range(300):
        t0 = base + rng.uniform(0, 14 * 86400)
        t1 = t0 + rng.choice([1, 5, 600, 3 * 3600, 2 * 86400]) * rng.random()
        segs = t.segments(t0, t1)
        assert segs[0][0] == t0 and segs[-1][1] == t1
        for (a0, a1, *_), (b0, *_) in zip(segs, segs[1:]):
            assert a1 == b0 and a0 < a1
        for s0, s1, price, name in segs:
            assert t.price_at(s0) == (price, name)
            assert t.price_at((s0 + s1) / 2) == (price, name)


def test_tariff_table_marks_mid_hour_changes_and_lists_holidays():
    cfg = TariffConfig(
        currency="EUR",
        timezone=BERLIN,
        holidays=["2026-12-25", "2026-01-01"],
        demand_charge_per_kw_month=10,
        bands=[
            band("peak", 0.34, ["weekday"], "07:30", "20:00"),
            band("offpeak", 0.22, ["weekday"], "20:00", "07:30"),
            band("weekend", 0.19, ["weekend"], "00:00", "00:00"),
        ],
    )
    text = tariff_table(Tariff(cfg))
    lines = text.splitlines()
    assert lines[0] == "tariff: prices in EUR/kWh, local time Europe/Berlin"
    assert lines[1].split() == ["hour", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    rows = {line[:2]: line.split()[1:] for line in lines[2:26]}
    assert rows["06"] == ["0.22"] * 5 + ["0.19"] * 2
    # 07:00 starts offpeak, peak from 07:30: shown 0.22 with '*'.
    assert rows["07"] == ["0.22*"] * 5 + ["0.19"] * 2
    assert rows["08"] == ["0.34"] * 5 + ["0.19"] * 2
    assert rows["20"] == ["0.22"] * 5 + ["0.19"] * 2
    assert "* the price changes within this hour" in text
    assert "  peak     0.34 EUR/kWh  weekday 07:30-20:00" in lines
    assert "holidays (priced like a sun): 2026-01-01, 2026-12-25" in lines
    assert "demand charge: 10.0 EUR per kW" in text


def test_tariff_table_flat_and_holiday_column():
    flat = TariffConfig(currency="USD", timezone="America/Chicago", flat_price_per_kwh=0.12)
    assert tariff_table(Tariff(flat)).splitlines() == [
        "tariff: prices in USD/kWh, local time America/Chicago",
        "flat: 0.12 USD/kWh at all times",
    ]
    cfg = TariffConfig(
        currency="EUR",
        holidays_priced_as="holiday",
        bands=[*COMMERCIAL, band("holiday", 0.155, ["holiday"], "00:00", "00:00")],
    )
    lines = tariff_table(Tariff(cfg)).splitlines()
    assert lines[1].split()[-1] == "holiday"
    # 3 decimals are needed for 0.155, so all prices get 3.
    assert lines[2].split() == ["00"] + ["0.220"] * 5 + ["0.190"] * 2 + ["0.155"]
