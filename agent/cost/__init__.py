"""Energy to money: tariffs, PUE, carbon, demand charges, amortisation, idle.

Pure logic on UTC instants (unix seconds) and joules; local-time rules are
resolved with :mod:`zoneinfo`. See ``docs/cost.md`` for the TOML reference.
"""

from .amortization import SECONDS_PER_YEAR, Amortization, straight_line_per_second
from .config import (
    CarbonBand,
    CloudPrice,
    RunningCostItem,
    CarbonConfig,
    GpuPriceOverride,
    HardwareConfig,
    IdleConfig,
    PlanningConfig,
    PueBand,
    PueConfig,
    TariffConfig,
    TouBand,
    format_validation_error,
)
from .demand import DemandTracker
from .model import (
    JOULES_PER_KWH,
    BandTotal,
    CostModel,
    CostSummary,
    PricedPart,
    is_idle,
    summarize,
)
from .running import PERIOD_SECONDS, RunningCosts
from .schedule import Schedule
from .tariff import FLAT_BAND, Tariff, tariff_table

__all__ = [
    "PERIOD_SECONDS",
    "CloudPrice",
    "RunningCostItem",
    "PlanningConfig",
    "RunningCosts",
    "FLAT_BAND",
    "JOULES_PER_KWH",
    "SECONDS_PER_YEAR",
    "Amortization",
    "BandTotal",
    "CarbonBand",
    "CarbonConfig",
    "CostModel",
    "CostSummary",
    "DemandTracker",
    "GpuPriceOverride",
    "HardwareConfig",
    "IdleConfig",
    "PricedPart",
    "PueBand",
    "PueConfig",
    "Schedule",
    "Tariff",
    "TariffConfig",
    "TouBand",
    "format_validation_error",
    "is_idle",
    "straight_line_per_second",
    "summarize",
    "tariff_table",
]
