"""Split each GPU energy slice among the workloads on the GPU, conserving energy exactly.

A stage after the ledger: the sampler hands every tick's process list and new
per-process utilisation samples to :meth:`Attributor.observe`, and every priced GPU
slice to :meth:`Attributor.account`, which divides the slice's joules and its cost
among workloads and adds them to the ledger's :class:`~.workloads.WorkloadTotals`.

The split of one slice (``t0``, ``t1``, ``joules``) of a GPU goes by who used the GPU
*during* the slice, so it does not depend on the tick length (issue 14):

1. **Who, and when.** The window is the slice's own stretch widened to ``window_seconds``:
   ``[t1 − max(window_seconds, t1 − t0), t1]``. Its process lists are the latest read at or
   before its start and every one read after it up to ``t1``, each grouped into workloads by
   identity key. Between two consecutive lists a workload on both was there throughout; one
   on the earlier list only left at its last SM sample between the two reads, else halfway
   between them; one on the later only came at its first SM sample between them, else
   halfway. The first list ever read stands for the time before it, the last list read (a
   failed read) for the time after it. A PID is charged to the workload of the latest list in
   the window that names it, so a process that exits mid-slice keeps its share under its last
   known identity. Nobody there during the whole slice: the slice goes to ``unallocated`` (idle
   waste made visible); no list read yet: to ``unknown``.
2. **The idle part**, ``min(joules, idle_watts × (t1 − t0))``, is split by time × GPU memory:
   at each moment among the workloads there, by their share of GPU memory (their figures from
   the latest list naming them; evenly where a figure is unknown or all are 0), and the time
   nobody was there to ``unallocated``. ``idle_watts`` is ``[attribution] idle_watts`` for the
   GPU when set, else the lowest polled power seen so far on a settled idle tick (utilisation 0
   on it and on the tick before), until then the lower of the model's measured idle power
   (:data:`IDLE_PRIOR_WATTS`) and the lowest power at 0 % (neither known: there is no idle part,
   and ``unallocated`` gets the slice's mean power over the time nobody was there).
3. **The active part**, the rest, is split by SM activity. Per-process SM % samples are placed
   by their own NVML timestamp (a replay served at another wall time has them moved onto the
   tick's clock). A workload's weight is the sum of its samples in the window, as a rate over
   its time there in the window, times its time there in the slice; when every workload was
   there throughout, that is the plain sum of its samples. NVML gives ~5 samples a second on
   an H100, one process per call, so one second says little; a window of seconds does. A
   workload holding memory but absent from the window's samples did no SM work in it and gets
   no active share; one that was not there during the slice gets none either. No SM activity
   at all: the whole slice goes by the idle part's weights.
4. The parts add up to the slice: the largest part is the slice minus all the others.
   The slice's cost (priced once, by the ledger, at the band in force when the energy was
   used) is split in the same proportions.

While the same processes are listed throughout the window (the common case) the split is the
one pass of :func:`split_slice` over the held samples; only a window in which processes came
or went walks its lists (:func:`_split_changing`).

On a GPU in MIG mode (NVML measures the whole GPU only; docs/attribution.md, "MIG"), the
slice is first split among the GPU instances read on the tick that ended it
(:func:`split_instances`: the idle part by compute slices, the rest by slices × GPM SM
activity; by slices alone where activity is not known for every instance), then each
instance's part among the workloads of its processes by GPU memory share (NVML gives no
per-process SM samples under MIG); an instance without processes charges its part to
``unallocated`` on that instance. The totals keys carry the instance
(:func:`~.workloads.instance_key`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Iterable, Mapping, TypeVar

from ..energy import EnergySlice
from ..exact import settle
from ..sources.gpu import GpuError, GpuNotSupported, GpuReading, MigInstance
from .identity import (
    KIND_CONTAINER,
    KIND_KUBERNETES,
    KIND_SLURM,
    KIND_SYSTEMD,
    KIND_UNKNOWN,
    KIND_USER,
    IdentityResolver,
    WorkloadIdentity,
)
from .workloads import (
    IDENTITY_LABELS,
    UNALLOCATED,
    WorkloadTotals,
    instance_key,
    pseudo_labels,
    pseudo_labels_view,
    split_key,
)

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

#: Default length of the window of per-process SM samples a slice's active part is split by. Units: s.
DEFAULT_WINDOW_SECONDS = 5.0
#: The error kind under which failed process reads are counted.
PROCESS_READ = "process_read"
#: Most ticks of history kept per GPU (process lists, samples): a bound should slices stop.
_MAX_HISTORY = 4096
#: Labels of this many workloads beyond twice those the held process lists name are kept
#: before the labels are pruned (see Attributor._prune_labels).
_LABELS_SLACK = 64

#: Most PIDs whose workload key and labels are kept built (see resolver_keys).
_MAX_KNOWN_PIDS = 4096

#: (workload key, identity labels) of a PID.
KeyOf = Callable[[int], tuple[str, Mapping[str, str]]]


# -- the arithmetic -------------------------------------------------------------------


def apportion(total: float, weights: Mapping[K, float]) -> dict[K, float]:
    """``total`` split in proportion to ``weights`` (not negative, sum > 0), adding up to ``total``.

    The largest weight's part is ``total`` minus the sum of the others, so the rounding
    remainder goes there (:class:`_Shares`, which splits many totals by one set of weights).
    """
    return _Shares(weights).split(total)


def split_slice(
    joules: float, idle_joules: float, sm: Mapping[K, float], memory: Mapping[K, int | None]
) -> dict[K, float]:
    """Divide one slice of a GPU among workloads (keys of ``memory``; needs at least one).

    ``idle_joules`` (clipped to ``[0, joules]``) goes by memory share (evenly when any
    memory figure is unknown or all are 0); the rest by ``sm`` (SM % summed over the
    window; keys absent from it did no SM work). Without any SM activity everything goes
    by memory share. The parts add up to ``joules``, the remainder on the largest.
    """
    if not memory:
        raise ValueError("no workload to split among")
    mem_w: dict[K, float]
    if all(m is not None for m in memory.values()) and sum(memory.values()) > 0:  # type: ignore[arg-type]
        mem_w = {k: float(m) for k, m in memory.items()}  # type: ignore[arg-type]
    else:
        mem_w = {k: 1.0 for k in memory}
    sm_w = {k: max(0.0, float(sm.get(k, 0.0))) for k in memory}
    if not math.fsum(sm_w.values()) > 0:
        return apportion(joules, mem_w)
    return _active_and_idle(joules, idle_joules, sm_w, mem_w)


def _active_and_idle(joules: float, idle_joules: float, active_w: Mapping[K, float],
                     idle_w: Mapping[K, float]) -> dict[K, float]:
    """``idle_joules`` (clipped to ``[0, joules]``) by ``idle_w``, the rest by ``active_w``;
    the parts add up to ``joules`` exactly, the remainder on the largest."""
    idle = min(max(idle_joules, 0.0), joules)
    parts = apportion(joules - idle, active_w)
    if idle > 0:
        for k, v in apportion(idle, idle_w).items():
            parts[k] += v
    largest = max(parts, key=lambda k: parts[k])
    settle(joules, parts, largest)
    return parts


def split_instances(
    joules: float, idle_joules: float, instances: Mapping[K, tuple[int | None, float | None]]
) -> dict[K, float]:
    """Divide one slice of a MIG GPU among its GPU instances (needs at least one).

    ``instances`` maps each instance to (compute slices or None, SM activity 0–1 or None).
    The weight of an instance is its slices (1 each when any instance's count is unknown).
    When every instance's activity is known and some instance was active, ``idle_joules``
    (clipped to ``[0, joules]``) goes by slices and the rest by slices × activity; otherwise
    everything goes by slices. The parts add up to ``joules``, the remainder on the largest.
    """
    if not instances:
        raise ValueError("no GPU instance to split among")
    if all(n is not None and n > 0 for n, _ in instances.values()):
        slices = {k: float(n) for k, (n, _) in instances.items()}  # type: ignore[arg-type]
    else:
        slices = {k: 1.0 for k in instances}
    acts = {k: a for k, (_, a) in instances.items()}
    if any(a is None for a in acts.values()):
        return apportion(joules, slices)
    active_w = {k: slices[k] * min(max(float(a), 0.0), 1.0) for k, a in acts.items()}  # type: ignore[arg-type]
    if not math.fsum(active_w.values()) > 0:
        return apportion(joules, slices)
    return _active_and_idle(joules, idle_joules, active_w, slices)


def _memory_weights(memory: Mapping[K, int | None]) -> dict[K, float]:
    """Shares of GPU memory held (fractions adding up to 1); evenly when any figure is unknown
    or all are 0."""
    if all(m is not None for m in memory.values()):
        total = float(sum(memory.values()))  # type: ignore[arg-type]
        if total > 0:
            return {k: m / total for k, m in memory.items() if m}  # type: ignore[operator]
    return {k: 1.0 / len(memory) for k in memory}


def _split_changing(s: EnergySlice, held: list[_Listing], samples: Iterable[tuple[float, int, float]],
                    start: float, idle_w: float | None) -> dict[str, float]:
    """Slice ``s`` of a GPU whose processes changed within the slice's window ``[start, t1]``.

    ``held``: the process lists of the window, oldest first (the first read at or before
    ``start`` unless none was; the last at or before ``t1``); ``samples``: (time, pid, SM %).
    Between two consecutive lists a workload on both was there throughout; one that is on the
    earlier only left at its last SM sample between them, else halfway; one on the later only
    came at its first SM sample between them, else halfway. The first list stands for the time
    before it, the last for the time after it. Each PID is charged to the workload of the latest
    list that names it, so a process that left keeps its share. Then:

    - idle weights: each workload's time in the slice, shared among those there at the same
      time by GPU memory (evenly where a figure is unknown or all are 0); the time nobody was
      there is ``unallocated``'s;
    - active weights: a workload's SM % samples in the window, as a rate over its time there in
      the window, times its time in the slice (a workload absent from the slice gets none);
    - the idle part ``idle_w × (t1 − t0)`` goes by idle weights, the rest by active weights; with
      no SM activity all of it by idle weights; without ``idle_w``, ``unallocated`` gets the
      slice's mean power over the time nobody was there and the rest goes by active weights.
    """
    t0, t1 = s.t0, s.t1
    end = t1 + 1e-6
    pids: dict[int, str] = {}
    memory: dict[str, int | None] = {}
    # Runs of consecutive lists naming the same processes (one shared pid map): [first read,
    # last read, workload → memory]. A MIG list (the mode changed within the window) names nobody
    # on the whole GPU.
    runs: list[list[Any]] = []
    prev: dict[int, str] | None = None
    for lst in held:
        keys = lst.keys if lst.mig is None else {}
        if lst.mig is None:
            pids.update(keys)
            memory.update(lst.memory)
        if runs and keys is prev:
            runs[-1][1] = lst.t
        else:
            runs.append([lst.t, lst.t, lst.memory if lst.mig is None else {}])
        prev = keys
    # The SM samples by workload: their times (to place arrivals and departures) from the first
    # list on, and their sum over the window.
    lo_t = min(held[0].t, start)
    times: dict[str, list[float]] = {}
    sm: dict[str, float] = {}
    for t, pid, pct in samples:
        if lo_t <= t <= end:
            w = pids.get(pid)
            if w is not None:
                times.setdefault(w, []).append(t)
                if start < t:
                    sm[w] = sm.get(w, 0.0) + pct

    # Stretches between reads: (from, to, workloads there at its start, at its end).
    gaps: list[tuple[float, float, Mapping[str, int | None], Mapping[str, int | None]]] = []
    if runs[0][0] > start:  # before the first list ever read: it stands for that time
        gaps.append((start, runs[0][0], runs[0][2], runs[0][2]))
    for i, (first, last, there) in enumerate(runs):
        if last > first:
            gaps.append((first, last, there, there))
        if i + 1 < len(runs):
            gaps.append((last, runs[i + 1][0], there, runs[i + 1][2]))
    if runs[-1][1] < t1:  # after the last list read (a failed read): it stands in
        gaps.append((runs[-1][1], t1, runs[-1][2], runs[-1][2]))

    in_window: dict[str, float] = {}
    in_slice: dict[str, float] = {}
    occupied: dict[str, float] = {}
    nobody = 0.0
    for a_t, b_t, before, after in gaps:
        if not b_t > a_t:
            continue
        if before is after:
            spans = [(w, a_t, b_t) for w in before]
        else:
            half = 0.5 * (a_t + b_t)
            spans = []
            for w in before:
                if w in after:
                    spans.append((w, a_t, b_t))
                else:  # left between the two reads: at its last SM sample between them, else halfway
                    last_t = max((t for t in times.get(w, ()) if a_t < t <= b_t), default=half)
                    spans.append((w, a_t, last_t))
            for w in after:
                if w not in before:  # came between the two reads: at its first SM sample, else halfway
                    first_t = min((t for t in times.get(w, ()) if a_t <= t < b_t), default=half)
                    spans.append((w, first_t, b_t))
        for w, u, v in spans:
            v = min(v, t1)
            if v > u:
                if v > start:
                    in_window[w] = in_window.get(w, 0.0) + (v - max(u, start))
                if v > t0:
                    in_slice[w] = in_slice.get(w, 0.0) + (v - max(u, t0))
        lo, hi = max(a_t, t0), min(b_t, t1)
        if not hi > lo:
            continue
        cuts = sorted({lo, hi, *(x for _, u, v in spans for x in (u, v) if lo < x < hi)})
        for x, y in zip(cuts, cuts[1:]):
            mid = 0.5 * (x + y)
            here = [w for w, u, v in spans if u <= mid <= v]
            if not here:
                nobody += y - x
                continue
            mem = [memory.get(w) for w in here]
            total = sum(m for m in mem if m is not None)
            if all(m is not None for m in mem) and total > 0:
                for w, m in zip(here, mem):
                    occupied[w] = occupied.get(w, 0.0) + (y - x) * m / total  # type: ignore[operator]
            else:
                for w in here:
                    occupied[w] = occupied.get(w, 0.0) + (y - x) / len(here)
    if not occupied:
        return {UNALLOCATED: s.joules}  # nobody held the GPU during the slice
    weights = dict(occupied)
    if nobody > 0:
        weights[UNALLOCATED] = nobody
    active = {k: 0.0 for k in weights}
    for w in occupied:
        if sm.get(w, 0.0) > 0 and in_slice.get(w, 0.0) > 0 and in_window.get(w, 0.0) > 0:
            active[w] = sm[w] * (in_slice[w] / in_window[w])
    if not math.fsum(active.values()) > 0:
        return apportion(s.joules, weights)
    dt = t1 - t0
    if idle_w is not None:
        return _active_and_idle(s.joules, idle_w * dt, active, weights)
    if nobody > 0:
        return _active_and_idle(s.joules, s.joules * nobody / dt, active, {UNALLOCATED: 1.0})
    return _active_and_idle(s.joules, 0.0, active, weights)


class _Shares(Generic[K]):
    """:func:`apportion` for many totals by the same weights: the order and fractions worked out
    once, each total then split in one pass (a tick splits a GPU's every cost kind and its
    seconds by the same holders)."""

    __slots__ = ("order", "fractions")

    def __init__(self, weights: Mapping[K, float]) -> None:
        s = math.fsum(weights.values())
        if not s > 0:
            raise ValueError("weights must have a positive sum")
        self.order = sorted(weights, key=lambda k: -weights[k])
        self.fractions = [weights[k] / s for k in self.order[1:]]

    def split(self, total: float) -> dict[K, float]:
        """``total`` by the weights, the parts adding up to it exactly (the rest on the largest)."""
        first, rest = self.order[0], self.order[1:]
        if not rest:
            return {first: total}
        parts = {k: total * f for k, f in zip(rest, self.fractions)}
        parts[first] = 0.0
        settle(total, parts, first)
        return parts


# -- identities -----------------------------------------------------------------------


def workload_key(ident: WorkloadIdentity) -> str:
    """The identity key of a process's workload (contract of issue 9)."""
    k = ident.kind
    if k == KIND_KUBERNETES and ident.pod_uid:
        return f"pod:{ident.pod_uid}"
    if k == KIND_CONTAINER and ident.container_id:
        return f"container:{ident.container_id}"
    if k == KIND_SLURM and (ident.slurm_job_id or ident.slurm_sluid):
        return f"slurm:{ident.slurm_job_id or ident.slurm_sluid}"
    if k == KIND_SYSTEMD and ident.systemd_unit:
        return f"unit:{ident.systemd_unit}"
    if k == KIND_USER and ident.uid is not None:
        return f"user:{ident.uid}"
    return KIND_UNKNOWN


def identity_labels(ident: WorkloadIdentity) -> dict[str, str]:
    """The exported identity labels of a process; "" where not known.

    ``user`` is the user name, or the uid where there is no name (no NSS entry, or
    ``user_names = false``). ``namespace`` and ``pod`` come from the kubelet, not from
    ``/proc``: "" here.
    """
    user = ident.user or (str(ident.uid) if ident.uid is not None else "")
    if ident.kind == KIND_UNKNOWN:
        user = ""
    return {
        "kind": ident.kind,
        "user": user,
        "slurm_job": ident.slurm_job_id or ident.slurm_sluid or "",
        "container": ident.container_id or "",
        "pod_uid": ident.pod_uid or "",
        "namespace": "",
        "pod": "",
        "unit": ident.systemd_unit or "",
    }


#: Not an identity label: the command line of the workload's process, only with ``[attribution]
#: cmdline = true``, exported on its own info family (gpucost_workload_command_info).
COMMAND = "command"


def resolver_keys(resolver: IdentityResolver) -> KeyOf:
    """Workloads of live PIDs, from ``/proc`` through ``resolver``."""

    #: pid → (the identity the resolver gave, its key, its labels): a cached process is the same
    #: identity object on every tick, so its key and labels are built once, not per tick.
    known: dict[int, tuple[WorkloadIdentity, str, Mapping[str, str]]] = {}

    def key_of(pid: int) -> tuple[str, Mapping[str, str]]:
        ident = resolver.resolve(pid)
        hit = known.get(pid)
        if hit is not None and hit[0] is ident:
            return hit[1], hit[2]
        labels = identity_labels(ident)
        if ident.cmdline:
            labels[COMMAND] = ident.cmdline
        key = workload_key(ident)
        if len(known) >= _MAX_KNOWN_PIDS:
            known.clear()
        known[pid] = (ident, key, labels)
        return key, labels

    return key_of


def replay_keys(pid: int) -> tuple[str, Mapping[str, str]]:
    """Workloads of replayed PIDs: ``pid:<pid>``, kind ``unknown``.

    A trace's PIDs are the recording machine's, not this one's: looking them up in this
    machine's ``/proc`` would name whatever process has that PID here. Traces do not
    carry identity facts yet.
    """
    return f"pid:{pid}", pseudo_labels(KIND_UNKNOWN)


def recorded_keys(identities: Mapping[int, Mapping[str, Any]]) -> KeyOf:
    """Workloads of replayed PIDs from the identity facts the recorder wrote (``identities``
    in the trace); a PID without facts falls back to :func:`replay_keys`."""

    def key_of(pid: int) -> tuple[str, Mapping[str, str]]:
        facts = identities.get(pid)
        if not facts:
            return replay_keys(pid)
        labels = {name: "" for name in IDENTITY_LABELS}
        labels.update({k: str(v) for k, v in (facts.get("labels") or {}).items() if k in labels})
        return str(facts.get("workload") or f"pid:{pid}"), labels

    return key_of


# -- per GPU ----------------------------------------------------------------------------


@dataclass
class _Instance:
    """One MIG GPU instance as read on one tick, its processes grouped into workloads."""

    #: Compute slices of the instance (the 3 of ``3g.40gb``); None unknown.
    slices: int | None
    #: GPM SM activity of the instance since the previous tick, 0–1; None unknown.
    activity: float | None
    #: workload key → GPU memory (bytes; None when NVML did not give it for every process)
    memory: dict[str, int | None]


@dataclass
class _Listing:
    """The process list read on one tick, grouped into workloads."""

    t: float
    #: pid → workload key
    keys: dict[int, str]
    #: workload key → GPU memory (bytes; None when NVML did not give it for every process)
    memory: dict[str, int | None]
    #: GPU in MIG mode: GPU instance id → that instance (``memory`` is then empty); None: no MIG.
    mig: dict[int, _Instance] | None = None


@dataclass
class _ProcessRead:
    """One GPU's process reads in one tick: answers or errors, as the source gave them."""

    procs: list[tuple[int, int | None]] | None = None
    procs_error: GpuError | None = None
    samples: list[tuple[int, int, int, int]] | None = None
    samples_error: GpuError | None = None
    #: The GPU's MIG instances (None: not in MIG mode, or not asked).
    mig: list[MigInstance] | None = None
    mig_error: GpuError | None = None
    #: The source's own clock when it was read, where it has one (a replay: trace seconds, the
    #: clock of its sample timestamps); None for a live GPU, whose NVML timestamps are this
    #: host's Unix clock, the tick's wall clock.
    source_now: float | None = None


#: Idle power of a GPU model measured without a CUDA context, used until the GPU itself has shown
#: a settled idle reading (see ``_Gpu.idle_watts``): only models measured for this project.
#: H100 80GB HBM3: 70 W (shared/reference/h100: 70 W with no context, ~116-122 W with one open).
#: Units: W.
IDLE_PRIOR_WATTS: dict[str, float] = {"NVIDIA H100 80GB HBM3": 70.0}


@dataclass
class _Gpu:
    index: int
    uuid: str
    idle_override: float | None = None
    #: The model's idle power from :data:`IDLE_PRIOR_WATTS`, if it has one. Units: W.
    idle_prior: float | None = None
    #: Lowest polled power on a tick with GPU utilisation 0 whose previous tick also read 0
    #: (the reading, an average over the last second, lies wholly in an idle stretch). Units: W.
    idle_seen: float | None = None
    #: Lowest polled power on any tick with GPU utilisation 0, settled or not: after a load the
    #: average lags (130-165 W for seconds on the reference H100). Units: W.
    idle_unsettled: float | None = None
    #: Whether the previous tick's reading had GPU utilisation 0.
    was_idle: bool = False
    listings: deque[_Listing] = field(default_factory=lambda: deque(maxlen=_MAX_HISTORY))
    #: (the sample's own NVML timestamp in s since the epoch, pid, SM %), in reading order (which is
    #: timestamp order: each read returns only samples newer than the newest one before).
    samples: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=_MAX_HISTORY * 8))
    util_seen_us: int = 0
    lists_supported: bool = True
    util_supported: bool = True
    #: Whether the source can say if the GPU is in MIG mode (False once it answered NotSupported).
    mig_supported: bool = True
    #: Whether the GPU was in MIG mode at its latest successful MIG read.
    in_mig: bool = False

    @property
    def idle_watts(self) -> float | None:
        """``[attribution] idle_watts`` when set; else the lowest settled idle reading; else the
        lower of the model's prior and the lowest unsettled one (either when only one is known)."""
        if self.idle_override is not None:
            return self.idle_override
        if self.idle_seen is not None:
            return self.idle_seen
        known = [w for w in (self.idle_prior, self.idle_unsettled) if w is not None]
        return min(known) if known else None

    def observe_power(self, watts: float | None, util: float | None) -> None:
        """One tick's polled power and GPU utilisation, for the idle estimate."""
        idle = watts is not None and util == 0
        if idle:
            if self.was_idle and (self.idle_seen is None or watts < self.idle_seen):
                self.idle_seen = watts
            if self.idle_unsettled is None or watts < self.idle_unsettled:
                self.idle_unsettled = watts
        self.was_idle = idle

    def listing_at(self, t: float) -> _Listing | None:
        """The process list of the latest tick not after ``t``."""
        best = None
        for lst in reversed(self.listings):
            if lst.t <= t + 1e-6:
                best = lst
                break
        return best

    def prune(self, before: float) -> None:
        """Forget what no later slice can need: what was read before ``before``
        (keeping the latest process list from before it)."""
        while self.samples and self.samples[0][0] < before:
            self.samples.popleft()
        while len(self.listings) > 1 and self.listings[1].t <= before:
            self.listings.popleft()


