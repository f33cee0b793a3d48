"""Who a process is: user, systemd unit, Slurm job, container and Kubernetes pod.

Everything is read from a proc root (default ``/proc``, injectable so tests use
the fake trees under ``fixtures/proc/``). Per process, at most these files::

    /proc/<pid>/stat      field 22 ``starttime``: clock ticks (USER_HZ) after boot.
                          With the PID it makes the cache key, so a reused PID
                          (a new process) is resolved afresh.
    /proc/<pid>/status    ``Uid:`` real uid (the first of real, effective, saved,
                          filesystem), as mapped into the agent's user namespace
    /proc/<pid>/cgroup    unit, Slurm job and step, container, pod, QoS class
    /proc/<pid>/environ   only for Slurm's SLUID cgroup naming, which has no job
                          id in the path: ``SLURM_JOB_ID`` (and ``SLURM_STEP_ID``
                          where the path has no step). Readable only by root or
                          the process's own user; unreadable means job id unknown.
    /proc/<pid>/cmdline   only when asked (``cmdline=True``; off by default)

The user name comes from the uid through ``pwd`` (NSS), cached per uid; it can be
switched off (``user_names=False``), and a uid without a name gives ``None``.

``/proc/<pid>/cgroup`` lines are ``hierarchy-id:controllers:path``. Cgroup v2
has one line ``0::/path``; v1 has one line per hierarchy (``memory``,
``cpu,cpuacct``, ``pids``, ``name=systemd`` …), hybrid systems both. Slurm,
container and pod facts are taken from the first line in this order that shows
them: memory, cpu/cpuacct, pids, cpuset, freezer, devices, blkio, other v1
controllers, ``name=systemd``, the v2 line. The systemd unit (the innermost path
component ending in ``.service`` or ``.scope``) comes from ``name=systemd``, else
the v2 line. Paths recognised (cgroupfs and systemd drivers)::

    Slurm v1        /slurm[_<node>]/uid_<uid>/job_<id>/step_<step>/task_<n>
    Slurm v2        /<slice>/[<node>_]slurmstepd.scope/job_<id>/step_<step>/user/task_<n>
    Slurm >= 26.05  /<slice>/[<node>_]slurmstepd.scope/s<SLUID>/step_<step>/...
                    (<step>: a number, batch, extern, interactive; "0+1" for het jobs)
    Docker          /docker/<64 hex>                    (cgroupfs)
                    /system.slice/docker-<hex>.scope     (systemd)
    containerd      cri-containerd-<hex>.scope, <slice>:cri-containerd:<hex>
    CRI-O           crio-<hex>.scope, crio-<hex>
    Podman          libpod-<hex>.scope
    Kubernetes      /kubepods[/burstable|/besteffort]/pod<uid>/<container>               (cgroupfs)
                    /kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/<scope>
                    (no QoS level: a Guaranteed pod)

The pod UID is returned with dashes (the systemd driver writes underscores).
When the agent runs in its own cgroup namespace the kernel prints paths relative
to it (``/../../kubepods-…``); the patterns above match those too.

Everything read here is untrusted input: a process's own environment is its user's to set,
and cgroup and user names come from whoever named them. Every fact that becomes a label or
a workload key is bounded at this edge (:func:`bounded`): at most
:data:`MAX_LABEL_CHARS` characters of ``A-Z a-z 0-9 . _ - + @ : =``; a value that does
not fit keeps a readable head and ends in ``~`` and 12 hex digits of its SHA-256, so it is
shortened, never dropped, and two different values never become one.

A process that cannot be seen (not in the proc root: exited, or hidden by a PID
namespace or ``hidepid``; ``stat``/``status`` not readable) resolves to an
identity of kind ``unknown`` with a ``reason``: never an exception, never
``None``.

PID namespaces: measured on an H100 with driver 580.159.04, NVML reports the
PIDs of processes in the caller's PID namespace as that namespace numbers them,
and leaves out processes outside it. An agent in a container without the host
PID namespace therefore resolves the PIDs it is given correctly but is not told
about other containers' GPU processes at all. The resolver says so once, as a
warning, when ``/proc/self/ns/pid`` is not the initial PID namespace (inode
4026531836, fixed in the kernel) or ``NSpid:`` in ``/proc/self/status`` lists more
than one PID; :attr:`IdentityResolver.host_pid_namespace` is then False.

Cost: a cached process takes one read of its ``stat`` (to detect PID reuse); a
new one three or four small reads. Not thread-safe: use one resolver per thread.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import re
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

DEFAULT_PROC_ROOT = Path("/proc")
#: ``readlink /proc/self/ns/pid`` in the initial PID namespace (PROC_PID_INIT_INO, include/linux/proc_ns.h).
INIT_PID_NS = "pid:[4026531836]"

#: ``read_bytes(path) -> bytes``; injectable so tests can simulate
#: PermissionError even when running as root.
ReadBytes = Callable[[Path], bytes]
#: ``lookup_user(uid) -> name or None``.
LookupUser = Callable[[int], "str | None"]

#: Kinds of workload, in the order a process is classified: the first that applies.
KIND_UNKNOWN = "unknown"  # the process could not be seen
KIND_KUBERNETES = "kubernetes"  # a pod UID in the cgroup path
KIND_CONTAINER = "container"  # a container id but no pod
KIND_SLURM = "slurm"  # a Slurm job or SLUID
KIND_SYSTEMD = "systemd"  # a systemd service (``*.service``)
KIND_USER = "user"  # anything else (a login session, a plain process): its uid

#: Longest identity fact (job id, unit, user, container id, pod UID) kept as it is, characters.
MAX_LABEL_CHARS = 128
_LABEL_SAFE = re.compile(r"[A-Za-z0-9._+@:=-]+")
#: Hex digits of the SHA-256 that end a shortened value.
_HASH_DIGITS = 12

#: Longest command line kept when ``cmdline=True``, characters.
CMDLINE_MAX_CHARS = 1024
#: Default maximum of cached processes.
DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class CgroupFacts:
    """What ``/proc/<pid>/cgroup`` says. ``None`` where the path does not say."""

    path: str | None = None  # the path the workload facts came from (for logs)
    systemd_unit: str | None = None
    slurm_job_id: str | None = None
    slurm_step_id: str | None = None
    slurm_sluid: str | None = None
    container_id: str | None = None
    container_runtime: str | None = None  # docker, containerd, cri-o, podman
    pod_uid: str | None = None
    qos_class: str | None = None  # guaranteed, burstable, besteffort


@dataclass(frozen=True)
class WorkloadIdentity:
    """Who one process is. Fields the sources do not give are ``None``.

    ``start_time`` is clock ticks after boot (``/proc/<pid>/stat`` field 22),
    ``None`` when unknown. ``slurm_job_id`` may come from the process's own
    environment (SLUID naming), which its user controls; ``slurm_sluid`` comes
    from the cgroup path, which they cannot change.
    """

    pid: int
    kind: str
    start_time: int | None = None
    reason: str | None = None  # why the identity is unknown
    uid: int | None = None
    user: str | None = None
    systemd_unit: str | None = None
    slurm_job_id: str | None = None
    slurm_step_id: str | None = None
    slurm_sluid: str | None = None
    container_id: str | None = None
    container_runtime: str | None = None
    pod_uid: str | None = None
    qos_class: str | None = None
    cgroup: str | None = field(default=None, compare=False)
    cmdline: str | None = None

    @property
    def unknown(self) -> bool:
        return self.kind == KIND_UNKNOWN

    def labels(self) -> dict[str, str]:
        """The identity as label values: every known field but pid, start time and cgroup path."""
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name in ("pid", "start_time", "cgroup"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = str(value)
        return out


def unknown_identity(pid: int, reason: str, start_time: int | None = None) -> WorkloadIdentity:
    return WorkloadIdentity(pid=pid, kind=KIND_UNKNOWN, start_time=start_time, reason=reason)


# --- parsing (pure functions) -------------------------------------------------

_SLURM_V1 = re.compile(r"(?:^|/)slurm(?:_[^/]+)?/uid_(\d+)/job_(\d+)(?:/step_([^/]+))?")
# SLUID: "s" + 13 characters of Crockford base32 (no I, L, O, U), as Slurm prints it.
_SLURM_V2 = re.compile(
    r"(?:^|/)(?:[^/]+_)?slurmstepd\.scope/(?:job_(\d+)|(s[0-9A-HJKMNP-TV-Z]{13}))(?:/step_([^/]+))?"
)
_SCOPE = re.compile(r"^(docker|cri-containerd|crio|libpod)-([0-9a-f]{12,64})\.scope$")
_CRIO_CGROUPFS = re.compile(r"^crio-([0-9a-f]{12,64})$")
# containerd's systemd-driver notation when it creates the cgroup itself: "<slice>:<prefix>:<id>"
_COLON = re.compile(r"^([^:]*):(cri-containerd|crio|docker):([0-9a-f]{12,64})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}
# A pod UID is a UUID (underscores under the systemd driver) or, for static pods, 32 hex.
_UID = r"([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}|[0-9a-fA-F]{32})"
_POD_SYSTEMD = re.compile(r"^(?:.*-)?kubepods(?:-(burstable|besteffort))?-pod" + _UID + r"\.slice$")
_POD_CGROUPFS = re.compile(r"^pod" + _UID + r"$")
_QOS = ("burstable", "besteffort")

# v1 controllers in the order their paths are trusted for workload facts.
_V1_ORDER = ("memory", "cpu", "cpuacct", "pids", "cpuset", "freezer", "devices", "blkio")


def _rank(controllers: str) -> int:
    if controllers == "":
        return 100  # the v2 (unified) line
    names = controllers.split(",")
    for i, name in enumerate(_V1_ORDER):
        if name in names:
            return i
    if "name=systemd" in names:
        return 90
    return 50


def bounded(raw: str | None) -> str | None:
    """``raw`` as a label value that is safe to export and to persist as a key: itself when it
    is 1–:data:`MAX_LABEL_CHARS` characters of ``A-Z a-z 0-9 . _ - + @ : =``; otherwise its
    safe characters (others as ``_``), cut to leave room, then ``~`` and the first 12 hex
    digits of the SHA-256 of the whole raw value. ``""`` stays ``""``; None stays None."""
    if raw is None or raw == "" or (len(raw) <= MAX_LABEL_CHARS and _LABEL_SAFE.fullmatch(raw)):
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_DIGITS]
    head = re.sub(r"[^A-Za-z0-9._+@:=-]", "_", raw[: MAX_LABEL_CHARS - _HASH_DIGITS - 1])
    return f"{head}~{digest}"


def _pod_uid(raw: str) -> str:
    return raw.replace("_", "-").lower()


def _slurm(path: str) -> tuple[str | None, str | None, str | None] | None:
    """(job id, step, SLUID) from one path, or None."""
    m = _SLURM_V1.search(path)
    if m:
        return m.group(2), m.group(3), None
    m = _SLURM_V2.search(path)
    if m:
        return m.group(1), m.group(3), m.group(2)
    return None


def _pod(parts: list[str]) -> tuple[str, str | None] | None:
    """(pod UID, QoS class) from path components, innermost pod, or None."""
    found = None
    for i, part in enumerate(parts):
        head = part.split(":", 1)[0]  # "<slice>:cri-containerd:<id>" carries the pod slice
        m = _POD_SYSTEMD.match(head)
        if m:
            found = (_pod_uid(m.group(2)), m.group(1) or "guaranteed")
            continue
        m = _POD_CGROUPFS.match(part)
        if m and any("kubepods" in p or p in _QOS or p == ".." for p in parts[:i]):
            parent = parts[i - 1] if i else ""
            if parent in _QOS:
                qos: str | None = parent
            elif "kubepods" in parent:
                qos = "guaranteed"
            else:
                qos = None  # the QoS level is above the agent's cgroup namespace root
            found = (_pod_uid(m.group(1)), qos)
    return found


def _container(parts: list[str], in_pod: bool) -> tuple[str, str | None] | None:
    """(container id, runtime or None) from path components, innermost, or None."""
    found = None
    for i, part in enumerate(parts):
        m = _SCOPE.match(part)
        if m:
            found = (m.group(2), _RUNTIME[m.group(1)])
            continue
        m = _COLON.match(part)
        if m:
            found = (m.group(3), _RUNTIME[m.group(2)])
            continue
        m = _CRIO_CGROUPFS.match(part)
        if m:
            found = (m.group(1), "cri-o")
            continue
        if _HEX64.match(part):
            parent = parts[i - 1] if i else ""
            if parent == "docker":
                found = (part, "docker")
            elif in_pod and _POD_CGROUPFS.match(parent):
                found = (part, None)  # cgroupfs driver: the path does not name the runtime
    return found


def _unit(path: str) -> str | None:
    for part in reversed(path.split("/")):
        if part.endswith(".service") or part.endswith(".scope"):
            return part
    return None


def parse_cgroup(text: str) -> CgroupFacts:
    """Facts from the text of ``/proc/<pid>/cgroup`` (v1, v2 or hybrid)."""
    lines: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)  # the path itself may contain ':'
        if len(parts) != 3:
            continue
        lines.append((_rank(parts[1]), parts[1], parts[2]))
    if not lines:
        return CgroupFacts()
    lines.sort(key=lambda x: x[0])

    slurm = pod = container = None
    source: str | None = None
    for _, _, path in lines:
        comps = [p for p in path.split("/") if p]
        path_pod = _pod(comps)
        if slurm is None:
            slurm = _slurm(path)
            if slurm is not None:
                source = source or path
        if pod is None and path_pod is not None:
            pod = path_pod
            source = source or path
        if container is None:
            container = _container(comps, path_pod is not None)
            if container is not None:
                source = source or path

    unit_line = next((p for _, c, p in lines if "name=systemd" in c.split(",")), None)
    if unit_line is None:
        unit_line = next((p for _, c, p in lines if c == ""), None)

    return CgroupFacts(
        path=source or lines[0][2],
        systemd_unit=_unit(unit_line) if unit_line is not None else None,
        slurm_job_id=slurm[0] if slurm else None,
        slurm_step_id=slurm[1] if slurm else None,
        slurm_sluid=slurm[2] if slurm else None,
        container_id=container[0] if container else None,
        container_runtime=container[1] if container else None,
        pod_uid=pod[0] if pod else None,
        qos_class=pod[1] if pod else None,
    )


def parse_start_time(stat: str) -> int:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot). Raises ValueError.

    The command name (field 2) is in parentheses and may itself contain spaces
    and parentheses, so fields are counted from the last ``)``.
    """
    rparen = stat.rfind(")")
    if rparen < 0:
        raise ValueError("no ')' in stat")
    rest = stat[rparen + 1 :].split()
    if len(rest) < 20:
        raise ValueError(f"stat has {len(rest) + 2} fields, expected at least 22")
    return int(rest[19])  # rest[0] is field 3 (state)


