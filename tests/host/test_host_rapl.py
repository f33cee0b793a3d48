"""RAPL reader over the fake powercap trees in fixtures/powercap/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sources.rapl import (
    RaplReader,
    RaplUnavailable,
    discover_zones,
    energy_delta_uj,
    select_counted,
)

RANGE = 262_143_328_850  # package max_energy_range_uj in the fixtures
DRAM_RANGE = 65_712_999_613


def test_energy_delta_plain_and_wrapped():
    assert energy_delta_uj(1_000, 4_500, RANGE) == 3_500
    assert energy_delta_uj(7, 7, RANGE) == 0
    # wrapped once: 10 + 262 143 328 850 - 262 143 328 800 = 60
    assert energy_delta_uj(RANGE - 50, 10, RANGE) == 60
    # unknown range: a decrease cannot be explained, counts as nothing
    assert energy_delta_uj(500, 10, 0) == 0


def test_one_socket_discovery(powercap_dir):
    zones = discover_zones(powercap_dir / "one_socket")
    assert [(z.zone_id, z.name, z.kind, z.socket) for z in zones] == [
        ("intel-rapl:0", "package-0", "package", "0")
    ]
    assert zones[0].max_energy_range_uj == RANGE
    r = RaplReader(powercap_dir / "one_socket")
    assert [z.zone_id for z in r.packages] == ["intel-rapl:0"]
    assert r.drams == []
    assert r.psys is None
    assert r.describe() == "rapl, 1 package + 0 dram"
    assert r.baseline_uj == {"intel-rapl:0": 48_213_177_625}


def test_two_sockets_nested_subzones(powercap_dir):
    zones = discover_zones(powercap_dir / "two_sockets")
    got = {(z.zone_id, z.kind, z.socket) for z in zones}
    assert got == {
        ("intel-rapl:0", "package", "0"),
        ("intel-rapl:0:0", "core", "0"),
        ("intel-rapl:0:1", "dram", "0"),
        ("intel-rapl:1", "package", "1"),
        ("intel-rapl:1:0", "core", "1"),
        ("intel-rapl:1:1", "dram", "1"),
    }
    counted = select_counted(zones)
    # core sits inside the package: never counted
    assert [z.zone_id for z in counted] == ["intel-rapl:0", "intel-rapl:1", "intel-rapl:0:1", "intel-rapl:1:1"]
    r = RaplReader(powercap_dir / "two_sockets")
    assert r.describe() == "rapl, 2 packages + 2 dram"
    assert {z.zone_id: z.max_energy_range_uj for z in r.drams} == {
        "intel-rapl:0:1": DRAM_RANGE,
        "intel-rapl:1:1": DRAM_RANGE,
    }


def test_two_sockets_deltas_by_hand(powercap_copy, set_uj):
    root = powercap_copy("two_sockets")
    r = RaplReader(root)  # baseline: pkg0 100 000 000 000, pkg1 150 000 000 000,
    #                               dram0 20 000 000 000, dram1 30 000 000 000 µJ
    set_uj(root, "intel-rapl:0", 100_000_000_000 + 180_500_000)  # +180.5 J
    set_uj(root, "intel-rapl:1", 150_000_000_000 + 95_250_000)  # +95.25 J
    set_uj(root, "intel-rapl:0:1", 20_000_000_000 + 12_000_000)  # +12 J
    set_uj(root, "intel-rapl:1:1", 30_000_000_000 + 8_125_000)  # +8.125 J
    set_uj(root, "intel-rapl:0:0", 1)  # core changed wildly: must not matter
    got = {d.zone.zone_id: d.joules for d in r.read_deltas()}
    assert got == {
        "intel-rapl:0": 180.5,
        "intel-rapl:1": 95.25,
        "intel-rapl:0:1": 12.0,
        "intel-rapl:1:1": 8.125,
    }
    # nothing moved since: all zero
    assert all(d.joules == 0.0 for d in r.read_deltas())


def test_wrap_around_between_two_reads(powercap_copy, set_uj):
    root = powercap_copy("wrap")
    r = RaplReader(root)  # baseline 262 143 000 000 µJ, range 262 143 328 850 µJ
    set_uj(root, "intel-rapl:0", 50_000_000)
    # new < old, so it wrapped: 50 000 000 + 262 143 328 850 - 262 143 000 000
    #                         = 50 000 000 + 328 850 = 50 328 850 µJ = 50.32885 J
    (d,) = r.read_deltas()
    assert d.joules == pytest.approx(50.32885, abs=1e-9)
    set_uj(root, "intel-rapl:0", 60_000_000)  # plain: +10 000 000 µJ = 10 J
    (d,) = r.read_deltas()
    assert d.joules == 10.0


def test_client_psys_and_mmio_not_double_counted(powercap_dir):
    r = RaplReader(powercap_dir / "client_psys_mmio")
    kinds = {z.zone_id: z.kind for z in r.zones}
    assert kinds == {
        "intel-rapl:0": "package",
        "intel-rapl:0:0": "core",
        "intel-rapl:0:1": "uncore",
        "intel-rapl:1": "psys",
        "intel-rapl-mmio:0": "package",
    }
    # one package-0, from the MSR tree; no core, uncore, psys or MMIO duplicate
    assert [z.zone_id for z in r.counted] == ["intel-rapl:0"]
    assert r.psys is not None and r.psys.zone_id == "intel-rapl:1" and r.psys.socket is None
    assert r.read_psys_uj() == 9_000_000_000


def test_mmio_only_tree_is_used(powercap_copy):
    root = powercap_copy("client_psys_mmio")
    for zone in ("intel-rapl:0", "intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1"):
        for f in (root / zone).iterdir():
            f.unlink()
        (root / zone).rmdir()
    r = RaplReader(root)
    assert [z.zone_id for z in r.counted] == ["intel-rapl-mmio:0"]


def test_missing_root(tmp_path):
    with pytest.raises(RaplUnavailable) as ei:
        RaplReader(tmp_path / "nope")
    assert ei.value.reason == f"no {tmp_path / 'nope'}"


def test_no_package_zone(powercap_dir):
    with pytest.raises(RaplUnavailable, match="no RAPL package zone"):
        RaplReader(powercap_dir / "no_zones")


def _deny_energy(path: Path) -> str:
    if path.name == "energy_uj":
        raise PermissionError(13, "Permission denied", str(path))
    return path.read_text()


def test_unreadable_energy_uj_injected(powercap_dir):
    # Works as root too: the file open is injected.
    with pytest.raises(RaplUnavailable) as ei:
        RaplReader(powercap_dir / "two_sockets", read_text=_deny_energy)
    assert ei.value.reason.startswith("energy_uj not readable: permission denied (")
    assert ei.value.reason.endswith("intel-rapl:0/energy_uj)")


def test_unreadable_energy_uj_chmod(powercap_copy):
    root = powercap_copy("one_socket")
    target = root / "intel-rapl:0" / "energy_uj"
    os.chmod(target, 0)
    try:
        if os.geteuid() == 0 or os.access(target, os.R_OK):
            pytest.skip("running as root: chmod 000 does not block reads (covered by the injected test)")
        with pytest.raises(RaplUnavailable, match="energy_uj not readable: permission denied"):
            RaplReader(root)
    finally:
        os.chmod(target, 0o644)


def test_energy_uj_other_errors(powercap_dir):
    def eio(path: Path) -> str:
        if path.name == "energy_uj":
            raise OSError(5, "Input/output error")
        return path.read_text()

    with pytest.raises(RaplUnavailable, match="energy_uj read failed: Input/output error"):
        RaplReader(powercap_dir / "one_socket", read_text=eio)


def test_becomes_unreadable_after_start(powercap_copy, set_uj):
    root = powercap_copy("one_socket")
    deny = {"on": False}

    def rd(path: Path) -> str:
        if deny["on"] and path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    r = RaplReader(root, read_text=rd)
    deny["on"] = True
    with pytest.raises(RaplUnavailable, match="permission denied"):
        r.read_deltas()
    assert r.baseline_uj == {"intel-rapl:0": 48_213_177_625}  # unchanged
    deny["on"] = False
    set_uj(root, "intel-rapl:0", 48_213_177_625 + 2_000_000)  # +2 J
    assert [d.joules for d in r.read_deltas()] == [2.0]
