"""Totals that survive restarts: one JSON state file, written atomically.

A write goes to a temporary file in the same directory, is fsync'd, renamed
over the old file and the directory is fsync'd: a crash at any moment leaves
either the old or the new state, never a torn one; a temporary file left by a
write that was interrupted is removed at start. A state file that cannot be
used (not UTF-8, not JSON, nested too deep, or content the ledger rejects) is
set aside under a name of its own (``state.json.corrupt-<time>[-n]``) with one
clear log line, and the agent starts from zero; a directory it cannot write is
an error at start, never a silent loss.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "state.json"
#: A write takes milliseconds: a temporary file older than this is a leftover, whoever wrote it. Units: s.
_TEMP_FILE_MAX_AGE = 60.0


class StateError(Exception):
    """The state directory cannot be used. ``str()`` is one line."""


def default_state_dir() -> Path:
    """systemd's ``StateDirectory=`` ($STATE_DIRECTORY), else /var/lib for root, else XDG state."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/gpu-cost-agent")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "gpu-cost-agent"


class StateStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / FILENAME
        self.saves = 0
        self.last_save: float | None = None

    def check_writable(self) -> None:
        """Create the directory if needed and prove a file can be written there."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            with open(probe, "w") as fh:
                fh.write("ok")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as exc:
            raise StateError(
                f"state directory {self.dir} is not writable: {exc.strerror or exc} "
                "(set [agent] state_dir or GPUCOST_AGENT__STATE_DIR)"
            ) from exc

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files of writes that never finished (a crash between write and
        rename). A fresh one whose writer is alive (another agent on the same directory)
        is left alone. Returns what was removed."""
        removed = []
        for tmp in self.dir.glob(f".{FILENAME}.*.tmp"):
            pid = tmp.name[len(FILENAME) + 2 : -len(".tmp")]
            try:
                fresh = time.time() - tmp.stat().st_mtime < _TEMP_FILE_MAX_AGE
            except OSError:
                continue
            if fresh and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError as exc:
                log.warning("could not remove leftover temporary file %s: %s", tmp, exc.strerror or exc)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write: %s",
                     len(removed), ", ".join(p.name for p in removed))
        return removed

    def load(self) -> dict[str, Any] | None:
        """The persisted state, or None when there is none or it was unusable (then set aside)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            self._set_aside(f"not UTF-8: byte {exc.object[exc.start]:#04x} at offset {exc.start}")
            return None
        except OSError as exc:
            self._set_aside(f"cannot be read: {exc.strerror or exc}")
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            self._set_aside(f"line {exc.lineno}: {exc.msg}")
            return None
        except RecursionError:
            self._set_aside("JSON nested too deep")
            return None
        if not isinstance(state, dict):
            self._set_aside("not a JSON object")
            return None
        return state

    def reject(self, reason: str) -> None:
        """The caller found the content unusable: set the file aside."""
        self._set_aside(reason)

    def _set_aside(self, reason: str) -> None:
        # Never over an earlier one: each bad file is kept for a post-mortem.
        stem = f"{FILENAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        aside = self.path.with_name(stem)
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{stem}-{n}")
            n += 1
        try:
            os.replace(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"could not be moved aside: {exc.strerror or exc}"
        log.error("state file %s is unusable (%s); %s; totals start from zero", self.path, reason, where)

    def save(self, state: dict[str, Any]) -> None:
        """Atomically replace the state file. Raises OSError on failure, ValueError for a
        non-finite value (never written: it would poison the totals for good)."""
        data = json.dumps({**state, "saved_at": time.time()}, separators=(",", ":"), allow_nan=False).encode()
        tmp = self.path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.saves += 1
        self.last_save = time.time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but another user's
    return True
