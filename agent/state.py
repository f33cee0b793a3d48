"""Totals that survive restarts: one JSON state file, written atomically.

A write goes to a temporary file in the same directory, is fsync'd, renamed
over the old file and the directory is fsync'd: a crash at any moment leaves
either the old or the new state, never a torn one; a temporary file left by a
write that was interrupted is removed at start. The saves a scrape triggers
skip the fsyncs and go to a second file, ``state-recent.json``: it survives the
process being killed (the page cache), and should a power cut leave it empty or
torn, the last synced ``state.json`` is still whole and is used instead. A
synced save removes the recent file first, so a recent file is always newer
than ``state.json``. A state file that cannot be
used (not UTF-8, not JSON, nested too deep, or content the ledger rejects) is
set aside under a name of its own (``state.json.corrupt-<time>[-n]``) with one
clear log line, and the agent starts from zero; a directory it cannot write is
an error at start, never a silent loss.

The directory is untrusted as far as its entries go: the state file is opened without
following links and without blocking, and is used only when it is a regular file of this
user's, at most :data:`MAX_STATE_BYTES` (a link, a FIFO, a device, someone else's file or a
file past the bound is set aside with one line); the temporary file of a write is created
afresh (``O_EXCL | O_NOFOLLOW``: a link planted under its name is removed, never followed).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILENAME = "state.json"
#: The unsynced saves' file (see the module's docstring).
RECENT_FILENAME = "state-recent.json"
#: A write takes milliseconds: a temporary file older than this is a leftover, whoever wrote it. Units: s.
_TEMP_FILE_MAX_AGE = 60.0
#: Largest state file read. A node's real state is kilobytes to a few hundred (thousands of
#: workload rows); parsing takes about ten times the file's size in memory, so this keeps a
#: load under the unit's MemoryMax. Units: bytes.
MAX_STATE_BYTES = 8 * 1024 * 1024


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
        self.recent_path = self.dir / RECENT_FILENAME
        #: The file the last :meth:`load` returned (what :meth:`reject` sets aside).
        self.loaded_path = self.path
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
        leftovers = [(name, tmp) for name in (FILENAME, RECENT_FILENAME) for tmp in self.dir.glob(f".{name}.*.tmp")]
        for name, tmp in leftovers:
            pid = tmp.name[len(name) + 2 : -len(".tmp")]
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
        """The persisted state, or None when there is none or it was unusable (then set aside):
        the recent (unsynced) file where there is one and it reads, else ``state.json``."""
        if os.path.lexists(self.recent_path):
            self.loaded_path = self.recent_path
            state = self._load(self.recent_path)
            if state is not None:
                return state
        self.loaded_path = self.path
        return self._load(self.path)

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = self._read_regular(path)
        except FileNotFoundError:
            return None
        except _Refused as exc:
            self._set_aside(path, str(exc))
            return None
        except OSError as exc:
            self._set_aside(path, f"cannot be read: {exc.strerror or exc}")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._set_aside(path, f"not UTF-8: byte {exc.object[exc.start]:#04x} at offset {exc.start}")
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            self._set_aside(path, f"line {exc.lineno}: {exc.msg}")
            return None
        except RecursionError:
            self._set_aside(path, "JSON nested too deep")
            return None
        if not isinstance(state, dict):
            self._set_aside(path, "not a JSON object")
            return None
        return state

    def _read_regular(self, path: Path) -> bytes:
        """The state file's bytes: opened without following a link or blocking on a FIFO, and
        read only if it is a regular file of this user's of at most MAX_STATE_BYTES."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Refused("a symbolic link, not a file: not followed") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("not a regular file (a FIFO, device or directory)")
            if st.st_uid != os.geteuid():
                raise _Refused(f"owned by uid {st.st_uid}, not this agent's ({os.geteuid()})")
            if st.st_size > MAX_STATE_BYTES:
                raise _Refused(f"{st.st_size} bytes, beyond the {MAX_STATE_BYTES} a state file can be")
            chunks = []
            left = MAX_STATE_BYTES + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            if left <= 0:
                raise _Refused(f"grew beyond the {MAX_STATE_BYTES} bytes a state file can be")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def reject(self, reason: str) -> None:
        """The caller found the content of the file :meth:`load` returned unusable: set it aside
        (after a recent file, :meth:`load` then returns ``state.json``)."""
        self._set_aside(self.loaded_path, reason)

    def _set_aside(self, path: Path, reason: str) -> None:
        # Never over an earlier one: each bad file is kept for a post-mortem.
        stem = f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        aside = path.with_name(stem)
        n = 1
        while aside.exists():
            aside = path.with_name(f"{stem}-{n}")
            n += 1
        try:
            os.replace(path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"could not be moved aside: {exc.strerror or exc}"
        then = ("the last synced state is used" if path == self.recent_path and os.path.lexists(self.path)
                else "totals start from zero")
        log.error("state file %s is unusable (%s); %s; %s", path, reason, where, then)

    def save(self, state: dict[str, Any], *, sync: bool = True) -> None:
        """Atomically replace the state file. Raises OSError on failure, ValueError for a
        non-finite value (never written: it would poison the totals for good). ``sync=False``
        writes the recent file without fsync: it survives the process being killed (it is in
        the page cache), and a power cut that tears it leaves the last synced ``state.json``;
        the periodic and final saves sync, and remove the recent file first."""
        data = json.dumps({**state, "saved_at": time.time()}, separators=(",", ":"), allow_nan=False).encode()
        target = self.path if sync else self.recent_path
        if sync:
            try:
                os.unlink(self.recent_path)  # made durable by the directory's fsync below
            except FileNotFoundError:
                pass
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            os.unlink(tmp)  # whatever is under that name (a planted link included: unlink never follows)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        if sync:
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


class _Refused(Exception):
    """The state file is not one to read; ``str()`` says why, in one line."""
