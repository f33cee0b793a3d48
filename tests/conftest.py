"""Shared test helpers: the H100 fixture and a driver that replays it through the real sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
H100_TRACE = FIXTURES / "h100_trace_a.jsonl"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def h100_trace():
    from agent.trace import load

    return load(H100_TRACE)
