"""Straight-line amortisation of hardware: :class:`Amortization`.

cost per second = purchase price / (lifetime_years x 365.25 d x 86400 s).
E.g. 30,000 over 5 years: 30000 / 43830 h = 0.684463 per hour.
"""

from __future__ import annotations

from .config import HardwareConfig

SECONDS_PER_YEAR = 365.25 * 86400.0  # Julian year: averages leap years


def straight_line_per_second(price: float, lifetime_years: float) -> float:
    """Units: currency per second, for ``price`` (currency) over ``lifetime_years``."""
    return price / (lifetime_years * SECONDS_PER_YEAR)


class Amortization:
    """Hardware cost per elapsed second, per GPU and per node (the host without GPUs).

    The agent adds cost-per-second x elapsed seconds to a counter, whether
    the hardware is busy or not: depreciation does not stop when idle.
    """

    def __init__(self, config: HardwareConfig) -> None:
        self.config = config
        self._by_gpu: dict[tuple[int, str | None], float] = {}

    @property
    def enabled(self) -> bool:
        """Whether any price is configured (else every rate is 0)."""
        c = self.config
        return c.gpu_price > 0 or c.node_price > 0 or any(g.price > 0 for g in c.gpus)

    def gpu_cost_per_second(self, gpu_index: int, gpu_name: str | None = None) -> float:
        """Units: currency per second for one GPU. The first ``[[hardware.gpus]]``
        entry matching the index or (substring of) the name wins, else ``gpu_price``."""
        key = (gpu_index, gpu_name)
        rate = self._by_gpu.get(key)
        if rate is None:
            c = self.config
            price, years = c.gpu_price, c.gpu_lifetime_years
            for o in c.gpus:
                if o.matches(gpu_index, gpu_name):
                    price = o.price
                    years = o.lifetime_years if o.lifetime_years is not None else years
                    break
            rate = straight_line_per_second(price, years)
            self._by_gpu[key] = rate
        return rate

    def gpu_cost_per_hour(self, gpu_index: int, gpu_name: str | None = None) -> float:
        """Units: currency per hour for one GPU."""
        return self.gpu_cost_per_second(gpu_index, gpu_name) * 3600.0

    def node_cost_per_second(self) -> float:
        """Units: currency per second for the node itself (``node_price``)."""
        return straight_line_per_second(self.config.node_price, self.config.node_lifetime_years)

    def node_cost_per_hour(self) -> float:
        """Units: currency per hour for the node itself."""
        return self.node_cost_per_second() * 3600.0