def parse_real_uid(status: str) -> int:
    """Real uid from the ``Uid:`` line of ``/proc/<pid>/status``. Raises ValueError."""
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError("no Uid: line in status")


def parse_environ(data: bytes, names: Iterable[str]) -> dict[str, str]:
    """The named variables from NUL-separated ``/proc/<pid>/environ``."""
    wanted = {n.encode() + b"=": n for n in names}
    out: dict[str, str] = {}
    for entry in data.split(b"\0"):
        for prefix, name in wanted.items():
            if entry.startswith(prefix):
                out[name] = entry[len(prefix) :].decode("utf-8", "replace")
    return out


def parse_cmdline(data: bytes, max_chars: int = CMDLINE_MAX_CHARS) -> str | None:
    """Arguments of NUL-separated ``/proc/<pid>/cmdline`` joined by spaces; None if empty."""
    text = " ".join(a.decode("utf-8", "replace") for a in data.split(b"\0") if a)
    return text[:max_chars] or None


def _classify(facts: CgroupFacts, slurm_job: str | None) -> str:
    if facts.pod_uid:
        return KIND_KUBERNETES
    if facts.container_id:
        return KIND_CONTAINER
    if slurm_job or facts.slurm_sluid:
        return KIND_SLURM
    if facts.systemd_unit and facts.systemd_unit.endswith(".service"):
        return KIND_SYSTEMD
    return KIND_USER


