"""Local-time helpers shared by tariffs, schedules and the demand tracker.

Everything in :mod:`agent.cost` works on UTC instants (unix seconds, float).
Local wall-clock rules ("peak is 08:00-20:00 on weekdays") are turned into
UTC instants once per local calendar day and cached, so a day with a DST
change simply has 23 h or 25 h of instants, and an energy slice is priced by
the seconds that really elapsed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from datetime import date, datetime, time, timedelta
from functools import cache
from typing import Generic, TypeVar
from zoneinfo import ZoneInfo

V = TypeVar("V", bound=Hashable)

MINUTES_PER_DAY = 1440


@cache
def get_zone(name: str) -> ZoneInfo:
    """The :class:`ZoneInfo` for an IANA name, built once per process."""
    return ZoneInfo(name)


def parse_hhmm(text: str, *, allow_24: bool = False) -> int:
    """``"HH:MM"`` to minutes after midnight (0..1439, or 1440 for ``"24:00"``).

    Raises ValueError with a message fit for a config error.
    """
    parts = text.split(":")
    if (
        len(parts) != 2
        or len(parts[0]) != 2
        or len(parts[1]) != 2
        or not (parts[0].isdigit() and parts[1].isdigit())
    ):
        raise ValueError(f"expected a time as 'HH:MM', got {text!r}")
    hours, minutes = int(parts[0]), int(parts[1])
    if allow_24 and hours == 24 and minutes == 0:
        return MINUTES_PER_DAY
    if hours > 23 or minutes > 59:
        raise ValueError(f"{text!r} is not a time of day (00:00..23:59)")
    return hours * 60 + minutes


def format_minute(minute: int) -> str:
    """Minutes after midnight to ``"HH:MM"`` (1440 renders as ``"24:00"``)."""
    return f"{minute // 60:02d}:{minute % 60:02d}"


def minute_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """The minute ranges ``[a, b)`` of one local day covered by ``start..end``.

    ``end <= start`` means the band runs over midnight: it covers
    ``start..24:00`` and ``00:00..end`` of the same calendar day, so
    ``00:00..00:00`` (or any ``start == end``) is the whole day.
    """
    if end > start:
        return [(start, end)]
    ranges = [(start, MINUTES_PER_DAY)]
    if end > 0:
        ranges.insert(0, (0, end))
    return ranges


def wall_to_utc(zone: ZoneInfo, wall: datetime) -> float:
    """The earliest UTC instant (unix s) at which the local clock reads >= ``wall``.

    ``wall`` is naive local time. This one rule handles both DST changes and
    keeps boundaries monotonic:

    * a repeated wall time (autumn fold) maps to its first occurrence;
    * a wall time that does not exist (spring gap, e.g. 02:30 in Berlin on
      the last Sunday of March) maps to the instant of the jump, when the
      clock first shows a later time.
    """
    candidates = []
    for fold in (0, 1):
        ts = wall.replace(tzinfo=zone, fold=fold).timestamp()
        if datetime.fromtimestamp(ts, zone).replace(tzinfo=None) == wall:
            candidates.append(ts)
    if candidates:
        return min(candidates)
    # In a gap the two folds give the instants just before and just after the
    # jump; bisect for the first whole second whose local time is >= wall
    # (tz transitions fall on whole seconds).
    a = wall.replace(tzinfo=zone, fold=0).timestamp()
    b = wall.replace(tzinfo=zone, fold=1).timestamp()
    lo, hi = math.floor(min(a, b)), math.ceil(max(a, b))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid
    return float(hi)


def local_date(zone: ZoneInfo, t: float) -> date:
    """The local calendar date at instant ``t`` (unix s)."""
    return datetime.fromtimestamp(t, zone).date()


class _Day(Generic[V]):
    """One local day as UTC pieces: ``starts[i] <= t < starts[i+1]`` has ``values[i]``."""

    __slots__ = ("starts", "values", "end")

    def __init__(self, starts: list[float], values: list[V], end: float) -> None:
        self.starts = starts
        self.values = values
        self.end = end


class LocalDayTable(Generic[V]):
    """A piecewise-constant function of time whose pieces are given per local day.

    ``pieces_for_date(d)`` returns ``[(start_minute, value), ...]`` sorted by
    minute, the first at minute 0; each value holds until the next start or
    the end of the day. The UTC boundaries of each day are computed once and
    cached, so lookups cost one ``fromtimestamp`` and a short scan.
    """

    _CACHE_DAYS = 512  # ~1.4 years of days; cleared wholesale when full

    def __init__(
        self, zone: ZoneInfo, pieces_for_date: Callable[[date], Sequence[tuple[int, V]]]
    ) -> None:
        self.zone = zone
        self._pieces_for_date = pieces_for_date
        self._days: dict[date, _Day[V]] = {}
        # The piece hit last: (start, end, value). price() is called once per
        # GPU per second and nearly always lands in the same piece.
        self._last: tuple[float, float, V] | None = None

    def _day(self, d: date) -> _Day[V]:
        day = self._days.get(d)
        if day is None:
            if len(self._days) >= self._CACHE_DAYS:
                self._days.clear()
            day = self._build_day(d)
            self._days[d] = day
        return day

    def _build_day(self, d: date) -> _Day[V]:
        midnight = datetime.combine(d, time())
        end = wall_to_utc(self.zone, midnight + timedelta(days=1))
        starts: list[float] = []
        values: list[V] = []
        for minute, value in self._pieces_for_date(d):
            s = wall_to_utc(self.zone, midnight + timedelta(minutes=minute))
            if starts and s <= starts[-1]:
                # The previous piece lies wholly in a DST gap: it never happens.
                starts.pop()
                values.pop()
            if values and values[-1] == value:
                continue  # same value continues: no boundary
            starts.append(s)
            values.append(value)
        while len(starts) > 1 and starts[-1] >= end:
            starts.pop()
            values.pop()
        return _Day(starts, values, end)

    def _locate(self, t: float) -> tuple[date, _Day[V]]:
        d = local_date(self.zone, t)
        day = self._day(d)
        # Only a fold across midnight can put t outside its date's span.
        while t < day.starts[0]:
            d -= timedelta(days=1)
            day = self._day(d)
        while t >= day.end:
            d += timedelta(days=1)
            day = self._day(d)
        return d, day

    def value_at(self, t: float) -> V:
        """The value in force at instant ``t`` (unix s)."""
        last = self._last
        if last is not None and last[0] <= t < last[1]:
            return last[2]
        _, day = self._locate(t)
        i = _index(day.starts, t)
        end = day.starts[i + 1] if i + 1 < len(day.starts) else day.end
        self._last = (day.starts[i], end, day.values[i])
        return day.values[i]

    def piece(self, t: float) -> tuple[float, float, V]:
        """``(start, end, value)`` of the piece of the day holding instant ``t`` (unix s)."""
        last = self._last
        if last is not None and last[0] <= t < last[1]:
            return last
        self.value_at(t)
        return self._last  # type: ignore[return-value]

    def segments(self, t0: float, t1: float) -> list[tuple[float, float, V]]:
        """``[t0, t1)`` cut where the value changes: ``[(s0, s1, value), ...]``.

        Adjacent pieces with equal values are merged, also across midnight.
        """
        last = self._last
        if last is not None and last[0] <= t0 and t1 <= last[1]:
            return [(t0, t1, last[2])]
        out: list[tuple[float, float, V]] = []
        d, day = self._locate(t0)
        cur = t0
        while cur < t1:
            i = _index(day.starts, cur)
            while i < len(day.starts) and cur < t1:
                end = day.starts[i + 1] if i + 1 < len(day.starts) else day.end
                value = day.values[i]
                s1 = min(end, t1)
                if out and out[-1][2] == value and out[-1][1] == cur:
                    out[-1] = (out[-1][0], s1, value)
                else:
                    out.append((cur, s1, value))
                self._last = (day.starts[i], end, value)
                cur = s1
                i += 1
            d += timedelta(days=1)
            day = self._day(d)
        return out


def _index(starts: list[float], t: float) -> int:
    """Index of the piece containing ``t``: a day has only a handful of pieces."""
    i = 0
    n = len(starts)
    while i + 1 < n and starts[i + 1] <= t:
        i += 1
    return i
