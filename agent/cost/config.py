"""Config sections for cost: ``[tariff]``, ``[pue]``, ``[carbon]``, ``[hardware]``, ``[idle]``.

Plain pydantic models (not settings): the application's Settings mounts them
as top-level TOML tables. Every check raises through pydantic, with ``loc``
pointing at the offending field (``bands[1].start``), so
:func:`format_validation_error` can print one line such as
``tariff.bands: no band covers tue 07:00-08:00``.

Times of day are ``"HH:MM"`` strings in the section's time zone. A band with
``end <= start`` runs over midnight within the *same calendar day*: on each
listed day it covers ``start..24:00`` and ``00:00..end``. So
``days = ["weekday"], start = "20:00", end = "08:00"`` is Mon-Fri 00:00-08:00
and 20:00-24:00, and Saturday 00:00-08:00 belongs to whatever band lists
Saturday. That keeps every day self-contained, which is how time-of-use
tariffs are written (the day type of the calendar day decides the price).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime, time
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .currencies import ISO_4217_CODES
from .timeutil import MINUTES_PER_DAY, format_minute, get_zone, minute_ranges, parse_hhmm

DAY_NAMES: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Day key used for holiday dates when ``holidays_priced_as = "holiday"``.
HOLIDAY_KEY = 7
DAY_KEY_NAMES: tuple[str, ...] = (*DAY_NAMES, "holiday")

DaySpec = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun", "weekday", "weekend", "holiday"]
HolidayPricing = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun", "holiday"]

_DAY_SPEC_KEYS: dict[str, tuple[int, ...]] = {
    **{name: (i,) for i, name in enumerate(DAY_NAMES)},
    "weekday": (0, 1, 2, 3, 4),
    "weekend": (5, 6),
    "holiday": (HOLIDAY_KEY,),
}

# Upper bounds where a typo (1e308, a price in cents) would poison totals for good. Each
# sits well above any real value: a kWh costs at most a few thousand units even in IDR or
# VND, and a GPU a few 1e10 in IRR.
#: Units: currency per kWh.
MAX_PRICE_PER_KWH = 100_000.0
#: Units: currency per kW of monthly peak.
MAX_DEMAND_CHARGE_PER_KW_MONTH = 1_000_000.0
#: Facility / IT energy; real data centres run 1.1-2.
MAX_PUE = 5.0
#: Units: g CO2e per kWh; the dirtiest grids (lignite) are near 1,200.
MAX_GRAMS_PER_KWH = 2_000.0
#: Units: currency per GPU or node.
MAX_HARDWARE_PRICE = 1e12
#: Units: years. Shorter is a rental, not an amortisation; longer is no depreciation.
MIN_LIFETIME_YEARS, MAX_LIFETIME_YEARS = 0.1, 100.0

PriceFloat = Annotated[float, Field(ge=0, le=MAX_PRICE_PER_KWH, allow_inf_nan=False)]
PueFloat = Annotated[float, Field(ge=1.0, le=MAX_PUE, allow_inf_nan=False)]
GramsFloat = Annotated[float, Field(ge=0, le=MAX_GRAMS_PER_KWH, allow_inf_nan=False)]
HardwarePrice = Annotated[float, Field(ge=0, le=MAX_HARDWARE_PRICE, allow_inf_nan=False)]
LifetimeYears = Annotated[float, Field(ge=MIN_LIFETIME_YEARS, le=MAX_LIFETIME_YEARS, allow_inf_nan=False)]


# --------------------------------------------------------------------------- helpers


def format_validation_error(exc: ValidationError, prefix: str = "", index: int = 0) -> str:
    """The first error of ``exc`` (or the one at ``index``) as one line: ``dotted.path[i].field: message``.

    ``prefix`` is prepended to the path (e.g. ``"tariff"`` when validating a
    section on its own). When there are more errors, says how many.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return f"{prefix}: invalid" if prefix else "invalid"
    err = errors[index]
    path = prefix
    for part in err.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown setting"
    elif err.get("type") == "missing":
        msg = "required setting is missing"
    # pydantic prefixes messages of ValueErrors raised in validators.
    for noise in ("Value error, ", "Assertion failed, "):
        if msg.startswith(noise):
            msg = msg[len(noise) :]
    line = f"{path}: {msg}" if path else msg
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return line


