"""Config validation: every bad config gives a ValidationError whose one-line
rendering names the field, as the CLI prints it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.cost import (
    CarbonConfig,
    CloudPrice,
    HardwareConfig,
    IdleConfig,
    PlanningConfig,
    PueConfig,
    RunningCostItem,
    TariffConfig,
    format_validation_error,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cost.md"


class Settings(BaseModel):
    """The sections mounted the way the application mounts them."""

    model_config = ConfigDict(extra="forbid")

    tariff: TariffConfig | None = None
    pue: PueConfig = PueConfig()
    carbon: CarbonConfig = CarbonConfig()
    hardware: HardwareConfig = HardwareConfig()
    running_costs: list[RunningCostItem] = []
    cloud_prices: list[CloudPrice] = []
    planning: PlanningConfig = PlanningConfig()
    idle: IdleConfig = IdleConfig()


def error_line(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(data)
    return format_validation_error(info.value)


def band(name, price, days, start, end):
    return {"name": name, "price_per_kwh": price, "days": days, "start": start, "end": end}


# peak 08-20 weekdays, offpeak 20-08 weekdays, weekend all day: a complete week.
GOOD_BANDS = [
    band("peak", 0.34, ["weekday"], "08:00", "20:00"),
    band("offpeak", 0.22, ["weekday"], "20:00", "08:00"),
    band("weekend", 0.19, ["weekend"], "00:00", "00:00"),
]


def test_empty_config_is_valid_and_means_no_cost():
    s = Settings.model_validate({})
    assert s.tariff is None
    assert s.pue.value == 1.0
    assert not s.carbon.enabled
    assert s.hardware.gpu_price == 0.0
    assert s.idle.utilization_threshold == 0.05


def test_good_tariff_normalises_currency_and_accepts_toml_times():
    data = tomllib.loads(
        """
        [tariff]
        currency = "eur"
        timezone = "Europe/Berlin"
        holidays = [2026-12-25]
        [[tariff.bands]]
        name = "all"
        price_per_kwh = 0.3
        days = ["weekday", "weekend"]
        start = 00:00:00
        end = 00:00:00
        """
    )
    t = Settings.model_validate(data).tariff
    assert t.currency == "EUR"
    assert t.bands[0].start == "00:00"
    assert str(t.holidays[0]) == "2026-12-25"


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"tariff": {"currency": "EURO", "flat_price_per_kwh": 0.3}},
            "tariff.currency: 'EURO' is not an ISO 4217 currency code",
        ),
        (
            {"tariff": {"currency": "XXX1", "flat_price_per_kwh": 0.3}},
            "tariff.currency: 'XXX1' is not an ISO 4217 currency code",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": -0.1}},
            "tariff.flat_price_per_kwh: Input should be greater than or equal to 0",
        ),
        (
            {"tariff": {"currency": "EUR", "timezone": "Europe/Berlim", "flat_price_per_kwh": 0.3}},
            "tariff.timezone: unknown time zone 'Europe/Berlim'",
        ),
        (
            {"tariff": {"currency": "EUR"}},
            "tariff: set flat_price_per_kwh or bands",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": 0.3, "bands": GOOD_BANDS}},
            "tariff.bands: set either flat_price_per_kwh or bands, not both",
        ),
        (
            # bands[1] is "negative": the index in the message is the band's.
            {
                "tariff": {
                    "currency": "EUR",
                    "bands": [
                        GOOD_BANDS[0],
                        {**GOOD_BANDS[1], "price_per_kwh": -0.22},
                        GOOD_BANDS[2],
                    ],
                }
            },
            "tariff.bands[1].price_per_kwh: Input should be greater than or equal to 0",
        ),
        (
            # offpeak starts at 19:00: mon 19:00-20:00 is claimed by peak and offpeak.
            {
                "tariff": {
                    "currency": "EUR",
                    "bands": [GOOD_BANDS[0], {**GOOD_BANDS[1], "start": "19:00"}, GOOD_BANDS[2]],
                }
            },
            "tariff.bands[1]: overlaps bands[0] 'peak' on mon 19:00",
        ),
        (
            # offpeak ends at 07:00: nothing prices mon 07:00-08:00.
            {
                "tariff": {
                    "currency": "EUR",
                    "bands": [GOOD_BANDS[0], {**GOOD_BANDS[1], "end": "07:00"}, GOOD_BANDS[2]],
                }
            },
            "tariff.bands: no band covers mon 07:00-08:00",
        ),
        (
            # peak only on mon: tue 08:00-20:00 is the first gap.
            {
                "tariff": {
                    "currency": "EUR",
                    "bands": [{**GOOD_BANDS[0], "days": ["mon"]}, GOOD_BANDS[1], GOOD_BANDS[2]],
                }
            },
            "tariff.bands: no band covers tue 08:00-20:00",
        ),
        (
            {"tariff": {"currency": "EUR", "bands": [{**GOOD_BANDS[0], "start": "8:00"}]}},
            "tariff.bands[0].start: expected a time as 'HH:MM', got '8:00'",
        ),
        (
            {"tariff": {"currency": "EUR", "bands": [{**GOOD_BANDS[0], "end": "24:30"}]}},
            "tariff.bands[0].end: '24:30' is not a time of day",
        ),
        (
            {"tariff": {"currency": "EUR", "bands": [{**GOOD_BANDS[0], "days": ["monday"]}]}},
            "tariff.bands[0].days[0]: Input should be 'mon', 'tue'",
        ),
        (
            # 'holiday' bands need holidays_priced_as = "holiday".
            {
                "tariff": {
                    "currency": "EUR",
                    "bands": [*GOOD_BANDS, band("hol", 0.1, ["holiday"], "00:00", "00:00")],
                }
            },
            "tariff.bands[3].days: 'holiday' is only used with holidays_priced_as = 'holiday'",
        ),
        (
            # holidays as their own day type, but no band covers them.
            {"tariff": {"currency": "EUR", "holidays_priced_as": "holiday", "bands": GOOD_BANDS}},
            "tariff.bands: no band covers holiday 00:00-24:00",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": 0.3, "demand_window_minutes": 7}},
            "tariff.demand_window_minutes: must divide 60",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": 0.3, "price": 1}},
            "tariff.price: unknown setting",
        ),
        ({"pue": {"value": 0.9}}, "pue.value: Input should be greater than or equal to 1"),
        ({"pue": {"by_month": [1.2] * 11}}, "pue.by_month: List should have at least 12 items"),
        (
            {"pue": {"value": 1.3, "by_month": [1.2] * 12}},
            "pue.by_month: set only one of value, by_month, bands",
        ),
        (
            {"pue": {"bands": [{"start": "08:00", "end": "20:00", "value": 1.5}]}},
            "pue.bands: no band covers 00:00-08:00",
        ),
        (
            {
                "pue": {
                    "bands": [
                        {"start": "08:00", "end": "20:00", "value": 1.5},
                        {"start": "19:00", "end": "08:00", "value": 1.2},
                    ]
                }
            },
            "pue.bands[1]: overlaps bands[0] on 19:00",
        ),
        (
            {"carbon": {"grams_per_kwh": -1}},
            "carbon.grams_per_kwh: Input should be greater than or equal to 0",
        ),
        (
            {"carbon": {"timezone": "Nowhere/Land"}},
            "carbon.timezone: unknown time zone 'Nowhere/Land'",
        ),
        (
            {"hardware": {"gpu_lifetime_years": 0}},
            "hardware.gpu_lifetime_years: Input should be greater than or equal to 0.1",
        ),
        # Upper bounds: a typo must not poison totals.
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": 1e308}},
            "tariff.flat_price_per_kwh: Input should be less than or equal to 100000",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": float("inf")}},
            "tariff.flat_price_per_kwh: Input should be a finite number",
        ),
        (
            {"tariff": {"currency": "EUR", "bands": [{**GOOD_BANDS[0], "price_per_kwh": 3e5}, *GOOD_BANDS[1:]]}},
            "tariff.bands[0].price_per_kwh: Input should be less than or equal to 100000",
        ),
        (
            {"tariff": {"currency": "EUR", "flat_price_per_kwh": 0.3, "demand_charge_per_kw_month": 1e9}},
            "tariff.demand_charge_per_kw_month: Input should be less than or equal to 1000000",
        ),
        ({"pue": {"value": 14}}, "pue.value: Input should be less than or equal to 5"),
        ({"pue": {"by_month": [1.2] * 11 + [12]}}, "pue.by_month[11]: Input should be less than or equal to 5"),
        ({"carbon": {"grams_per_kwh": 38000}}, "carbon.grams_per_kwh: Input should be less than or equal to 2000"),
        ({"hardware": {"gpu_price": 1e15}}, "hardware.gpu_price: Input should be less than or equal to 1000000000000"),
        ({"hardware": {"node_lifetime_years": 500}}, "hardware.node_lifetime_years: Input should be less than or equal to 100"),
        (
            {"hardware": {"gpus": [{"index": 0, "price": 1, "lifetime_years": 1e-9}]}},
            "hardware.gpus[0].lifetime_years: Input should be greater than or equal to 0.1",
        ),
        (
            {"hardware": {"currency": "EURO"}},
            "hardware.currency: 'EURO' is not an ISO 4217 currency code",
        ),
        (
            {"hardware": {"gpus": [{"index": 0, "model": "H100", "price": 1}]}},
            "hardware.gpus[0].index: set exactly one of index or model",
        ),
        (
            {"idle": {"utilization_threshold": 1.5}},
            "idle.utilization_threshold: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_config_names_the_field(data, expected):
    line = error_line(data)
    assert line.startswith(expected), line
    assert "\n" not in line


def test_format_validation_error_prefix_and_count():
    # Validating a section on its own: the caller passes the table name.
    with pytest.raises(ValidationError) as info:
        TariffConfig.model_validate({"currency": "EURO", "flat_price_per_kwh": -1})
    line = format_validation_error(info.value, prefix="tariff")
    assert line == (
        "tariff.currency: 'EURO' is not an ISO 4217 currency code (e.g. EUR, USD, GBP)"
        " (and 1 more error)"
    )


def test_currency_set_has_real_codes_only():
    for code in (
        "EUR",
        "USD",
        "GBP",
        "CHF",
        "JPY",
        "CNY",
        "INR",
        "SEK",
        "NOK",
        "PLN",
        "BRL",
        "ZAR",
    ):
        assert TariffConfig(currency=code, flat_price_per_kwh=0.1).currency == code
    for code in ("EURO", "XXX", "XTS", "ABC", "US$", ""):
        with pytest.raises(ValidationError):
            TariffConfig(currency=code, flat_price_per_kwh=0.1)


def test_every_toml_example_in_the_docs_validates():
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        Settings.model_validate(tomllib.loads(block))
