"""Checks of the values a saved state file (``state.json``) holds, shared by every loader.

The ledger (agent.accounting), the workloads' totals (agent.attribution.workloads) and the
demand tracker (agent.cost.demand) each restore their part of the state all or nothing: every
value goes through these checks before any total is touched, and the first bad one raises
ValueError naming where it sits (``energy_cost[0][2]: -0.1 is negative``). Imports nothing
of the agent's, so any module may use it.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Sanity bounds of a persisted total. A node drawing 10 kW for 30 years uses 1e13 J, and
# its amortisation in the currency with the smallest unit (hardware in IRR or VND runs to
# 1e10 per GPU) stays below 1e14: a value past these is corruption, not history.
#: Units: J (IT and facility energy).
MAX_JOULES = 1e15
#: Units: currency.
MAX_MONEY = 1e15
#: Units: g CO2e.
MAX_GRAMS = 1e15
#: Unix time, s: year 5138. Beyond it a timestamp is corruption (also the bound of seconds).
MAX_TIMESTAMP = 1e11

_NAME = re.compile(r"[^\x00-\x1f]{1,256}")


def kind_of(v: Any) -> str:
    """What a JSON value is, in words: ``an object``, ``a list``, ``a string``, ``a number``…"""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def number(v: Any, where: str, limit: float) -> float:
    """A JSON number that is finite, not negative and at most ``limit``. Raises ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number, got {kind_of(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{where}: {f} is not a finite number")
    if f < 0:
        raise ValueError(f"{where}: {f:g} is negative")
    if f > limit:
        raise ValueError(f"{where}: {f:g} is beyond the sanity bound {limit:g}")
    return f


def name(v: Any, where: str) -> str:
    """A key of a total (a GPU UUID, a workload, a currency): 1-256 printable characters."""
    if not isinstance(v, str) or not _NAME.fullmatch(v):
        raise ValueError(f"{where}: expected a name (1-256 printable characters), got {kind_of(v)}")
    return v
