"""Energy prices by local time: :class:`Tariff` and :func:`tariff_table`."""

from __future__ import annotations

import math
from datetime import date

from .config import DAY_KEY_NAMES, HOLIDAY_KEY, TariffConfig, grid_to_pieces
from .timeutil import MINUTES_PER_DAY, LocalDayTable, get_zone

FLAT_BAND = "flat"

# A tariff value: (price in currency per kWh, band name).
PriceBand = tuple[float, str]


class Tariff:
    """The price of facility energy at any instant, from a validated :class:`TariffConfig`.

    Band boundaries are local clock times in ``config.timezone``; they are
    converted to UTC instants per local day (cached), so DST days have 23 h or
    25 h of priced time and nothing is dropped or counted twice.
    Units: prices in currency per kWh; times in unix seconds.
    """

    def __init__(self, config: TariffConfig) -> None:
        self.config = config
        self.currency: str = config.currency
        self.timezone: str = config.timezone
        self.zone = get_zone(config.timezone)
        self.holidays: frozenset[date] = frozenset(config.holidays)
        self._holiday_key = config.holiday_key()
        self._flat: PriceBand | None = None
        # day key (0..6 mon..sun, 7 holiday) -> [(start_minute, (price, band))]
        self._pieces: dict[int, list[tuple[int, PriceBand]]] = {}
        if config.flat_price_per_kwh is not None:
            self._flat = (config.flat_price_per_kwh, FLAT_BAND)
            self._pieces = {k: [(0, self._flat)] for k in range(8)}
        else:
            assert config.bands is not None
            for key, row in config.band_grid().items():
                self._pieces[key] = [
                    (minute, (config.bands[i].price_per_kwh, config.bands[i].name))
                    for minute, i in grid_to_pieces(row)
                ]
        self._table: LocalDayTable[PriceBand] = LocalDayTable(self.zone, self._pieces_for_date)

    def day_key(self, d: date) -> int:
        """Which day's bands price local date ``d``: 0..6 (mon..sun) or 7 (holiday)."""
        return self._holiday_key if d in self.holidays else d.weekday()

    def _pieces_for_date(self, d: date) -> list[tuple[int, PriceBand]]:
        return self._pieces[self.day_key(d)]

    def price_at(self, t: float) -> PriceBand:
        """``(price_per_kwh, band_name)`` in force at instant ``t`` (unix s)."""
        if self._flat is not None:
            return self._flat
        return self._table.value_at(t)

    def piece(self, t: float) -> tuple[float, float, PriceBand]:
        """``(start, end, (price_per_kwh, band))``: a stretch around ``t`` of one price."""
        if self._flat is not None:
            return (-math.inf, math.inf, self._flat)
        return self._table.piece(t)

    def segments(self, t0: float, t1: float) -> list[tuple[float, float, float, str]]:
        """``[t0, t1)`` split at every band boundary: ``[(s0, s1, price_per_kwh, band)]``.

        The pieces are contiguous, in order, and cover ``[t0, t1)`` exactly.
        """
        if self._flat is not None:
            return [(t0, t1, *self._flat)]
        return [(s0, s1, v[0], v[1]) for s0, s1, v in self._table.segments(t0, t1)]

    def day_bands(self, key: int) -> list[tuple[int, int, float, str]]:
        """Bands of day key ``key`` in local minutes: ``[(start, end, price, band)]``."""
        pieces = self._pieces[key]
        out = []
        for i, (minute, (price, band)) in enumerate(pieces):
            end = pieces[i + 1][0] if i + 1 < len(pieces) else MINUTES_PER_DAY
            out.append((minute, end, price, band))
        return out


def _price_decimals(prices: list[float]) -> int:
    """Fewest decimals (2..6) that show every price exactly."""
    for decimals in range(2, 7):
        if all(abs(round(p, decimals) - p) < 1e-12 for p in prices):
            return decimals
    return 6


def tariff_table(tariff: Tariff) -> str:
    """A human-readable week of prices, for ``gpu-cost-agent check-config``.

    One row per local hour, one column per day (plus ``holiday`` when holidays
    are their own day type). Each cell is the price at the start of that
    hour; ``*`` marks an hour within which the price changes. Then the bands,
    the holidays and the demand charge, if any.
    """
    cfg = tariff.config
    unit = f"{tariff.currency}/kWh"
    lines = [f"tariff: prices in {unit}, local time {tariff.timezone}"]
    if cfg.flat_price_per_kwh is not None:
        lines.append(f"flat: {cfg.flat_price_per_kwh} {unit} at all times")
    else:
        keys = list(range(7)) + ([HOLIDAY_KEY] if cfg.holidays_priced_as == "holiday" else [])
        all_prices = [b.price_per_kwh for b in cfg.bands or []]
        decimals = _price_decimals(all_prices)
        width = max(len(f"{p:.{decimals}f}") for p in all_prices) + 1  # room for '*'
        width = max(width, len("holiday"))
        header = "hour  " + " ".join(f"{DAY_KEY_NAMES[k]:<{width}}" for k in keys)
        lines.append(header.rstrip())
        day_bands = {k: tariff.day_bands(k) for k in keys}
        marked = False
        for hour in range(24):
            a, b = hour * 60, hour * 60 + 60
            cells = []
            for k in keys:
                bands = day_bands[k]
                price = next(p for s, e, p, _ in bands if s <= a < e)
                changes = any(a < s < b for s, _, _, _ in bands)
                marked |= changes
                cells.append(f"{price:.{decimals}f}{'*' if changes else ''}".ljust(width))
            lines.append((f"{hour:02d}    " + " ".join(cells)).rstrip())
        if marked:
            lines.append("* the price changes within this hour; shown: the price at its start")
        lines.append("bands:")
        name_w = max(len(band.name) for band in cfg.bands or [])
        for band in cfg.bands or []:
            lines.append(
                f"  {band.name:<{name_w}}  {band.price_per_kwh:.{decimals}f} {unit}  "
                f"{','.join(band.days)} {band.start}-{band.end}"
            )
    if cfg.holidays:
        how = (
            "their own 'holiday' bands"
            if cfg.holidays_priced_as == "holiday"
            else f"like a {cfg.holidays_priced_as}"
        )
        lines.append(
            f"holidays (priced {how}): " + ", ".join(d.isoformat() for d in sorted(cfg.holidays))
        )
    if cfg.demand_charge_per_kw_month is not None:
        lines.append(
            f"demand charge: {cfg.demand_charge_per_kw_month} {tariff.currency} per kW of "
            f"the monthly peak {cfg.demand_window_minutes}-minute average facility power"
        )
    return "\n".join(lines)


__all__ = ["FLAT_BAND", "PriceBand", "Tariff", "tariff_table"]