class Attributor:
    """Splits the node's GPU energy slices among workloads into ``totals``."""

    def __init__(
        self,
        totals: WorkloadTotals,
        key_of: KeyOf,
        *,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        idle_watts: float | Mapping[str, float] | None = None,
        on_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.totals = totals
        self.key_of = key_of
        #: Attributing a replayed trace (set by from_settings): only log levels depend on it.
        self.replay = False
        self.window_seconds = window_seconds
        self.idle_watts = idle_watts
        self.on_error = on_error
        self._gpus: dict[int, _Gpu] = {}
        #: workload key → identity labels of the process that last mapped to it; pruned to the
        #: workloads the held process lists name once it outgrows ``_labels_limit``
        self._labels: dict[str, Mapping[str, str]] = {}
        self._labels_limit = _LABELS_SLACK
        #: Newest slice end charged this tick (see end_tick).
        self._newest: float | None = None
        #: Where pod names come from: a callable giving GPU (or MIG device) UUID → the pod
        #: containers holding it (the kubelet's pod-resources API), or None.
        self.pods: Callable[[], Mapping[str, tuple[Any, ...]]] | None = None
        #: Its latest answer (refreshed by :meth:`refresh_pods`, off the tick).
        self._pod_map: Mapping[str, tuple[Any, ...]] = {}
        self._pod_error: str | None = None

    def refresh_pods(self) -> None:
        """Ask the kubelet which pods hold which GPUs (a slow job of its own, never the tick).

        On failure the previous answer stays in use; the failure is logged once per change.
        """
        if self.pods is None:
            return
        try:
            answer = self.pods()
        except Exception as exc:  # a kubelet restart, a timeout: keep the last map
            why = str(exc)
            if why != self._pod_error:
                log.warning("pod names from the kubelet: %s; keeping the previous answer", why)
            self._pod_error = why
            self.on_error(PROCESS_READ)
            return
        if self._pod_error is not None:
            log.info("pod names from the kubelet: answering again")
        self._pod_error = None
        self._pod_map = dict(answer)

    def _with_pod_names(self, uuid: str, labels: Mapping[str, str]) -> Mapping[str, str]:
        """A pod's process on GPU ``uuid``: namespace and pod name from the pod that holds the GPU.

        Only when exactly one pod holds it: with time-slicing or MPS several pods share a GPU and
        the kubelet's answer does not say which PID is whose (it names no pod UID), so the names
        stay empty rather than guessed.
        """
        if labels.get("kind") != KIND_KUBERNETES or labels.get("pod"):
            return labels
        holders = {(h.namespace, h.pod) for h in self._pod_map.get(uuid, ())}
        if len(holders) != 1:
            return labels
        namespace, pod = holders.pop()
        return {**labels, "namespace": namespace, "pod": pod}

    def bind(self, devices: Iterable[Any], on_error: Callable[[str], None] | None = None) -> None:
        """The GPUs to attribute (:class:`~agent.sources.gpu.GpuInfo`)."""
        if on_error is not None:
            self.on_error = on_error
        for d in devices:
            self._gpus[d.index] = _Gpu(d.index, d.uuid, self._idle_override(d.index, d.uuid),
                                       IDLE_PRIOR_WATTS.get(getattr(d, "name", "") or ""))

    def _idle_override(self, index: int, uuid: str) -> float | None:
        w = self.idle_watts
        if w is None or isinstance(w, (int, float)):
            return float(w) if w is not None else None
        for key in (uuid, str(index)):
            if key in w:
                return float(w[key])
        return w.get("default")

    def idle_watts_of(self, index: int) -> float | None:
        return self._gpus[index].idle_watts

    # -- per tick -----------------------------------------------------------

    def fetch(self, source: Any, index: int) -> _ProcessRead | None:
        """The GPU's process list and its per-process samples newer than the last seen; on a
        GPU in MIG mode its MIG instances (with their processes) instead.

        Source calls only (run on the sampler's GPU worker thread, under its deadline);
        what they answered is applied by :meth:`observe` on the tick's thread.
        """
        g = self._gpus.get(index)
        if g is None:
            return None
        read = _ProcessRead()
        now = getattr(source, "t", None)
        if isinstance(now, (int, float)):
            read.source_now = float(now)
        if g.mig_supported:
            ask = getattr(source, "mig_instances", None)
            try:
                if ask is None:
                    raise GpuNotSupported("mig_instances")
                read.mig = ask(index)
            except GpuError as exc:  # GpuNotSupported included
                read.mig_error = exc
            if read.mig is not None or (read.mig_error is not None and g.in_mig):
                return read  # MIG: the instances carry the processes
        if not g.lists_supported:
            return read if read.mig_error is not None else None
        try:
            read.procs = source.processes(index)
        except GpuError as exc:  # GpuNotSupported included
            read.procs_error = exc
            return read
        if g.util_supported:
            try:
                read.samples = source.process_utilization(index, g.util_seen_us)
            except GpuError as exc:
                read.samples_error = exc
        return read

    def observe(self, index: int, wall: float, reading: GpuReading | None, read: _ProcessRead | None) -> None:
        """Apply one tick's process reads (from :meth:`fetch`) for the tick at ``wall``."""
        g = self._gpus.get(index)
        if g is None:
            return
        if reading is not None:
            g.observe_power(reading.power_watts, reading.utilization_gpu_ratio)
        if read is None:
            return
        if isinstance(read.mig_error, GpuNotSupported):
            g.mig_supported = False
        elif read.mig_error is not None:
            self.on_error(PROCESS_READ)
            log.debug("GPU %d: MIG read failed: %s", index, read.mig_error)
            if g.in_mig:
                return  # the latest MIG listing stays in force
        elif read.mig is not None:
            if not g.in_mig:
                log.info("GPU %d is in MIG mode: its energy is split among its GPU instances", index)
            g.in_mig = True
            g.listings.append(self._mig_listing(wall, read.mig))
            return
        elif g.mig_supported:
            g.in_mig = False
        if isinstance(read.procs_error, GpuNotSupported):
            if g.lists_supported:
                g.lists_supported = False
                # A live GPU without one is worth a warning; a trace recorded without one is not.
                log.log(logging.INFO if self.replay else logging.WARNING,
                        "GPU %d: no process list (not supported by the driver, or not in the trace); "
                        "its energy is not attributed to workloads", index)
            return
        if read.procs_error is not None:
            self.on_error(PROCESS_READ)
            log.debug("GPU %d: process list failed: %s", index, read.procs_error)
        elif read.procs is not None:
            lst = self._listing(wall, read.procs, g.uuid)
            prev = g.listings[-1] if g.listings else None
            if prev is not None and prev.mig is None and prev.keys == lst.keys:
                lst.keys = prev.keys  # the same processes: one shared map, so split sees "no change" by identity
            g.listings.append(lst)
        if isinstance(read.samples_error, GpuNotSupported):
            if g.util_supported:
                g.util_supported = False
                log.info("GPU %d: no per-process utilisation; energy is split by GPU memory", index)
        elif read.samples_error is not None:
            self.on_error(PROCESS_READ)
            log.debug("GPU %d: process utilisation failed: %s", index, read.samples_error)
        elif read.samples is not None:
            # Each sample is placed by its own time, on the tick's wall clock: a replay served at
            # another wall time (a looping demo is priced at today's) is shifted by the difference.
            shift = wall - read.source_now if read.source_now is not None else 0.0
            for pid, ts, sm, _mem in read.samples:
                g.samples.append((ts / 1e6 + shift, pid, float(sm)))
                g.util_seen_us = max(g.util_seen_us, ts)

    def _listing(self, wall: float, procs: list[tuple[int, int | None]], uuid: str = "") -> _Listing:
        keys: dict[int, str] = {}
        memory: dict[str, int | None] = {}
        for pid, used in procs:
            key, labels = self.key_of(pid)
            if self._pod_map:
                labels = self._with_pod_names(uuid, labels)
            keys[pid] = key
            self._labels[key] = labels
            if key in memory:
                prev = memory[key]
                memory[key] = prev + used if (prev is not None and used is not None) else None
            else:
                memory[key] = used
        return _Listing(wall, keys, memory)

    def _mig_listing(self, wall: float, instances: list[MigInstance]) -> _Listing:
        keys: dict[int, str] = {}
        mig: dict[int, _Instance] = {}
        for inst in instances:
            # Pods hold MIG devices (compute instances): their names are known where the
            # instance is one MIG device, as the device plugin's default "mixed" strategy makes.
            cis = [c.uuid for c in inst.compute_instances]
            sub = self._listing(wall, list(inst.processes), cis[0] if len(cis) == 1 else "")
            keys.update(sub.keys)
            slices = inst.slices
            if slices is None:  # the GPU instance's slices, else its compute instances' together
                counts = [c.compute_slices for c in inst.compute_instances]
                if counts and all(n is not None for n in counts):
                    slices = sum(counts)  # type: ignore[arg-type]
            mig[inst.gpu_instance] = _Instance(slices, inst.sm_activity, sub.memory)
        return _Listing(wall, keys, {}, mig)

    # -- per slice ------------------------------------------------------------

    def account(self, index: int, priced: Iterable[tuple[EnergySlice, float | None]], currency: str | None) -> None:
        """Split priced slices of GPU ``index`` (each with its cost, or None) into the totals."""
        g = self._gpus.get(index)
        if g is None or not (g.lists_supported or g.in_mig):
            return
        newest = None
        for s, cost in priced:
            self._account_one(g, s, cost, currency)
            newest = s.t1 if newest is None else max(newest, s.t1)
        if newest is not None:
            g.prune(newest - self.window_seconds - 1.0)
            self._newest = newest if self._newest is None else max(self._newest, newest)

    def end_tick(self) -> None:
        """After every charge of a tick (energy and capacity), before its snapshot: retention
        (up to the newest slice charged) and the series bound, once for the node (both scan
        every workload). The bound runs every tick, so a workload beyond it is folded into
        ``other`` before any snapshot has shown it (capacity is charged every tick, energy at
        counter reads)."""
        if self._newest is not None:
            self.totals.expire(self._newest)
            self._newest = None
        self.totals.enforce_max()
        if len(self._labels) > self._labels_limit:
            self._prune_labels()

    def _prune_labels(self) -> None:
        """Forget the labels of workloads that no held process list names. Labels are looked up
        only for the workloads of a listing a slice is split by, and listings older than the SM
        window are dropped (``_Gpu.prune``), so those can never be asked for again; a workload
        that comes back is labelled afresh by its next listing. Exported labels live in the
        totals, with their own retention. Run when the map has doubled since the last prune
        (plus a slack), so the scan of the held listings costs O(1) per new workload."""
        named: set[str] = set()
        for g in self._gpus.values():
            for lst in g.listings:
                named.update(lst.memory)
                for inst in (lst.mig or {}).values():
                    named.update(inst.memory)
        self._labels = {k: v for k, v in self._labels.items() if k in named}
        self._labels_limit = 2 * len(self._labels) + _LABELS_SLACK

    def split(self, index: int, s: EnergySlice) -> dict[str, float]:
        """How slice ``s`` of GPU ``index`` divides among workload keys (joules)."""
        g = self._gpus[index]
        last = g.listing_at(s.t1)
        if last is None:
            return {KIND_UNKNOWN: s.joules}  # no process list read yet: who used it is not known
        if last.mig is not None:
            return self._split_mig(g, last.mig, s)
        dt = s.t1 - s.t0
        start = s.t1 - max(self.window_seconds, dt)
        end = s.t1 + 1e-6
        # The process lists of the window, newest first: every one read up to t1, back to the
        # latest read at or before the window's start. Steady: all of them list the same
        # processes (observe shares one pid map between such lists), so each was there throughout.
        held: list[_Listing] = []
        steady = True
        for lst in reversed(g.listings):
            if lst.t > end:
                continue  # read after the slice (a slice settled late)
            held.append(lst)
            steady = steady and lst.keys is last.keys
            if lst.t <= start:
                break
        idle_w = g.idle_watts
        if steady or not dt > 0:
            if not last.memory:
                return {UNALLOCATED: s.joules}
            sm: dict[str, float] = {}
            for t, pid, pct in g.samples:  # one pass, no copies; the window holds seconds of samples
                if start < t <= end:
                    key = last.keys.get(pid)
                    if key is not None:  # a PID never listed cannot be charged by identity
                        sm[key] = sm.get(key, 0.0) + pct
            return split_slice(s.joules, idle_w * dt if idle_w is not None else 0.0, sm, last.memory)
        held.reverse()
        return _split_changing(s, held, g.samples, start, idle_w)

    def _split_mig(self, g: _Gpu, instances: Mapping[int, _Instance], s: EnergySlice) -> dict[str, float]:
        """How slice ``s`` of a GPU in MIG mode divides among (workload, GPU instance) totals keys."""
        if not instances:
            return {UNALLOCATED: s.joules}  # MIG mode without any GPU instance
        idle_w = g.idle_watts
        idle_j = idle_w * (s.t1 - s.t0) if idle_w is not None else 0.0
        per_gi = split_instances(s.joules, idle_j, {gi: (x.slices, x.activity) for gi, x in instances.items()})
        out: dict[str, float] = {}
        for gi, joules in per_gi.items():
            memory = instances[gi].memory
            if not memory:
                out[instance_key(UNALLOCATED, gi)] = joules
                continue
            for key, part in split_slice(joules, 0.0, {}, memory).items():
                out[instance_key(key, gi)] = part
        largest = max(out, key=lambda k: out[k])
        settle(s.joules, out, largest)
        return out

    # -- capacity ---------------------------------------------------------------

    def charge_capacity(
        self, t: float, seconds: float, capacity: Mapping[str, Mapping[tuple[str, str], float]]
    ) -> dict[str, float]:
        """Charge the tick's capacity cost and seconds to whoever held each GPU at ``t``.

        ``capacity``: :meth:`agent.accounting.Ledger.take_capacity`'s answer — per GPU uuid its
        own amounts, under :data:`~agent.accounting.NODE` the node's — (cost kind, currency) →
        amount. The node's amounts are shared equally by the node's GPUs; each GPU's total,
        and the ``seconds`` of the tick, go to the workloads holding it (:meth:`holders`).
        Every amount handed in is charged once: the parts add up to it exactly. A GPU that
        cannot list its processes is not attributed (as its energy is not): the node's
        amounts are shared by the others.

        Returns GPU uuid → the seconds workloads held it (``unallocated`` and ``unknown`` aside).
        """
        busy: dict[str, float] = {}
        gpus = [g for g in self._gpus.values() if g.lists_supported or g.in_mig]
        if not gpus:
            return busy
        node = capacity.get("", {})
        per_gpu: dict[str, dict[tuple[str, str], float]] = {g.uuid: dict(capacity.get(g.uuid, {})) for g in gpus}
        if node:
            even = _Shares({g.uuid: 1.0 for g in gpus})
            for kc, amount in node.items():
                for uuid, share in even.split(amount).items():
                    mine = per_gpu[uuid]
                    mine[kc] = mine.get(kc, 0.0) + share
        for g in gpus:
            amounts = per_gpu[g.uuid]
            if not amounts and seconds <= 0:
                continue
            shares = _Shares(self.holders(g.index, t))  # one set of weights for every amount of the GPU
            held = shares.split(seconds)
            parts: dict[str, dict[tuple[str, str], float]] = {k: {} for k in held}
            for kc, amount in amounts.items():
                for key, part in shares.split(amount).items():
                    parts[key][kc] = part
            for key, mine in parts.items():
                self.totals.charge_capacity(g.uuid, key, self._labels_of(key), held[key], mine, t)
            busy[g.uuid] = math.fsum(v for k, v in held.items() if split_key(k)[0] not in (UNALLOCATED, KIND_UNKNOWN))
        return busy

    def holders(self, index: int, t: float) -> dict[str, float]:
        """Who holds GPU ``index`` at ``t``, as totals key → weight (positive): the workloads of
        the latest process list by GPU memory share (evenly when a figure is unknown); on MIG
        each GPU instance by its compute slices, then its workloads by memory share (an
        instance without processes: ``unallocated`` on it); nobody: ``unallocated``; no list
        read yet: ``unknown``."""
        g = self._gpus[index]
        listing = g.listing_at(t)
        if listing is None:
            return {KIND_UNKNOWN: 1.0}
        if listing.mig is not None:
            if not listing.mig:
                return {UNALLOCATED: 1.0}
            sizes = {gi: float(x.slices) if x.slices else 1.0 for gi, x in listing.mig.items()}
            out: dict[str, float] = {}
            for gi, x in listing.mig.items():
                if not x.memory:
                    out[instance_key(UNALLOCATED, gi)] = sizes[gi]
                    continue
                for key, w in _memory_weights(x.memory).items():
                    out[instance_key(key, gi)] = sizes[gi] * w
            return out
        if not listing.memory:
            return {UNALLOCATED: 1.0}
        return _memory_weights(listing.memory)

    def _labels_of(self, key: str) -> Mapping[str, str]:
        base = split_key(key)[0]
        if base in (UNALLOCATED, KIND_UNKNOWN):
            return pseudo_labels_view(base)
        return self._labels.get(base) or pseudo_labels_view(KIND_UNKNOWN)

    def _account_one(self, g: _Gpu, s: EnergySlice, cost: float | None, currency: str | None) -> None:
        parts = self.split(g.index, s)
        costs: dict[str, float] = {}
        if cost is not None and s.joules > 0:
            weights = {k: v for k, v in parts.items() if v > 0}
            costs = apportion(cost, weights) if weights else {}
        for key, joules in parts.items():
            base = split_key(key)[0]
            labels = pseudo_labels_view(base) if base == UNALLOCATED else (
                self._labels.get(base) or pseudo_labels_view(KIND_UNKNOWN))
            self.totals.charge(g.uuid, key, labels, joules, costs.get(key, 0.0 if cost is not None else None),
                               currency, s.t1)


def from_settings(
    settings: Any, totals: WorkloadTotals, *, replay: bool, identities: Mapping[int, Mapping[str, Any]] | None = None
) -> Attributor | None:
    """The attribution stage configured by ``settings.attribution``; None when switched off.

    Live, PIDs are resolved through ``/proc``; in a replay they are the recording machine's:
    their identities come from the facts the recorder wrote, else each PID becomes its own
    ``pid:<pid>`` workload of kind ``unknown``.
    """
    a = getattr(settings, "attribution", None)
    if a is None or not a.enabled:
        return None
    totals.configure(a.max_workloads, a.retention_seconds)
    if replay:
        key_of: KeyOf = recorded_keys(identities) if identities else replay_keys
    else:
        key_of = resolver_keys(IdentityResolver(a.proc_root, user_names=a.user_names, cmdline=a.cmdline))
    stage = Attributor(totals, key_of, window_seconds=a.window_seconds, idle_watts=a.idle_watts)
    stage.replay = replay
    if a.pod_resources and not replay:
        from .podresources import PodResourcesClient

        client = PodResourcesClient(a.pod_resources_socket)
        if client.available:
            stage.pods = client.gpu_devices
    return stage
