"""Energy to money and emissions: :class:`CostModel`, :class:`PricedPart`, :func:`summarize`.

Formulas (per part; 1 kWh = 3.6e6 J):

* ``it_joules``       = slice energy x (part seconds / slice seconds)
* ``facility_joules`` = ``it_joules`` x PUE
* ``cost``            = ``facility_joules`` / 3.6e6 x price per kWh
* ``emissions_g``     = ``facility_joules`` / 3.6e6 x g CO2e per kWh
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..exact import settle
from .config import CarbonConfig, IdleConfig, PueConfig, TariffConfig
from .schedule import Schedule
from .tariff import Tariff

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class PricedPart:
    """A piece of an energy slice over which price, PUE and carbon intensity are constant.

    Units: ``t0``/``t1`` unix s; ``*_joules`` J; ``price_per_kwh`` currency per
    kWh; ``cost`` currency; ``emissions_g`` g CO2e; ``grams_per_kwh`` g CO2e
    per kWh. ``price_per_kwh``, ``band`` and ``cost`` are None without a
    tariff; ``emissions_g`` and ``grams_per_kwh`` are None without carbon.
    """

    t0: float
    t1: float
    it_joules: float
    facility_joules: float
    price_per_kwh: float | None
    band: str | None
    cost: float | None
    emissions_g: float | None
    pue: float = 1.0
    grams_per_kwh: float | None = None


@dataclass(frozen=True, slots=True)
class BandTotal:
    """Totals of the parts priced in one band. Units: J, currency."""

    facility_joules: float
    cost: float


@dataclass(frozen=True, slots=True)
class CostSummary:
    """Totals over parts. Units: J, currency, g CO2e. ``cost``/``emissions_g``
    are None when no part had them (no tariff / no carbon)."""

    it_joules: float
    facility_joules: float
    cost: float | None
    emissions_g: float | None
    by_band: dict[str, BandTotal] = field(default_factory=dict)


def summarize(parts: list[PricedPart]) -> CostSummary:
    """Add up priced parts (e.g. the result of :meth:`CostModel.price`)."""
    it = fac = 0.0
    cost: float | None = None
    em: float | None = None
    bands: dict[str, tuple[float, float]] = {}
    for p in parts:
        it += p.it_joules
        fac += p.facility_joules
        if p.cost is not None:
            cost = (cost or 0.0) + p.cost
            j, c = bands.get(p.band or "", (0.0, 0.0))
            bands[p.band or ""] = (j + p.facility_joules, c + p.cost)
        if p.emissions_g is not None:
            em = (em or 0.0) + p.emissions_g
    return CostSummary(
        it_joules=it,
        facility_joules=fac,
        cost=cost,
        emissions_g=em,
        by_band={b: BandTotal(j, c) for b, (j, c) in bands.items()},
    )


class CostModel:
    """Prices IT energy slices: splits them at tariff, PUE and carbon boundaries.

    ``tariff`` None: no cost (``cost``/``price_per_kwh``/``band`` None).
    ``carbon`` None or with nothing set: no emissions. PUE and carbon
    schedules use their own ``timezone``, else the tariff's, else UTC.
    """

    def __init__(
        self,
        tariff: TariffConfig | None,
        pue: PueConfig | None = None,
        carbon: CarbonConfig | None = None,
    ) -> None:
        self.tariff: Tariff | None = Tariff(tariff) if tariff is not None else None
        default_tz = tariff.timezone if tariff is not None else "UTC"
        self.pue: Schedule = Schedule.from_pue(pue or PueConfig(), default_tz)
        self.carbon: Schedule | None = (
            Schedule.from_carbon(carbon, default_tz) if carbon is not None else None
        )
        self.currency: str | None = self.tariff.currency if self.tariff is not None else None
        #: The stretch :meth:`constant_over` found last: (start, end, price, band, pue, g/kWh).
        self._span: tuple[float, float, float | None, str | None, float, float | None] | None = None

    def constant_over(
        self, t0: float, t1: float
    ) -> tuple[float, float, float | None, str | None, float, float | None] | None:
        """``(start, end, price_per_kwh, band, pue, grams_per_kwh)`` when price, PUE and carbon
        intensity are all constant over ``[t0, t1)`` (``t0 <= t1``), else None.

        Every GPU slice of a tick is priced, nearly all within one stretch: a slice inside
        the last stretch found needs no schedule lookup. :meth:`price` of such a slice is
        the one part these values give.
        """
        span = self._span
        if span is not None and span[0] <= t0 < span[1] and t0 <= t1 <= span[1]:
            return span
        if not t0 <= t1:
            return None
        lo, hi = -math.inf, math.inf
        price = band = grams = None
        if self.tariff is not None:
            lo, hi, (price, band) = self.tariff.piece(t0)
        a, b, pue = self.pue.piece(t0)
        lo, hi = max(lo, a), min(hi, b)
        if self.carbon is not None:
            a, b, grams = self.carbon.piece(t0)
            lo, hi = max(lo, a), min(hi, b)
        span = self._span = (lo, hi, price, band, pue, grams)  # lo <= t0 < hi: each piece holds t0
        return span if t1 <= hi else None

    def price(self, t0: float, t1: float, it_joules: float) -> list[PricedPart]:
        """Price ``it_joules`` (J) used uniformly over ``[t0, t1)`` (unix s).

        Returns contiguous parts covering ``[t0, t1)``, cut at every tariff,
        PUE and carbon boundary; their ``it_joules`` add up to ``it_joules``.
        A zero-length slice (``t0 == t1``) is priced at ``t0`` as one part.
        """
        if t1 < t0:
            raise ValueError(f"slice ends before it starts: t0={t0} t1={t1}")
        one = self.constant_over(t0, t1)
        if one is not None:  # nearly every slice: one stretch of price, PUE and carbon
            _, _, price, band, pue_value, grams = one
            return [self._part(t0, t1, it_joules, price, band, pue_value, grams)]
        if t1 == t0:
            price, band = self.tariff.price_at(t0) if self.tariff else (None, None)
            g = self.carbon.value_at(t0) if self.carbon else None
            return [self._part(t0, t1, it_joules, price, band, self.pue.value_at(t0), g)]

        tariff = self.tariff.segments(t0, t1) if self.tariff else [(t0, t1, None, None)]
        pue = self.pue.segments(t0, t1)
        carbon = self.carbon.segments(t0, t1) if self.carbon else [(t0, t1, None)]
        if len(tariff) == 1 and len(pue) == 1 and len(carbon) == 1:  # the usual case
            return [
                self._part(t0, t1, it_joules, tariff[0][2], tariff[0][3], pue[0][2], carbon[0][2])
            ]

        # Walk the three piece lists together; every list ends exactly at t1.
        pieces: list[tuple[float, float, float | None, str | None, float, float | None]] = []
        span = t1 - t0
        i = j = k = 0
        cur = t0
        while cur < t1:
            end = min(tariff[i][1], pue[j][1], carbon[k][1])
            pieces.append((cur, end, tariff[i][2], tariff[i][3], pue[j][2], carbon[k][2]))
            cur = end
            if tariff[i][1] == end:
                i += 1
            if pue[j][1] == end:
                j += 1
            if carbon[k][1] == end:
                k += 1
        # Each part by its share of the time; the last takes the rest, so they add up exactly.
        joules = {n: it_joules * (b - a) / span for n, (a, b, *_) in enumerate(pieces[:-1])}
        joules[len(pieces) - 1] = 0.0
        settle(it_joules, joules, len(pieces) - 1)
        return [self._part(a, b, joules[n], *rest) for n, (a, b, *rest) in enumerate(pieces)]

    @staticmethod
    def _part(
        t0: float,
        t1: float,
        it_joules: float,
        price: float | None,
        band: str | None,
        pue: float,
        grams_per_kwh: float | None,
    ) -> PricedPart:
        facility = it_joules * pue
        kwh = facility / JOULES_PER_KWH
        return PricedPart(
            t0=t0,
            t1=t1,
            it_joules=it_joules,
            facility_joules=facility,
            price_per_kwh=price,
            band=band,
            cost=kwh * price if price is not None else None,
            emissions_g=kwh * grams_per_kwh if grams_per_kwh is not None else None,
            pue=pue,
            grams_per_kwh=grams_per_kwh,
        )

    def summarize(self, t0: float, t1: float, it_joules: float) -> CostSummary:
        """:meth:`price` then :func:`summarize`: totals for one slice."""
        return summarize(self.price(t0, t1, it_joules))


def is_idle(util_ratio: float, cfg: IdleConfig) -> bool:
    """Whether a GPU at utilization ``util_ratio`` (0..1) counts as idle.

    Strictly below the threshold: at exactly ``utilization_threshold`` the GPU
    is busy, so a threshold of 0 means "never idle".
    """
    return util_ratio < cfg.utilization_threshold
