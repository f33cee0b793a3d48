"""The period a bill covers: a calendar month or a stretch, in the tariff's time zone.

A month runs from local midnight on the 1st to local midnight on the 1st of the next month,
so a month with a DST change has 743 or 745 hours (Europe/Berlin: March 2026 743, October
2026 745). ``--from``/``--to`` take a date (local midnight) or an ISO 8601 instant (with an
offset, or local time when it has none); ``--to`` is the end, not included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class PeriodError(ValueError):
    pass


@dataclass(frozen=True)
class Period:
    start: float  # unix seconds, included
    end: float  # unix seconds, not included
    timezone: str
    label: str  # "2026-10", or "2026-10-03..2026-10-10"

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def hours(self) -> float:
        return (self.end - self.start) / 3600.0

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def local(self, t: float) -> datetime:
        return datetime.fromtimestamp(t, self.zone())

    def utc_iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def days(self) -> list[tuple[str, float, float]]:
        """The local calendar days of the period: (YYYY-MM-DD, start, end), cut at its ends."""
        z = self.zone()
        out = []
        d = self.local(self.start).date()
        while True:
            a = max(self.start, _midnight(d, z))
            b = min(self.end, _midnight(d + timedelta(days=1), z))
            if a >= self.end:
                break
            if b > a:
                out.append((d.isoformat(), a, b))
            d += timedelta(days=1)
        return out


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(f"unknown time zone {name!r} (expected an IANA name like 'Europe/Berlin')") from None


def _midnight(d: date, z: ZoneInfo) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=z).timestamp()


def month(text: str, tz: str, *, now: float | None = None) -> Period:
    """``YYYY-MM``, or ``last`` / ``this`` (the month before / containing now, locally)."""
    z = zone(tz)
    if text in ("last", "this", "current", "previous"):
        today = datetime.fromtimestamp(now if now is not None else datetime.now().timestamp(), z).date()
        y, m = today.year, today.month
        if text in ("last", "previous"):
            y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    else:
        match = re.fullmatch(r"(\d{4})-(\d{2})", text)
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise PeriodError(f"--month: expected YYYY-MM (or 'last'), got {text!r}")
        y, m = int(match.group(1)), int(match.group(2))
    start = _midnight(date(y, m, 1), z)
    end = _midnight(date(y + (m == 12), m % 12 + 1, 1), z)
    return Period(start, end, tz, f"{y:04d}-{m:02d}")


def instant(text: str, tz: str, what: str) -> float:
    z = zone(tz)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return _midnight(date.fromisoformat(text), z)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PeriodError(f"{what}: expected a date (YYYY-MM-DD) or an ISO 8601 time, got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=z)
    return dt.timestamp()


def between(start: str, end: str, tz: str) -> Period:
    a, b = instant(start, tz, "--from"), instant(end, tz, "--to")
    if b <= a:
        raise PeriodError(f"--to ({end}) must be after --from ({start})")
    return Period(a, b, tz, f"{start}..{end}")
