"""Running totals built from energy slices.

The ledger is the single place where energy turns into totals; cost,
emissions and per-workload attribution are added here as slices arrive, and
its :meth:`Ledger.state` is what is persisted across restarts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from .energy import EnergySlice


class Ledger:
    """Totals since the agent's totals began. Only ever grows."""

    def __init__(self) -> None:
        #: (gpu index, measurement source) → J
        self.gpu_energy: dict[tuple[int, str], float] = defaultdict(float)
        #: (host component, measurement source) → J; components cpu, dram, platform
        self.host_energy: dict[tuple[str, str], float] = defaultdict(float)

    def add(self, slices: Iterable[EnergySlice]) -> None:
        for s in slices:
            if s.joules > 0:
                self.gpu_energy[(s.gpu, s.source)] += s.joules

    def add_host(self, component: str, source: str, t0: float, t1: float, joules: float) -> None:
        """Host energy of one component over [t0, t1] (wall time). Units: J."""
        if joules > 0:
            self.host_energy[(component, source)] += joules

    def gpu_energy_by_source(self, gpu: int) -> dict[str, float]:
        return {src: j for (g, src), j in self.gpu_energy.items() if g == gpu}
