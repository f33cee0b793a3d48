"""Time-varying factors: PUE and carbon intensity (:class:`Schedule`)."""

from __future__ import annotations

import math
from typing import Any

from .config import CarbonConfig, PueConfig, grid_to_pieces
from .timeutil import MINUTES_PER_DAY, LocalDayTable, get_zone, minute_ranges, parse_hhmm


class Schedule:
    """A number that depends on local time: constant, by month, or by clock-time bands.

    Units are the caller's (PUE: ratio; carbon: g CO2e per kWh). Month and band
    boundaries are local times in ``timezone``, converted to UTC instants per
    day like tariff bands.
    """

    def __init__(
        self,
        *,
        constant: float | None = None,
        by_month: list[float] | None = None,
        bands: list[tuple[int, int, float]] | None = None,
        timezone: str = "UTC",
    ) -> None:
        """Exactly one of ``constant``, ``by_month`` (12 values, jan..dec) or
        ``bands`` (``(start_minute, end_minute, value)`` tiling the day, already
        validated; ``end <= start`` runs over midnight)."""
        if sum(x is not None for x in (constant, by_month, bands)) != 1:
            raise ValueError("give exactly one of constant, by_month, bands")
        self.timezone = timezone
        self.constant = constant
        self._table: LocalDayTable[float] | None = None
        if by_month is not None:
            months = [float(v) for v in by_month]
            if len(months) != 12:
                raise ValueError("by_month needs 12 values")
            self._table = LocalDayTable(get_zone(timezone), lambda d: [(0, months[d.month - 1])])
        elif bands is not None:
            row = [-1] * MINUTES_PER_DAY
            for i, (start, end, _) in enumerate(bands):
                for a, b in minute_ranges(start, end):
                    row[a:b] = [i] * (b - a)
            if -1 in row:
                raise ValueError("bands must cover the whole day")
            pieces = [(minute, float(bands[i][2])) for minute, i in grid_to_pieces(row)]
            self._table = LocalDayTable(get_zone(timezone), lambda d: pieces)

    @classmethod
    def from_pue(cls, cfg: PueConfig, default_timezone: str = "UTC") -> Schedule:
        """PUE schedule from ``[pue]``; zone: ``pue.timezone`` or ``default_timezone``."""
        tz = cfg.timezone or default_timezone
        if cfg.by_month is not None:
            return cls(by_month=list(cfg.by_month), timezone=tz)
        if cfg.bands is not None:
            return cls(bands=_band_tuples(cfg.bands, "value"), timezone=tz)
        return cls(constant=cfg.value, timezone=tz)

    @classmethod
    def from_carbon(cls, cfg: CarbonConfig, default_timezone: str = "UTC") -> Schedule | None:
        """Carbon intensity schedule from ``[carbon]``, or None when none is configured."""
        tz = cfg.timezone or default_timezone
        if cfg.by_month is not None:
            return cls(by_month=list(cfg.by_month), timezone=tz)
        if cfg.bands is not None:
            return cls(bands=_band_tuples(cfg.bands, "grams_per_kwh"), timezone=tz)
        if cfg.grams_per_kwh is not None:
            return cls(constant=cfg.grams_per_kwh, timezone=tz)
        return None

    def value_at(self, t: float) -> float:
        """The value in force at instant ``t`` (unix s)."""
        if self._table is None:
            return self.constant  # type: ignore[return-value]
        return self._table.value_at(t)

    def piece(self, t: float) -> tuple[float, float, float]:
        """``(start, end, value)``: a stretch around ``t`` of one value."""
        if self._table is None:
            return (-math.inf, math.inf, self.constant)  # type: ignore[return-value]
        return self._table.piece(t)

    def segments(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        """``[t0, t1)`` split where the value changes: ``[(s0, s1, value)]``."""
        if self._table is None:
            return [(t0, t1, self.constant)]  # type: ignore[list-item]
        return self._table.segments(t0, t1)


def _band_tuples(bands: list[Any], attr: str) -> list[tuple[int, int, float]]:
    return [
        (parse_hhmm(b.start), parse_hhmm(b.end, allow_24=True), float(getattr(b, attr)))
        for b in bands
    ]