# --- resolver -----------------------------------------------------------------


def _default_read_bytes(path: Path) -> bytes:
    """A whole small file by ``os`` calls: a cached process's ``stat`` is read for every PID on
    every tick, and a file object costs several times the reads."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _default_lookup_user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def _why(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)) or exc.errno in (errno.ENOENT, errno.ESRCH):
        return "not visible"
    return exc.strerror or str(exc)


class _Gone(Exception):
    """The process went away, or was replaced, while it was being read."""


class IdentityResolver:
    """Resolve PIDs to :class:`WorkloadIdentity`, once per process.

    Cached by (pid, start time): a PID reused by a new process is detected and
    resolved again. The cache holds at most ``max_entries`` processes; beyond it
    dead or reused PIDs are dropped first (:meth:`prune`), then the least
    recently asked.
    """

    def __init__(
        self,
        proc_root: Path | str = DEFAULT_PROC_ROOT,
        *,
        user_names: bool = True,
        cmdline: bool = False,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        read_bytes: ReadBytes | None = None,
        lookup_user: LookupUser | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.proc_root = Path(proc_root)
        self.user_names = user_names
        self.cmdline = cmdline
        self.max_entries = max_entries
        self._read = read_bytes or _default_read_bytes
        self._lookup = lookup_user or _default_lookup_user
        self._log = logger or log
        self._cache: OrderedDict[int, WorkloadIdentity] = OrderedDict()
        self._names: dict[int, str | None] = {}
        #: Full resolutions done (a cache hit does not count).
        self.resolutions = 0
        #: True in the host's (initial) PID namespace, False in a nested one, None if it cannot be told.
        self.host_pid_namespace = self._host_pid_namespace()
        if self.host_pid_namespace is False:
            self._log.warning(
                "the agent is not in the host PID namespace: NVML lists only this namespace's GPU "
                "processes, so other containers' GPU use cannot be attributed (run it with hostPID: true)"
            )

    def __len__(self) -> int:
        return len(self._cache)

    def _host_pid_namespace(self) -> bool | None:
        known: bool | None = None
        try:
            known = os.readlink(self.proc_root / "self" / "ns" / "pid") == INIT_PID_NS
        except OSError:
            pass  # no self (a fixture tree) or no namespace links
        if known is False:
            return False
        try:
            status = self._read(self.proc_root / "self" / "status").decode("utf-8", "replace")
        except OSError:
            return known
        for line in status.splitlines():
            # More than one PID: /proc is an outer namespace's mount and this process is nested.
            # (A namespace's own /proc mount shows one PID, so one PID alone proves nothing.)
            if line.startswith("NSpid:") and len(line.split()) > 2:
                return False
        return known

    def _text(self, pid: int, name: str) -> str:
        return self._read(self.proc_root / str(pid) / name).decode("utf-8", "surrogateescape")

    def _start_time(self, pid: int) -> int:
        return parse_start_time(self._text(pid, "stat"))

    def _same(self, pid: int, start: int) -> bool:
        """Whether ``pid`` is still the process that started at ``start``."""
        try:
            return self._start_time(pid) == start
        except (OSError, ValueError):
            return False

    def resolve(self, pid: int) -> WorkloadIdentity:
        """The identity of ``pid``; kind ``unknown`` (with a reason) when it cannot be seen."""
        try:
            start = self._start_time(pid)
        except OSError as exc:
            return unknown_identity(pid, f"stat: {_why(exc)}")
        except ValueError as exc:
            return unknown_identity(pid, f"stat: {exc}")
        cached = self._cache.get(pid)
        if cached is not None and cached.start_time == start:
            self._cache.move_to_end(pid)
            return cached
        for _ in range(2):  # a second try if the PID changed hands while being read
            try:
                ident = self._resolve(pid, start)
            except _Gone:
                try:
                    start = self._start_time(pid)
                except (OSError, ValueError):
                    return unknown_identity(pid, "exited")
                continue
            self._store(ident)
            return ident
        return unknown_identity(pid, "exited")

    def _resolve(self, pid: int, start: int) -> WorkloadIdentity:
        self.resolutions += 1
        try:
            uid = parse_real_uid(self._text(pid, "status"))
        except OSError as exc:
            if not self._same(pid, start):
                raise _Gone from None
            return unknown_identity(pid, f"status: {_why(exc)}", start)
        except ValueError as exc:
            return unknown_identity(pid, f"status: {exc}", start)
        try:
            cgroup_text: str | None = self._text(pid, "cgroup")
        except OSError:
            cgroup_text = None  # identity by uid alone
        facts = parse_cgroup(cgroup_text) if cgroup_text is not None else CgroupFacts()

        job, step = facts.slurm_job_id, facts.slurm_step_id
        if facts.slurm_sluid is not None and job is None:
            env = self._environ(pid)
            job = env.get("SLURM_JOB_ID")
            step = step or env.get("SLURM_STEP_ID")
        cmd = None
        if self.cmdline:
            try:
                cmd = parse_cmdline(self._read(self.proc_root / str(pid) / "cmdline"))
            except OSError:
                cmd = None
        if not self._same(pid, start):  # the files above must all describe one process
            raise _Gone
        return WorkloadIdentity(
            pid=pid,
            kind=_classify(facts, job),
            start_time=start,
            uid=uid,
            user=bounded(self._user(uid)),
            systemd_unit=bounded(facts.systemd_unit),
            slurm_job_id=bounded(job),
            slurm_step_id=bounded(step),
            slurm_sluid=bounded(facts.slurm_sluid),
            container_id=bounded(facts.container_id),
            container_runtime=facts.container_runtime,
            pod_uid=bounded(facts.pod_uid),
            qos_class=facts.qos_class,
            cgroup=facts.path,
            cmdline=cmd,
        )

    def _environ(self, pid: int) -> dict[str, str]:
        try:
            data = self._read(self.proc_root / str(pid) / "environ")
        except OSError:
            return {}  # another user's process and the agent is not root
        return parse_environ(data, ("SLURM_JOB_ID", "SLURM_STEP_ID"))

    def _user(self, uid: int) -> str | None:
        if not self.user_names:
            return None
        if uid not in self._names:
            try:
                self._names[uid] = self._lookup(uid)
            except Exception as exc:  # an NSS backend (LDAP, SSSD) failing must not stop attribution
                self._log.warning("user name of uid %d not resolved: %s", uid, exc)
                self._names[uid] = None
        return self._names[uid]

    def _store(self, ident: WorkloadIdentity) -> None:
        self._cache[ident.pid] = ident
        self._cache.move_to_end(ident.pid)
        if len(self._cache) > self.max_entries:
            self.prune()
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    def prune(self) -> int:
        """Drop cached processes that exited or whose PID now names another process. Returns how many."""
        dead = []
        for pid, ident in self._cache.items():
            if ident.start_time is None or not self._same(pid, ident.start_time):
                dead.append(pid)
        for pid in dead:
            del self._cache[pid]
        return len(dead)