def field_error(title: str, loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError at ``loc`` (relative to the model being validated).

    Raised from a model validator, pydantic keeps ``loc`` and prefixes it with
    the path of the model in the enclosing config (e.g. ``tariff``).
    """
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("cost_config", message),
                loc=loc,
                input=value,
            )
        ],
    )


def _hhmm_field(value: Any) -> Any:
    """Accept TOML local times (``07:00:00``) as well as ``"07:00"`` strings."""
    if isinstance(value, time):
        if value.second or value.microsecond:
            raise ValueError("band times must be whole minutes")
        return f"{value.hour:02d}:{value.minute:02d}"
    return value


def _check_timezone(name: str) -> str:
    try:
        get_zone(name)
    except Exception:  # ZoneInfoNotFoundError (a KeyError), or ValueError for bad keys
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name like 'Europe/Berlin')"
        ) from None
    return name


def _check_currency(code: str) -> str:
    code = code.strip().upper()
    if code not in ISO_4217_CODES:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code (e.g. EUR, USD, GBP)")
    return code


def _layout(
    pieces: Sequence[tuple[int, frozenset[int], list[tuple[int, int]], str | None]],
    day_keys: tuple[int, ...],
    title: str,
    field: str,
    label: Callable[[int], str],
) -> list[list[int]]:
    """Check that bands tile every listed day exactly once; return the minute grid.

    ``pieces`` are ``(band_index, day_keys, minute_ranges, band_name)``. The grid maps
    ``grid[day_key][minute] -> band_index``. Overlaps are reported at the later
    band (``bands[i]``), gaps at ``bands``, both naming the day and time.
    ``label(day_key)`` names a day in messages ("tue", or "" for daily bands).
    """
    grid = {k: [-1] * MINUTES_PER_DAY for k in day_keys}
    names = {index: name for index, _, _, name in pieces}
    for index, keys, ranges, _ in pieces:
        for k in sorted(keys):
            row = grid[k]
            for a, b in ranges:
                taken = next((m for m in range(a, b) if row[m] != -1), None)
                if taken is not None:
                    where = f"{label(k)} {format_minute(taken)}".strip()
                    other = f"bands[{row[taken]}]"
                    if names[row[taken]]:
                        other += f" {names[row[taken]]!r}"
                    raise field_error(title, (field, index), f"overlaps {other} on {where}", None)
                row[a:b] = [index] * (b - a)
    for k in day_keys:
        row = grid[k]
        if -1 in row:
            a = row.index(-1)
            b = a
            while b < MINUTES_PER_DAY and row[b] == -1:
                b += 1
            where = f"{label(k)} {format_minute(a)}-{format_minute(b)}".strip()
            raise field_error(title, (field,), f"no band covers {where}", None)
    return [grid[k] for k in day_keys]


def grid_to_pieces(row: list[int]) -> list[tuple[int, int]]:
    """A minute grid row to ``[(start_minute, band_index), ...]`` where the band changes."""
    out: list[tuple[int, int]] = []
    for m, index in enumerate(row):
        if not out or out[-1][1] != index:
            out.append((m, index))
    return out


# --------------------------------------------------------------------------- tariff


class _HourBand(BaseModel):
    """Base of all bands: local clock times ``start`` (inclusive) to ``end`` (exclusive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str = Field(description="Local 'HH:MM', inclusive.")
    end: str = Field(
        description="Local 'HH:MM', exclusive; <= start runs over midnight; '24:00' ok."
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _accept_toml_time(cls, v: Any) -> Any:
        return _hhmm_field(v)

    @field_validator("start")
    @classmethod
    def _check_start(cls, v: str) -> str:
        parse_hhmm(v)
        return v

    @field_validator("end")
    @classmethod
    def _check_end(cls, v: str) -> str:
        parse_hhmm(v, allow_24=True)
        return v

    def minute_ranges(self) -> list[tuple[int, int]]:
        """Local minute ranges ``[a, b)`` covered on each day the band applies to."""
        return minute_ranges(parse_hhmm(self.start), parse_hhmm(self.end, allow_24=True))


class TouBand(_HourBand):
    """One time-of-use band: a price on some days between two local clock times."""

    name: str = Field(min_length=1, description="Label exported with the cost, e.g. 'peak'.")
    price_per_kwh: PriceFloat = Field(description="Units: currency per kWh (facility energy).")
    days: list[DaySpec] = Field(
        min_length=1,
        description="Calendar days: mon..sun, 'weekday' (mon-fri), 'weekend' (sat, sun), "
        "'holiday' (only with holidays_priced_as = 'holiday').",
    )

    def day_keys(self) -> frozenset[int]:
        """Day keys 0..6 (mon..sun) and 7 (holiday) this band applies to."""
        return frozenset(k for spec in self.days for k in _DAY_SPEC_KEYS[spec])


class TariffConfig(BaseModel):
    """``[tariff]``: what a kWh of facility energy costs, by local time.

    Either ``flat_price_per_kwh`` or ``bands`` (time-of-use). Bands must cover
    every minute of every day (and of holidays when priced as their own day
    type) exactly once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(description="ISO 4217 code, e.g. 'EUR'.")
    timezone: str = Field(default="UTC", description="IANA zone the band times are in.")
    flat_price_per_kwh: PriceFloat | None = Field(
        default=None, description="Units: currency per kWh."
    )
    bands: list[TouBand] | None = Field(default=None, min_length=1)
    holidays: list[date] = Field(
        default_factory=list, description="Local dates priced as holidays."
    )
    holidays_priced_as: HolidayPricing = Field(
        default="sun",
        description="A day name (holidays use that day's bands) or 'holiday' "
        "(bands listing 'holiday' apply).",
    )
    demand_charge_per_kw_month: float | None = Field(
        default=None,
        ge=0,
        le=MAX_DEMAND_CHARGE_PER_KW_MONTH,
        allow_inf_nan=False,
        description="Units: currency per kW of monthly peak window-average power.",
    )
    demand_window_minutes: int = Field(default=15, description="Averaging window; must divide 60.")

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        return _check_currency(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)

    @field_validator("demand_window_minutes")
    @classmethod
    def _check_window(cls, v: int) -> int:
        if v <= 0 or 60 % v:
            raise ValueError("must divide 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60)")
        return v

    @model_validator(mode="after")
    def _check_pricing(self) -> TariffConfig:
        title = type(self).__name__
        if self.flat_price_per_kwh is not None and self.bands is not None:
            raise field_error(title, ("bands",), "set either flat_price_per_kwh or bands, not both", None)
        if self.flat_price_per_kwh is None and self.bands is None:
            raise field_error(title, (), "set flat_price_per_kwh or bands", None)
        if self.bands is not None:
            if self.holidays_priced_as != "holiday":
                for i, band in enumerate(self.bands):
                    if "holiday" in band.days:
                        raise field_error(
                            title,
                            ("bands", i, "days"),
                            "'holiday' is only used with holidays_priced_as = 'holiday' "
                            f"(now {self.holidays_priced_as!r})",
                            band.days,
                        )
            self.band_grid()  # raises on overlap or gap
        return self

    def day_keys(self) -> tuple[int, ...]:
        """Day keys the bands must cover: mon..sun, plus holiday when it is its own type."""
        return tuple(range(8)) if self.holidays_priced_as == "holiday" else tuple(range(7))

    def band_grid(self) -> dict[int, list[int]]:
        """``{day_key: [band_index per minute]}`` for the configured bands."""
        assert self.bands is not None
        keys = self.day_keys()
        pieces = [(i, b.day_keys(), b.minute_ranges(), b.name) for i, b in enumerate(self.bands)]
        rows = _layout(pieces, keys, type(self).__name__, "bands", lambda k: DAY_KEY_NAMES[k])
        return dict(zip(keys, rows))

    def holiday_key(self) -> int:
        """Day key used to price holiday dates."""
        if self.holidays_priced_as == "holiday":
            return HOLIDAY_KEY
        return DAY_NAMES.index(self.holidays_priced_as)

    def holidays_warning(self, now: float) -> str | None:
        """One line when holidays are listed for a time-of-use tariff but none of the year after
        ``now``'s (in the tariff's zone): after the last one, holidays are priced as ordinary
        days. None otherwise (no list, a flat price, or the coming year covered)."""
        if not self.holidays or self.bands is None:
            return None
        today = datetime.fromtimestamp(now, get_zone(self.timezone)).date()
        last = max(self.holidays)
        if last.year > today.year:
            return None
        return (f"tariff.holidays: the last listed holiday is {last.isoformat()}, none of {today.year + 1} is "
                f"listed: holidays after {last.isoformat()} are priced as ordinary days; add the coming year's")


# --------------------------------------------------------------------------- schedules


class PueBand(_HourBand):
    """PUE between two local clock times, every day."""

    value: PueFloat = Field(description="Facility energy / IT energy, >= 1.")


class CarbonBand(_HourBand):
    """Grid carbon intensity between two local clock times, every day."""

    grams_per_kwh: GramsFloat = Field(description="Units: g CO2e per kWh.")


def _hour_band_grid(bands: list[Any], title: str) -> list[int]:
    pieces = [(i, frozenset((0,)), b.minute_ranges(), None) for i, b in enumerate(bands)]
    return _layout(pieces, (0,), title, "bands", lambda k: "")[0]


def _check_one_of(model: BaseModel, title: str, names: tuple[str, ...]) -> None:
    given = [n for n in names if n in model.model_fields_set and getattr(model, n) is not None]
    if len(given) > 1:
        raise field_error(title, (given[1],), f"set only one of {', '.join(names)}", None)


class _ScheduleConfig(BaseModel):
    """What ``[pue]`` and ``[carbon]`` share: one of a constant, ``by_month`` or
    ``bands``, resolved in ``timezone`` (default: the tariff's, else UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Name of the constant field of the subclass.
    _constant: ClassVar[str]

    timezone: str | None = Field(
        default=None, description="IANA zone; default: the tariff's, else UTC."
    )

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return None if v is None else _check_timezone(v)

    @model_validator(mode="after")
    def _check(self) -> Self:
        _check_one_of(self, type(self).__name__, (self._constant, "by_month", "bands"))
        bands = getattr(self, "bands")
        if bands is not None:
            _hour_band_grid(bands, type(self).__name__)
        return self


class PueConfig(_ScheduleConfig):
    """``[pue]``: facility energy = IT energy x PUE. Default: PUE 1.0 (IT energy only).

    One of ``value`` (constant), ``by_month`` (12 values, jan..dec) or
    ``bands`` (local clock-time bands covering the whole day).
    """

    _constant: ClassVar[str] = "value"

    value: PueFloat = 1.0
    by_month: list[PueFloat] | None = Field(default=None, min_length=12, max_length=12)
    bands: list[PueBand] | None = Field(default=None, min_length=1)

    def average(self) -> float:
        """PUE averaged over a year: the constant; the months weighted by their days; the
        bands by their minutes of the day."""
        if self.by_month is not None:
            days = (31, 28.25, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
            return sum(v * d for v, d in zip(self.by_month, days)) / 365.25
        if self.bands is not None:
            grid = _hour_band_grid(self.bands, type(self).__name__)
            return sum(self.bands[i].value for i in grid) / len(grid)
        return self.value


class CarbonConfig(_ScheduleConfig):
    """``[carbon]``: grid carbon intensity. Nothing set: no emissions are exported.

    One of ``grams_per_kwh`` (constant), ``by_month`` or ``bands``.
    """

    _constant: ClassVar[str] = "grams_per_kwh"

    grams_per_kwh: GramsFloat | None = Field(default=None, description="Units: g CO2e per kWh.")
    by_month: list[GramsFloat] | None = Field(default=None, min_length=12, max_length=12)
    bands: list[CarbonBand] | None = Field(default=None, min_length=1)

    @property
    def enabled(self) -> bool:
        """Whether any intensity is configured (else emissions are not computed)."""
        return self.grams_per_kwh is not None or self.by_month is not None or self.bands is not None


# --------------------------------------------------------------------------- hardware, idle


class GpuPriceOverride(BaseModel):
    """``[[hardware.gpus]]``: a purchase price for some GPUs, by index or model name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int | None = Field(default=None, ge=0, description="GPU index as the driver numbers it.")
    model: str | None = Field(
        default=None,
        min_length=1,
        description="Case-insensitive substring of the GPU name, e.g. 'H100' "
        "matches 'NVIDIA H100 80GB HBM3'.",
    )
    price: HardwarePrice = Field(description="Units: currency per GPU.")
    lifetime_years: LifetimeYears | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> GpuPriceOverride:
        if (self.index is None) == (self.model is None):
            raise field_error(type(self).__name__, ("index",), "set exactly one of index or model", None)
        return self

    def matches(self, gpu_index: int, gpu_name: str | None) -> bool:
        return gpu_selected(self.index, self.model, gpu_index, gpu_name)


def gpu_selected(index: int | None, model: str | None, gpu_index: int, gpu_name: str | None) -> bool:
    """Whether a per-GPU entry that names ``index`` or (a substring of the name) ``model``
    selects the GPU ``gpu_index`` called ``gpu_name``."""
    if index is not None:
        return index == gpu_index
    return gpu_name is not None and model is not None and model.casefold() in gpu_name.casefold()


class HardwareConfig(BaseModel):
    """``[hardware]``: straight-line amortisation of purchase prices over a lifetime.

    Default: prices 0, i.e. no amortisation cost. ``currency`` defaults to the
    tariff's; the prices are taken as they are (no conversion).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str | None = None
    gpu_price: HardwarePrice = Field(default=0.0, description="Units: currency per GPU.")
    gpu_lifetime_years: LifetimeYears = 5.0
    node_price: HardwarePrice = Field(
        default=0.0,
        description="Units: currency for the host without its GPUs (chassis, CPUs, network).",
    )
    node_lifetime_years: LifetimeYears = 5.0
    gpus: list[GpuPriceOverride] = Field(
        default_factory=list, description="Per-GPU prices; the first entry that matches wins."
    )

    @field_validator("currency")
    @classmethod
    def _cur(cls, v: str | None) -> str | None:
        return None if v is None else _check_currency(v)


class IdleConfig(BaseModel):
    """``[idle]``: when a GPU counts as idle (its energy is then 'idle' energy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    utilization_threshold: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Ratio 0..1; idle means utilization strictly below it.",
    )


# --------------------------------------------------------------------------- running costs, cloud prices

#: Units: currency per period of one running-cost item; above it is a typo, not a contract.
MAX_RUNNING_AMOUNT = 1e12
#: Units: currency per GPU-hour; the dearest cloud GPU rents for a few hundred.
MAX_CLOUD_PRICE_PER_HOUR = 1e6

RunningAmount = Annotated[float, Field(ge=0, le=MAX_RUNNING_AMOUNT, allow_inf_nan=False)]
RunningPeriod = Literal["hour", "day", "month", "year"]
RunningScope = Literal["node", "gpu"]
#: Item names become the ``item`` label: short, printable, no quotes or braces to escape.
ItemName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/ -]+$")]


class RunningOverride(BaseModel):
    """``[[running_costs.gpus]]``: another amount of a per-GPU item for some GPUs, by index or model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int | None = Field(default=None, ge=0, description="GPU index as the driver numbers it.")
    model: str | None = Field(default=None, min_length=1, description="Case-insensitive substring of the GPU name.")
    amount: RunningAmount = Field(description="Units: currency per period, per GPU.")

    @model_validator(mode="after")
    def _one_selector(self) -> RunningOverride:
        if (self.index is None) == (self.model is None):
            raise field_error(type(self).__name__, ("index",), "set exactly one of index or model", None)
        return self

    def matches(self, gpu_index: int, gpu_name: str | None) -> bool:
        return gpu_selected(self.index, self.model, gpu_index, gpu_name)


class RunningCostItem(BaseModel):
    """``[[running_costs]]``: a recurring cost that is neither energy nor purchase price
    (colocation, network, support, licences, a share of staff). It accrues per second of
    elapsed time, busy or idle, like amortisation.

    ``amount`` per ``period``: an hour is 3,600 s, a day 86,400 s, a year 365.25 days and a
    month a twelfth of that (30.44 days), so twelve monthly amounts make the yearly one.
    ``scope = "node"``: one amount for the node; ``"gpu"``: the amount for each GPU, or the
    first matching ``[[running_costs.gpus]]`` entry's. ``currency`` defaults to the
    hardware's (then the tariff's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ItemName = Field(description="Exported as the item label, e.g. 'colocation'.")
    amount: RunningAmount = Field(description="Units: currency per period.")
    period: RunningPeriod = "month"
    scope: RunningScope = "node"
    currency: str | None = None
    gpus: list[RunningOverride] = Field(default_factory=list, description="Per-GPU amounts (scope gpu only).")

    @field_validator("currency")
    @classmethod
    def _cur(cls, v: str | None) -> str | None:
        return None if v is None else _check_currency(v)

    @model_validator(mode="after")
    def _gpus_need_gpu_scope(self) -> RunningCostItem:
        if self.gpus and self.scope != "gpu":
            raise field_error(type(self).__name__, ("gpus",), 'per-GPU amounts need scope = "gpu"', None)
        return self


class CloudPrice(BaseModel):
    """``[[cloud_prices]]``: what renting one GPU of a model costs in a cloud, per GPU-hour.

    Configured, never fetched. ``model`` is a case-insensitive substring of the GPU name
    (``"H100"`` matches ``"NVIDIA H100 80GB HBM3"``); the first entry per (model, offering,
    provider) that matches a GPU is its price.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=64, description="Substring of the GPU name, e.g. 'H100'.")
    price_per_gpu_hour: float = Field(gt=0, le=MAX_CLOUD_PRICE_PER_HOUR, allow_inf_nan=False)
    currency: str
    offering: ItemName = Field(default="on-demand", description="e.g. on-demand, reserved-1y, spot.")
    provider: ItemName = Field(default="cloud", description="e.g. aws-p5, gcp-a3, a neocloud's name.")

    @field_validator("currency")
    @classmethod
    def _cur(cls, v: str) -> str:
        return _check_currency(v)

    def matches(self, gpu_name: str | None) -> bool:
        return gpu_name is not None and self.model.casefold() in gpu_name.casefold()


class PlanningConfig(BaseModel):
    """``[planning]``: what ``check-config`` assumes to print the fully loaded cost of one
    GPU-hour before anything is deployed. The running agent measures instead; nothing here
    changes a total. Defaults: an H100 SXM as recorded in the project's reference readings
    (70 W with no CUDA context, 700 W at its power cap), eight to a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus_per_node: int = Field(default=8, ge=1, le=1024)
    gpu_idle_watts: float = Field(default=70.0, ge=0, le=10_000, allow_inf_nan=False)
    gpu_full_watts: float = Field(default=700.0, ge=0, le=10_000, allow_inf_nan=False)
    host_watts: float = Field(
        default=0.0, ge=0, le=100_000, allow_inf_nan=False,
        description="The host without its GPUs (CPUs, memory, fans), shared by the node's GPUs.",
    )

    @model_validator(mode="after")
    def _order(self) -> PlanningConfig:
        if self.gpu_full_watts < self.gpu_idle_watts:
            raise field_error(type(self).__name__, ("gpu_full_watts",), "must be at least gpu_idle_watts", None)
        return self
