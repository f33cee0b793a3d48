"""Linux powercap RAPL reader: CPU package and DRAM energy counters.

Layout read (all under an injectable root, default ``/sys/class/powercap``)::

    intel-rapl:N/                 one zone per package (socket or die)
        name                      "package-N" (or "package-N-die-M")
        energy_uj                 cumulative energy, µJ, wraps at max_energy_range_uj
        max_energy_range_uj       counter range, µJ
        intel-rapl:N:M/           subzones: "core", "uncore", "dram"
    intel-rapl:K/  name "psys"    platform zone on client parts (overlaps all)
    intel-rapl-mmio:N/            MMIO view of the same package (duplicate)

The kernel lists subzones both flat at the root (as symlinks) and nested in the
parent zone's directory; both layouts are accepted and de-duplicated by zone id.
AMD Zen uses the same ``intel-rapl`` tree (package and core, usually no dram).

What is counted: ``package-*`` and ``dram`` zones only. ``core`` and ``uncore``
are parts of the package (adding them would double count); ``psys`` covers the
whole SoC platform including the package and DRAM, so it is reported as
:attr:`RaplReader.psys` but never added. ``intel-rapl-mmio`` zones are used only
for a (kind, socket) that the MSR-based ``intel-rapl`` tree does not provide.

Units: energy µJ (raw) / J (converted), power W, time s.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")

#: ``read_text(path) -> str``; injectable so tests can simulate PermissionError
#: even when running as root (where chmod 000 does not block reads).
ReadText = Callable[[Path], str]

_ZONE_RE = re.compile(r"^(intel-rapl|intel-rapl-mmio):(\d+)(?::(\d+))?$")
_PACKAGE_RE = re.compile(r"^package-(\d+)(?:-die-(\d+))?$")

#: Prefixes in order of preference when two trees describe the same domain.
_PREFIX_RANK = {"intel-rapl": 0, "intel-rapl-mmio": 1}


class RaplUnavailable(Exception):
    """RAPL cannot be used. ``reason`` is one short human sentence for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _default_read_text(path: Path) -> str:
    with open(path, "r", encoding="ascii") as fh:
        return fh.read()


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone.

    ``kind`` is ``package``, ``dram``, ``core``, ``uncore``, ``psys`` or the raw
    name for anything else. ``socket`` is the package number as a string
    (``"0"``, or ``"0-die-1"`` on multi-die parts); ``None`` for psys.
    """

    zone_id: str  # e.g. "intel-rapl:0:1"
    path: Path
    name: str
    kind: str
    socket: str | None
    max_energy_range_uj: int  # 0 when unreadable: wrap-around then cannot be undone

    @property
    def counted(self) -> bool:
        """True for the domains whose energy is added: package and dram."""
        return self.kind in ("package", "dram")


def energy_delta_uj(old_uj: int, new_uj: int, range_uj: int) -> int:
    """Energy between two counter reads, µJ, undoing at most one wrap-around.

    The counter runs from 0 up to ``range_uj`` then restarts at 0, so when
    ``new < old`` it wrapped once: ``delta = new + range - old``. With an
    unknown range (0) a decrease cannot be explained and counts as 0 µJ.
    """
    if new_uj >= old_uj:
        return new_uj - old_uj
    if range_uj <= 0:
        return 0
    return new_uj + range_uj - old_uj


def _kind_and_socket(name: str) -> tuple[str, str | None]:
    m = _PACKAGE_RE.match(name)
    if m:
        socket = m.group(1) if m.group(2) is None else f"{m.group(1)}-die-{m.group(2)}"
        return "package", socket
    if name in ("dram", "core", "uncore", "psys"):
        return name, None
    return name or "unknown", None


def _sort_key(zone_id: str) -> tuple[int, int, int]:
    m = _ZONE_RE.match(zone_id)
    assert m is not None
    return (_PREFIX_RANK[m.group(1)], int(m.group(2)), int(m.group(3) or -1))


def _candidate_dirs(root: Path) -> dict[str, Path]:
    """Every zone directory, flat or nested one level, keyed by zone id."""
    found: dict[str, Path] = {}
    try:
        top = sorted(os.listdir(root))
    except FileNotFoundError:
        raise RaplUnavailable(f"no {root}") from None
    except NotADirectoryError:
        raise RaplUnavailable(f"{root} is not a directory") from None
    except PermissionError:
        raise RaplUnavailable(f"{root} not listable: permission denied") from None
    except OSError as exc:
        raise RaplUnavailable(f"{root} not listable: {exc.strerror or exc}") from None
    for entry in top:
        m = _ZONE_RE.match(entry)
        if not m:
            continue
        found.setdefault(entry, root / entry)
        if m.group(3) is None:  # a top-level zone: look for nested subzones
            try:
                children = os.listdir(root / entry)
            except OSError:
                continue
            for child in children:
                cm = _ZONE_RE.match(child)
                if cm and cm.group(3) is not None:
                    found.setdefault(child, root / entry / child)
    return found


def discover_zones(root: Path | str = DEFAULT_POWERCAP_ROOT, *, read_text: ReadText | None = None) -> list[RaplZone]:
    """All RAPL zones under ``root``, MSR tree first, numerically ordered.

    Reads only ``name`` and ``max_energy_range_uj`` (world-readable); does not
    touch ``energy_uj``. Raises :class:`RaplUnavailable` when ``root`` is missing.
    """
    root = Path(root)
    rd = read_text or _default_read_text
    dirs = _candidate_dirs(root)
    zones: list[RaplZone] = []
    by_id: dict[str, RaplZone] = {}
    for zone_id in sorted(dirs, key=_sort_key):
        path = dirs[zone_id]
        try:
            name = rd(path / "name").strip()
        except OSError:
            continue  # a zone without a readable name is not usable
        kind, socket = _kind_and_socket(name)
        m = _ZONE_RE.match(zone_id)
        assert m is not None
        if m.group(3) is not None and kind != "package":
            # Subzones belong to their parent package's socket.
            parent = by_id.get(f"{m.group(1)}:{m.group(2)}")
            socket = parent.socket if parent is not None else m.group(2)
        try:
            range_uj = int(rd(path / "max_energy_range_uj").strip())
        except (OSError, ValueError):
            range_uj = 0
        zone = RaplZone(zone_id, path, name, kind, socket, range_uj)
        by_id[zone_id] = zone
        zones.append(zone)
    return zones


def select_counted(zones: list[RaplZone]) -> list[RaplZone]:
    """Package and dram zones, one per (kind, socket): MSR tree preferred over MMIO."""
    chosen: dict[tuple[str, str | None], RaplZone] = {}
    for z in sorted(zones, key=lambda z: _sort_key(z.zone_id)):
        if z.counted:
            chosen.setdefault((z.kind, z.socket), z)
    return sorted(chosen.values(), key=lambda z: (z.kind != "package", _sort_key(z.zone_id)[1:]))


def _energy_error_reason(path: Path, exc: OSError) -> str:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return f"energy_uj not readable: permission denied ({path})"
    return f"energy_uj read failed: {exc.strerror or exc} ({path})"


@dataclass(frozen=True)
class RaplDelta:
    """Energy of one counted zone between two reads. Units: J."""

    zone: RaplZone
    joules: float


class RaplReader:
    """Reads cumulative energy of the counted RAPL zones and turns it into deltas.

    Construction discovers zones and reads every counted ``energy_uj`` once (the
    baseline), raising :class:`RaplUnavailable` with a clear reason if there is
    no tree, no package zone, or ``energy_uj`` is not readable. After that,
    :meth:`read_deltas` costs one small file read per counted zone.
    """

    def __init__(self, root: Path | str = DEFAULT_POWERCAP_ROOT, *, read_text: ReadText | None = None) -> None:
        self.root = Path(root)
        self._rd = read_text or _default_read_text
        self.zones = discover_zones(self.root, read_text=self._rd)
        self.counted = select_counted(self.zones)
        psys = [z for z in self.zones if z.kind == "psys"]
        #: The platform zone if present: reported only, never added.
        self.psys: RaplZone | None = psys[0] if psys else None
        if not any(z.kind == "package" for z in self.counted):
            raise RaplUnavailable(f"no RAPL package zone under {self.root}")
        self._last: dict[str, int] = self.read_counters()

    @property
    def packages(self) -> list[RaplZone]:
        return [z for z in self.counted if z.kind == "package"]

    @property
    def drams(self) -> list[RaplZone]:
        return [z for z in self.counted if z.kind == "dram"]

    def _read_uj(self, zone: RaplZone) -> int:
        path = zone.path / "energy_uj"
        try:
            text = self._rd(path)
        except OSError as exc:
            raise RaplUnavailable(_energy_error_reason(path, exc)) from exc
        try:
            return int(text.strip())
        except ValueError:
            raise RaplUnavailable(f"energy_uj is not an integer: {text.strip()[:40]!r} ({path})") from None

    def read_counters(self) -> dict[str, int]:
        """Raw cumulative counters of the counted zones, µJ, keyed by zone id."""
        return {z.zone_id: self._read_uj(z) for z in self.counted}

    def read_deltas(self) -> list[RaplDelta]:
        """Energy of each counted zone since the previous call (or construction), J.

        Raises :class:`RaplUnavailable` if a counter became unreadable; the
        baseline is then left unchanged.
        """
        now = self.read_counters()
        out = [
            RaplDelta(z, energy_delta_uj(self._last[z.zone_id], now[z.zone_id], z.max_energy_range_uj) / 1e6)
            for z in self.counted
        ]
        self._last = now
        return out

    def read_psys_uj(self) -> int | None:
        """Raw psys counter, µJ, or None when there is no psys zone or it fails."""
        if self.psys is None:
            return None
        try:
            return int(self._rd(self.psys.path / "energy_uj").strip())
        except (OSError, ValueError):
            return None

    @property
    def baseline_uj(self) -> dict[str, int]:
        """Counters of the previous read, µJ, keyed by zone id (a copy)."""
        return dict(self._last)

    def describe(self) -> str:
        """E.g. ``rapl, 2 packages + 2 dram``."""
        n_pkg, n_dram = len(self.packages), len(self.drams)
        return f"rapl, {n_pkg} package{'s' if n_pkg != 1 else ''} + {n_dram} dram"

