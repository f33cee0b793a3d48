"""The fully loaded cost of one GPU-hour, worked out from the configuration alone
(``check-config``): :func:`gpu_hour`, :func:`break_even`.

For a GPU at load ``L`` (0 idle, 1 full power), with the ``[planning]`` assumptions
(``N`` GPUs per node, GPU power ``P(L) = idle + L x (full - idle)`` W, host ``H`` W):

* energy   = (P(L) + H / N) / 1000 x PUE x p,  p = the tariff's price averaged over a week
  of its bands (every minute of mon..sun weighted alike; holidays and DST aside), PUE
  averaged over a year (:meth:`PueConfig.average`)
* hardware = gpu_price / (gpu_lifetime_years x 8,766 h) + node_price / (node_lifetime x 8,766 h) / N
* running  = Σ per-GPU items per hour + Σ node items per hour / N

all per GPU-hour, in the currency of each. Renting instead pays the cloud price ``C`` for
the hours a GPU is used; owning pays ``F + E(0) + u (E(1) - E(0))`` per hour at
utilisation ``u`` (F = hardware + running). Owning is cheaper above the break-even
utilisation ``u* = (F + E(0)) / (C - (E(1) - E(0)))``; none when that is above 1 (renting
is cheaper at any utilisation).
"""

from __future__ import annotations

from dataclasses import dataclass

from .amortization import Amortization
from .config import PlanningConfig, TariffConfig
from .running import RunningCosts
from .timeutil import MINUTES_PER_DAY

HOURS_PER_YEAR = 365.25 * 24.0


def week_average_price(tariff: TariffConfig) -> float:
    """The tariff's price per kWh averaged over the minutes of a week (mon..sun)."""
    if tariff.flat_price_per_kwh is not None:
        return tariff.flat_price_per_kwh
    assert tariff.bands is not None
    grid = tariff.band_grid()
    prices = [tariff.bands[i].price_per_kwh for day in range(7) for i in grid[day]]
    return sum(prices) / (7 * MINUTES_PER_DAY)


@dataclass(frozen=True)
class GpuHour:
    """What one GPU-hour costs at one load, by kind. Units: currency per GPU-hour;
    None where the configuration prices nothing of that kind."""

    load: float
    gpu_watts: float
    energy: float | None
    hardware: float | None
    running: dict[str, float]

    def total(self, currency: str) -> float:
        """Every kind in ``currency`` (the kinds in another currency are left out)."""
        return (self.energy or 0.0) + (self.hardware or 0.0) + self.running.get(currency, 0.0)


def gpu_hour(settings: object, load: float) -> GpuHour:
    """The cost of one GPU-hour at ``load`` (0..1) under ``settings`` (agent.config.Settings);
    energy in the tariff's currency, hardware in the hardware currency, running by currency."""
    plan: PlanningConfig = settings.planning  # type: ignore[attr-defined]
    n = plan.gpus_per_node
    watts = plan.gpu_idle_watts + load * (plan.gpu_full_watts - plan.gpu_idle_watts)
    tariff: TariffConfig | None = settings.tariff  # type: ignore[attr-defined]
    energy = None
    if tariff is not None:
        pue = settings.pue.average()  # type: ignore[attr-defined]
        energy = (watts + plan.host_watts / n) / 1000.0 * pue * week_average_price(tariff)
    amort = Amortization(settings.hardware)  # type: ignore[attr-defined]
    hardware = amort.gpu_cost_per_hour(0) + amort.node_cost_per_hour() / n if amort.enabled else None
    costs = RunningCosts(settings.running_costs, settings.hardware_currency)  # type: ignore[attr-defined]
    running: dict[str, float] = {}
    for _, cur, rate in costs.gpu_rates(0):
        running[cur] = running.get(cur, 0.0) + rate * 3600.0
    for _, cur, rate in costs.node_rates():
        running[cur] = running.get(cur, 0.0) + rate * 3600.0 / n
    return GpuHour(load, watts, energy, hardware, running)


def break_even(idle: GpuHour, full: GpuHour, cloud_per_hour: float, currency: str) -> float | None:
    """The utilisation (0..1) above which owning is cheaper than renting at ``cloud_per_hour``;
    None when renting is cheaper at any utilisation."""
    fixed = idle.total(currency)
    extra = full.total(currency) - fixed  # energy of a busy hour beyond an idle one
    if cloud_per_hour <= extra:
        return None
    u = fixed / (cloud_per_hour - extra)
    return u if u <= 1.0 else None
