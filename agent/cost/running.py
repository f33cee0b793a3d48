"""Recurring running costs (colocation, network, support, licences, staff): :class:`RunningCosts`.

cost per second = amount / seconds of its period (hour 3,600; day 86,400; year 365.25 d;
month a twelfth of a year). E.g. 1,200 per month: 1200 x 12 / 31,557,600 s = 0.456 per
hour. Like amortisation they accrue per elapsed second whether the hardware is busy or not.
"""

from __future__ import annotations

from .amortization import SECONDS_PER_YEAR
from .config import RunningCostItem

#: Seconds of each ``period`` of a running-cost item.
PERIOD_SECONDS = {
    "hour": 3600.0,
    "day": 86400.0,
    "month": SECONDS_PER_YEAR / 12.0,
    "year": SECONDS_PER_YEAR,
}


class RunningCosts:
    """Per-second rates of the configured items, for the node and for each GPU.

    Each rate is ``(item name, currency, currency per second)``; an item whose amount is 0
    for a GPU or the node gives no rate there.
    """

    def __init__(self, items: list[RunningCostItem], default_currency: str | None) -> None:
        self.items = list(items)
        self.default_currency = default_currency
        self._by_gpu: dict[tuple[int, str | None], list[tuple[str, str, float]]] = {}

    @property
    def enabled(self) -> bool:
        return any(self._currency(i) for i in self.items)

    def _currency(self, item: RunningCostItem) -> str | None:
        return item.currency or self.default_currency

    def node_rates(self) -> list[tuple[str, str, float]]:
        """The node-scoped items' rates. Units: currency per second."""
        out = []
        for item in self.items:
            cur = self._currency(item)
            if item.scope == "node" and cur and item.amount > 0:
                out.append((item.name, cur, item.amount / PERIOD_SECONDS[item.period]))
        return out

    def gpu_rates(self, gpu_index: int, gpu_name: str | None = None) -> list[tuple[str, str, float]]:
        """The per-GPU items' rates for one GPU (the first matching override's amount, else
        the item's). Units: currency per second."""
        key = (gpu_index, gpu_name)
        rates = self._by_gpu.get(key)
        if rates is None:
            rates = []
            for item in self.items:
                cur = self._currency(item)
                if item.scope != "gpu" or not cur:
                    continue
                amount = next((o.amount for o in item.gpus if o.matches(gpu_index, gpu_name)), item.amount)
                if amount > 0:
                    rates.append((item.name, cur, amount / PERIOD_SECONDS[item.period]))
            self._by_gpu[key] = rates
        return rates
