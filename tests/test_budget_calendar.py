"""The month the budget rules project is the tariff's month (issue 18).

The agent exports when the current day and month of ``gpucost_cost_to_date`` began and end
(``gpucost_period_start_timestamp_seconds`` / ``gpucost_period_end_timestamp_seconds``), so the
recording rules count the hours left on the tariff's calendar instead of PromQL's UTC one. This
module checks those bounds in zones west and east of UTC, a half-hour offset and DST months, and
that every period end and month to date written into
``deploy/prometheus/tests/budget-calendar.test.yml`` is what the agent computes for that zone and
instant, so the promtool test's hand values rest on the agent's own calendar.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fakes import FakeGpu, FakeSource, make_sampler
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.accounting import Ledger
from agent.cost import CostModel, PueConfig, TariffConfig
from agent.energy import EnergySlice
from agent.exporter import make_registry

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL_TEST = ROOT / "deploy" / "prometheus" / "tests" / "budget-calendar.test.yml"

#: The clusters of budget-calendar.test.yml and their tariffs' zones.
ZONES = {"utc": "UTC", "ny": "America/New_York", "ber": "Europe/Berlin", "tyo": "Asia/Tokyo", "kol": "Asia/Kolkata"}


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def ledger(zone: str, currency: str = "EUR", price: float = 1.0) -> Ledger:
    # price per kWh at PUE 1: 1 kWh (3.6 MJ) costs `price`.
    return Ledger(cost=CostModel(TariffConfig(currency=currency, timezone=zone, flat_price_per_kwh=price),
                                 PueConfig(value=1.0)), gpu_uuids={0: "GPU-a"})


def bounds_at(zone: str, t: float) -> dict[str, tuple[float, float]]:
    led = ledger(zone)
    led.roll_periods(t)
    return led.period_bounds()


@pytest.mark.parametrize(("zone", "at", "month", "hours"), [
    # the instant: 19:30 EST on 28 February, a month that ends at 05:00 UTC
    ("America/New_York", "2026-03-01T00:30:00", ("2026-02-01T05:00:00", "2026-03-01T05:00:00"), 672),
    # New York's March: EST at the start, EDT (from 8 March) at the end: 743 h
    ("America/New_York", "2026-03-15T12:00:00", ("2026-03-01T05:00:00", "2026-04-01T04:00:00"), 743),
    # and November, back to EST on the 1st: 721 h
    ("America/New_York", "2026-11-15T12:00:00", ("2026-11-01T04:00:00", "2026-12-01T05:00:00"), 721),
    # Berlin: March 743 h (CEST from the 29th), October 745 h
    ("Europe/Berlin", "2026-02-28T23:30:00", ("2026-02-28T23:00:00", "2026-03-31T22:00:00"), 743),
    ("Europe/Berlin", "2026-10-31T22:30:00", ("2026-09-30T22:00:00", "2026-10-31T23:00:00"), 745),
    ("Asia/Tokyo", "2026-02-28T15:00:00", ("2026-02-28T15:00:00", "2026-03-31T15:00:00"), 744),
    ("Asia/Tokyo", "2026-02-28T14:59:59", ("2026-01-31T15:00:00", "2026-02-28T15:00:00"), 672),
    ("Asia/Kolkata", "2026-02-28T18:30:00", ("2026-02-28T18:30:00", "2026-03-31T18:30:00"), 744),
    ("UTC", "2026-12-31T23:59:59", ("2026-12-01T00:00:00", "2027-01-01T00:00:00"), 744),
])
def test_month_bounds_are_the_tariffs_month(zone, at, month, hours):
    start, end = bounds_at(zone, utc(at))["month"]
    assert (start, end) == (utc(month[0]), utc(month[1]))
    assert (end - start) / 3600 == hours


def test_day_bounds_span_23_and_25_hours_on_dst_days():
    spring = bounds_at("Europe/Berlin", utc("2026-03-29T12:00:00"))["day"]
    autumn = bounds_at("Europe/Berlin", utc("2026-10-25T12:00:00"))["day"]
    assert spring == (utc("2026-03-28T23:00:00"), utc("2026-03-29T22:00:00"))
    assert (autumn[1] - autumn[0]) / 3600 == 25


def test_bounds_follow_the_periods_the_totals_are_in():
    """Until a tick rolls the month, the totals and the bounds both stay in the month that ended
    (the rule's hours left are then 0, clamped); the roll moves both."""
    led = ledger("America/New_York")
    led.roll_periods(utc("2026-03-01T04:59:00"))
    assert led.period_bounds()["month"][1] == utc("2026-03-01T05:00:00")
    led.roll_periods(utc("2026-03-01T05:00:00"))
    assert led.period_bounds()["month"] == (utc("2026-03-01T05:00:00"), utc("2026-04-01T04:00:00"))
    assert led.periods["month"] == "2026-03"
    assert ledger("UTC").period_bounds() == {}  # no period yet, no bounds


def test_no_tariff_counts_in_utc():
    led = Ledger()
    led.roll_periods(utc("2026-03-01T00:30:00"))
    assert led.period_bounds()["month"] == (utc("2026-03-01T00:00:00"), utc("2026-04-01T00:00:00"))


def test_the_agent_exports_the_bounds_as_gauges():
    from agent.config import Settings

    src = FakeSource([FakeGpu(lambda t: 300.0)], t0=utc("2026-02-28T23:59:00"))
    s = make_sampler(src)
    s.ledger.reconfigure(Settings(tariff=TariffConfig(currency="USD", timezone="America/New_York",
                                                      flat_price_per_kwh=0.2)))
    src.t += 5
    s.tick(final=True)
    text = generate_latest(make_registry(lambda: s.snapshot, process_metrics=False)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, want in (("gpucost_period_start_timestamp_seconds",
                        {"day": "2026-02-28T05:00:00", "month": "2026-02-01T05:00:00"}),
                       ("gpucost_period_end_timestamp_seconds",
                        {"day": "2026-03-01T05:00:00", "month": "2026-03-01T05:00:00"})):
        assert families[name].type == "gauge"
        assert {smp.labels["period"]: smp.value for smp in families[name].samples} == \
            {k: utc(v) for k, v in want.items()}, name


# -- the promtool test's series are the agent's ---------------------------------------------


def expand(values: str) -> list[float | None]:
    """promtool's series notation (``a+bxn``, ``axn``, ``_xn``, plain numbers) as a list."""
    out: list[float | None] = []
    for part in values.split():
        m = re.fullmatch(r"(_|[-+0-9.e]+?)(?:([+-][0-9.e]+))?(?:x(\d+))?", part)
        assert m, part
        start, step, n = m.group(1), float(m.group(2) or 0), int(m.group(3) or 0)
        for i in range(n + 1):
            out.append(None if start == "_" else float(start) + step * i)
    return out


def promtool_groups() -> list[tuple[float, dict[tuple[str, str], list[float | None]]]]:
    """(clock 0 as unix time, {(cluster, metric): values}) of each test group."""
    text = PROMTOOL_TEST.read_text()
    groups = []
    for chunk in re.split(r"# ---- test clock 0 = ", text)[1:]:
        origin = utc(re.match(r"(\S+?)Z", chunk).group(1))
        series = {}
        for metric, labels, values in re.findall(r"- series: '([a-z_:]+)\{([^}]*)\}'\s*\n\s*values: '([^']*)'", chunk):
            cluster = re.search(r'cluster="([^"]+)"', labels).group(1)
            series[(cluster, metric)] = expand(values)
        groups.append((origin, series))
    return groups


def test_the_promtool_calendar_test_holds_what_the_agent_computes():
    groups = promtool_groups()
    assert len(groups) == 3
    checked = set()
    for origin, series in groups:
        for cluster, zone in ZONES.items():
            ends = series.get((cluster, "gpucost_period_end_timestamp_seconds"))
            if ends is None:
                continue
            mtd = series[(cluster, "gpucost_cost_to_date")]
            counter = series[(cluster, "gpucost_energy_cost_total")]
            per_minute = counter[1] - counter[0]
            # The agent priced at 1 per kWh: per_minute of money is per_minute kWh in each minute.
            led = ledger(zone, price=1.0)
            for m in range(len(ends)):
                t = origin + 60 * m
                led.roll_periods(t)  # a tick: roll, then add the energy of the minute that ended
                if m:
                    led.add([EnergySlice(0, t - 60, t, per_minute * 3_600_000.0, "counter")])
                else:  # the same cost per hour since the month began
                    start = led.period_bounds()["month"][0]
                    led.add([EnergySlice(0, start, t, per_minute * (t - start) / 60 * 3_600_000.0, "counter")])
                assert led.period_bounds()["month"][1] - origin == ends[m], (cluster, m)
                assert led.period_cost[("month", "energy", "EUR")] == pytest.approx(mtd[m], abs=1e-6), (cluster, m)
            checked.add((zone, datetime.fromtimestamp(origin, timezone.utc).strftime("%Y-%m")))
    assert {z for z, _ in checked} == set(ZONES.values())
    assert ("Europe/Berlin", "2026-09") in checked and ("America/New_York", "2026-03") in checked
