"""Shared test helpers: the H100 fixture and a driver that replays it through the real sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def h100_trace():
    from helpers import H100_TRACE

    from agent.trace import load

    return load(H100_TRACE)


@pytest.fixture(scope="session")
def h100_trace_c():
    from helpers import H100_TRACE_C

    from agent.trace import load

    return load(H100_TRACE_C)
