"""Monthly peak demand: :class:`DemandTracker`.

Utilities bill demand as the highest average power over a fixed window
(usually 15 min) in a calendar month. Windows are aligned to the local clock
(:00, :15, :30, :45 for 15 min). A window's average power is its facility
energy divided by the full window length, so a partly measured window counts
the unmeasured time as zero, like a meter would.

Formulas: window power (W) = window energy (J) / (window_minutes x 60 s);
monthly peak (W) = max over the month's windows; demand charge (currency) =
peak / 1000 x ``demand_charge_per_kw_month``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from .. import statecheck
from .config import TariffConfig
from .timeutil import get_zone, wall_to_utc


class DemandTracker:
    """Tracks the running peak window-average facility power of the local month.

    Feed facility energy with :meth:`add` in roughly time order (several
    GPUs may feed the same window). The peak only grows within a month: a
    window's energy only grows, so its running average never overstates its
    final one. The peak resets when data (or :meth:`advance`) reaches a new
    local calendar month; energy for an earlier month arriving after that is
    ignored.
    """

    #: Windows kept open for late (out of order) feeds, e.g. one GPU a tick behind.
    KEEP_WINDOWS = 8

    def __init__(
        self,
        window_minutes: int = 15,
        tz: str | ZoneInfo = "UTC",
        price_per_kw_month: float | None = None,
    ) -> None:
        if window_minutes <= 0 or 60 % window_minutes:
            raise ValueError("window_minutes must divide 60")
        self.window_s = window_minutes * 60
        self.zone = tz if isinstance(tz, ZoneInfo) else get_zone(tz)
        self.price_per_kw_month = price_per_kw_month
        self.month: str | None = None  # "YYYY-MM", local
        self._month_span: tuple[float, float] = (math.inf, -math.inf)  # [start, end) unix s
        self.peak_w = 0.0
        self.peak_window_start: float | None = None
        self._windows: dict[float, float] = {}  # window start (unix s) -> facility J
        #: (from, to, offset): the zone's UTC offset is ``offset`` s for instants in [from, to).
        self._offset_known: tuple[float, float, float] = (math.inf, -math.inf, 0.0)

    @classmethod
    def from_tariff(cls, cfg: TariffConfig) -> DemandTracker:
        """A tracker with the tariff's window, zone and demand charge."""
        return cls(cfg.demand_window_minutes, cfg.timezone, cfg.demand_charge_per_kw_month)

    def window_start(self, t: float) -> float:
        """Start (unix s) of the local-clock-aligned window containing ``t``."""
        known = self._offset_known
        if known[0] <= t < known[1]:
            off = known[2]
        else:
            off = self._offset(t)
            ws = math.floor((t + off) / self.window_s) * self.window_s - off
            end = ws + self.window_s
            # The zone's offset, looked up once per window: it holds from the window's start to
            # just before its end (one zone changes its offset months apart, never twice in a window).
            if self._offset(ws) == off == self._offset(end - 1e-6):
                self._offset_known = (ws, end, off)
        return math.floor((t + off) / self.window_s) * self.window_s - off

    def _offset(self, t: float) -> float:
        """The zone's UTC offset at instant ``t``. Units: s."""
        offset = datetime.fromtimestamp(t, self.zone).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0

    def _set_month(self, month: str | None) -> None:
        self.month = month
        if month is None:
            self._month_span = (math.inf, -math.inf)
            return
        year, mon = int(month[:4]), int(month[5:7])
        nxt = (year + 1, 1) if mon == 12 else (year, mon + 1)
        self._month_span = (
            wall_to_utc(self.zone, datetime(year, mon, 1)),
            wall_to_utc(self.zone, datetime(*nxt, 1)),
        )

    def advance(self, t: float) -> None:
        """Move to the local month of ``t`` (resetting the peak) if it is a later one."""
        start, end = self._month_span
        if start <= t < end:
            return  # same month: the per-second path
        month = datetime.fromtimestamp(t, self.zone).strftime("%Y-%m")
        if self.month is None or month > self.month:
            self._set_month(month)
            self.peak_w = 0.0
            self.peak_window_start = None
            self._windows.clear()

    def add(self, t0: float, t1: float, facility_joules: float) -> None:
        """Add ``facility_joules`` (J) used uniformly over ``[t0, t1)`` (unix s)."""
        if t1 < t0:
            raise ValueError(f"slice ends before it starts: t0={t0} t1={t1}")
        span = t1 - t0
        cur = t0
        while True:
            ws = self.window_start(cur)
            end = min(ws + self.window_s, t1)
            e = facility_joules if span == 0 else facility_joules * (end - cur) / span
            self._add_window(ws, e)
            if end >= t1:
                break
            cur = end

    def _add_window(self, ws: float, joules: float) -> None:
        # Windows never span months: months start at local midnight, which is
        # on the window grid because the window divides an hour.
        self.advance(ws)
        if not self._month_span[0] <= ws < self._month_span[1]:
            return  # late energy for a month already closed
        total = self._windows.get(ws, 0.0) + joules
        self._windows[ws] = total
        power = total / self.window_s
        if power > self.peak_w:
            self.peak_w = power
            self.peak_window_start = ws
        if len(self._windows) > self.KEEP_WINDOWS:
            for old in sorted(self._windows)[: -self.KEEP_WINDOWS]:
                del self._windows[old]

    def window_power_w(self, t: float) -> float:
        """Average power (W) so far of the window containing ``t`` (0 if not kept)."""
        return self._windows.get(self.window_start(t), 0.0) / self.window_s

    @property
    def peak_kw(self) -> float:
        """Monthly peak window-average facility power. Units: kW."""
        return self.peak_w / 1000.0

    @property
    def demand_charge(self) -> float | None:
        """Demand charge of the month so far (currency), None without a price."""
        if self.price_per_kw_month is None:
            return None
        return self.peak_kw * self.price_per_kw_month

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot, for persisting across restarts."""
        return {
            "window_s": self.window_s,
            "month": self.month,
            "peak_w": self.peak_w,
            "peak_window_start": self.peak_window_start,
            "windows": [[ws, j] for ws, j in sorted(self._windows.items())],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`, all or nothing. A snapshot taken with another window length
        is ignored (its peak is not comparable), so the month restarts from zero. Raises
        ValueError naming the first bad value (``demand.peak_w: nan is not a finite number``);
        then the tracker is unchanged."""
        window_s = state.get("window_s")
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)):
            raise ValueError("demand.window_s: expected a number")
        if window_s != self.window_s:
            return
        month = state.get("month")
        if month is not None and not (isinstance(month, str) and _MONTH.fullmatch(month)):
            raise ValueError(f"demand.month: expected 'YYYY-MM' or null, got {month!r:.40}")
        peak_w = statecheck.number(state.get("peak_w", 0.0), "demand.peak_w", _MAX_PEAK_W)
        pws = state.get("peak_window_start")
        peak_start = None if pws is None else statecheck.number(pws, "demand.peak_window_start",
                                                                statecheck.MAX_TIMESTAMP)
        rows = state.get("windows", [])
        if not isinstance(rows, list):
            raise ValueError("demand.windows: expected a list")
        windows: dict[float, float] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != 2:
                raise ValueError(f"demand.windows[{i}]: expected [start, joules]")
            ws = statecheck.number(row[0], f"demand.windows[{i}][0]", statecheck.MAX_TIMESTAMP)
            windows[ws] = statecheck.number(row[1], f"demand.windows[{i}][1]", _MAX_PEAK_W * self.window_s)
        self._set_month(month)
        self.peak_w = peak_w
        self.peak_window_start = peak_start
        self._windows = windows


_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
#: Sanity bound of a persisted demand peak: 1 GW for one node. Units: W.
_MAX_PEAK_W = 1e9

