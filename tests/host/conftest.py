"""Shared helpers for the host power tests: fixture paths and writable tree copies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` run without `python -m` and without an install
    sys.path.insert(0, str(REPO))

POWERCAP = REPO / "fixtures" / "powercap"
IPMI = REPO / "fixtures" / "ipmi"


@pytest.fixture
def powercap_copy(tmp_path: Path):
    """``powercap_copy("two_sockets")`` -> a writable copy of that fake tree."""

    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(POWERCAP / name, dst)
        return dst

    return make


def _set_uj(root: Path, zone: str, value: int) -> None:
    matches = [p for p in root.rglob(zone) if p.is_dir()]
    assert len(matches) == 1, f"zone {zone} not unique in {root}"
    (matches[0] / "energy_uj").write_text(f"{value}\n")


@pytest.fixture
def set_uj():
    """``set_uj(root, "intel-rapl:0", 5)`` writes a counter value (µJ) into a copied tree."""
    return _set_uj


@pytest.fixture
def powercap_dir() -> Path:
    return POWERCAP


@pytest.fixture
def ipmi_dir() -> Path:
    return IPMI
