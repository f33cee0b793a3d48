"""Per-workload totals: each GPU's energy and cost, split among the workloads that used it.

Cost comes in three kinds (``cost_kind``): ``energy`` (the GPU's energy as the split gives
it, plus the GPU's share of the node's host and ``other`` energy), ``hardware`` and
``running`` (the GPU's amortisation and running costs plus its share of the node's), the
latter two charged by GPU time held (agent.attribution.split, "Capacity"). Seconds held
are kept too: per GPU they add up to the time the agent counted.

Keyed by (GPU UUID, workload key). Workload keys (see docs/attribution.md): ``pod:<uid>``,
``container:<id>``, ``slurm:<job>``, ``unit:<unit>``, ``user:<uid>``, ``unknown``,
``pid:<pid>`` (replays only), and the pseudo-workloads ``unallocated`` (energy of a GPU
with no process) and ``other`` (workloads merged beyond ``max_workloads``).

On a MIG GPU a workload is charged per GPU instance: its totals key is
``<workload>#gi<id>`` (:func:`instance_key`), exported as ``workload`` and ``gpu_instance``
(``"#"`` occurs in no workload key: unit names, ids and uids never hold it).

Cardinality is bounded two ways:

- **retention**: a workload not charged for ``retention_seconds`` is dropped (its last
  value has been exported that long, so Prometheus saw it); its joules stay inside the
  GPU's own total, which never shrinks.
- **max_workloads**: beyond that many workloads charged on the node (``other`` and
  ``unallocated`` not counted), the smallest are folded into their GPU's ``other``
  (:meth:`WorkloadTotals.enforce_max`): their later use goes to ``other`` until they have not
  been seen for ``retention_seconds``; what they were charged before moves into ``other`` only
  if no snapshot has shown it, else it stays in their own series until it expires (moved, a
  scraper would count it twice). Per GPU the workloads still add up.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

from .. import statecheck

UNALLOCATED = "unallocated"
#: Cost kinds (the same as agent.accounting's, which imports this module).
ENERGY, HARDWARE, RUNNING = "energy", "hardware", "running"
COST_KINDS = (ENERGY, HARDWARE, RUNNING)
OTHER = "other"
#: Pseudo-workloads: not counted against ``max_workloads``.
PSEUDO = (UNALLOCATED, OTHER)

#: Identity labels of a workload, besides gpu, uuid, gpu_instance and workload (contract of issue 9).
IDENTITY_LABELS = ("kind", "user", "slurm_job", "container", "pod_uid", "namespace", "pod", "unit")

DEFAULT_MAX_WORKLOADS = 100
DEFAULT_RETENTION_SECONDS = 300.0

Key = tuple[str, str]  # (gpu uuid, workload key)


#: Between a workload key and its MIG GPU instance in a totals key.
_GI = "#gi"


def instance_key(key: str, gpu_instance: int | str) -> str:
    """The totals key of workload ``key`` on MIG GPU instance ``gpu_instance``."""
    return f"{key}{_GI}{gpu_instance}"


@lru_cache(maxsize=4096)
def split_key(key: str) -> tuple[str, str]:
    """(workload key, GPU instance id or "") of a totals key. Cached: asked for every key at
    every tick (rows, enforce_max), while the keys change only when workloads come and go."""
    base, sep, gi = key.rpartition(_GI)
    return (base, gi) if sep and gi.isdigit() else (key, "")


def pseudo_labels(key: str) -> dict[str, str]:
    """Labels of ``unallocated`` and ``other``: the kind says which, nothing else is known."""
    return {name: (key if name == "kind" else "") for name in IDENTITY_LABELS}


@lru_cache(maxsize=16)
def pseudo_labels_view(key: str) -> Mapping[str, str]:
    """:func:`pseudo_labels`, built once and read-only: handed to :meth:`WorkloadTotals.charge`
    with every slice charged to ``unallocated``."""
    return MappingProxyType(pseudo_labels(key))


@dataclass(frozen=True)
class WorkloadRow:
    """One workload on one GPU, as exported."""

    uuid: str
    workload: str
    labels: Mapping[str, str]
    energy_joules: float
    #: currency → cost of the ``energy`` kind
    cost: Mapping[str, float]
    #: The MIG GPU instance id; "" without MIG.
    gpu_instance: str = ""
    #: (cost kind, currency) → cost: every kind, fully loaded
    costs: Mapping[tuple[str, str], float] = field(default_factory=dict)
    #: Seconds the workload held the GPU (shared seconds split as the capacity cost is). Units: s.
    seconds: float = 0.0


class WorkloadTotals:
    """Energy (J), cost (by kind and currency) and seconds held per (GPU UUID, workload key).
    Held by the ledger."""

    def __init__(
        self, max_workloads: int = DEFAULT_MAX_WORKLOADS, retention_seconds: float = DEFAULT_RETENTION_SECONDS
    ) -> None:
        self.max_workloads = max_workloads
        self.retention_seconds = retention_seconds
        self.energy: dict[Key, float] = defaultdict(float)
        #: (uuid, workload key, cost kind, currency) → currency units
        self.cost: dict[tuple[str, str, str, str], float] = defaultdict(float)
        #: (uuid, workload key) → seconds held
        self.seconds: dict[Key, float] = defaultdict(float)
        self.labels: dict[Key, dict[str, str]] = {}
        self.last_seen: dict[Key, float] = {}
        #: Workloads folded into ``other``, with when they were last seen.
        self.merged: dict[Key, float] = {}
        #: Workloads that appeared since the last :meth:`frozen_rows`: no snapshot, so no
        #: scrape, has shown them yet (a loaded state's workloads count as shown).
        self.unshown: set[Key] = set()
        #: Per-job records (agent/jobrecords.py): called as ``on_expire(self, keys)`` with the
        #: workloads :meth:`expire` is about to drop, before they are dropped. Must not raise.
        self.on_expire: Callable[["WorkloadTotals", list[Key]], None] | None = None

    def configure(self, max_workloads: int, retention_seconds: float) -> None:
        self.max_workloads = max_workloads
        self.retention_seconds = retention_seconds

    def __len__(self) -> int:
        return len(self.energy)

    # -- charging ---------------------------------------------------------

    def charge(
        self,
        uuid: str,
        key: str,
        labels: Mapping[str, str],
        joules: float,
        cost: float | None,
        currency: str | None,
        t: float,
    ) -> None:
        """Add ``joules`` (and their ``cost``, of kind ``energy``) used at wall time ``t`` to a workload."""
        k = self._key(uuid, key, t)
        if k[1] == OTHER:
            labels = pseudo_labels_view(OTHER)
        self.energy[k] += joules
        if cost is not None and currency:
            self.cost[(k[0], k[1], ENERGY, currency)] += cost
        self._label(k, labels, t)

    def charge_capacity(
        self, uuid: str, key: str, labels: Mapping[str, str], seconds: float,
        amounts: Mapping[tuple[str, str], float], t: float,
    ) -> None:
        """Add ``seconds`` held and capacity ``amounts`` ((cost kind, currency) → amount) at wall
        time ``t`` to a workload."""
        k = self._key(uuid, key, t)
        if k[1] == OTHER:
            labels = pseudo_labels_view(OTHER)
        self.energy[k] += 0.0  # a workload holding a GPU without using energy yet has a row too
        self.seconds[k] += seconds
        for (kind, currency), v in amounts.items():
            self.cost[(k[0], k[1], kind, currency)] += v
        self._label(k, labels, t)

    def _key(self, uuid: str, key: str, t: float) -> Key:
        k = (uuid, key)
        if k in self.merged:
            self.merged[k] = t
            return (uuid, OTHER)
        return k

    def _label(self, k: Key, labels: Mapping[str, str], t: float) -> None:
        known = self.labels.get(k)
        if known is None:
            self.labels[k] = dict(labels)
            self.unshown.add(k)
        elif known != labels and any(v and not known.get(n) for n, v in labels.items()):
            # A label learnt later (pod names from the kubelet's first answer, a command line
            # after a restart) fills in what was empty; a known label never changes.
            self.labels[k] = {**known, **{n: v for n, v in labels.items() if v and not known.get(n)}}
        self.last_seen[k] = max(t, self.last_seen.get(k, t))

    def expire(self, now: float) -> int:
        """Drop workloads (and merge records) not seen for ``retention_seconds``. Returns how many."""
        limit = now - self.retention_seconds
        gone = [k for k, seen in self.last_seen.items() if seen < limit]
        if gone and self.on_expire is not None:
            self.on_expire(self, gone)
        for k in gone:
            self._drop(k)
        for k in [k for k, seen in self.merged.items() if seen < limit]:
            del self.merged[k]
        return len(gone)

    def _drop(self, k: Key) -> None:
        self.unshown.discard(k)
        self.energy.pop(k, None)
        self.seconds.pop(k, None)
        self.labels.pop(k, None)
        self.last_seen.pop(k, None)
        for ck in [ck for ck in self.cost if (ck[0], ck[1]) == k]:
            del self.cost[ck]

    def enforce_max(self) -> int:
        """Fold the smallest live workloads into their GPU's ``other`` beyond ``max_workloads``.

        Returns how many were folded. From now on a folded workload is charged to ``other``.
        What it was charged so far moves into ``other`` only if no snapshot has shown it yet;
        one a scrape may have read stays exported as it is, unchanged, until it expires
        ``retention_seconds`` after its last charge, like a finished workload: were it moved,
        Prometheus would count it twice, in the workload's series up to its last scrape and
        again in ``other``'s jump. Either way the sums per GPU are unchanged.
        """
        if len(self.energy) <= self.max_workloads:
            return 0  # every tick: the usual case costs no scan
        live = [k for k in self.energy if split_key(k[1])[0] not in PSEUDO and k not in self.merged]
        excess = len(live) - self.max_workloads
        if excess <= 0:
            return 0
        live.sort(key=lambda k: (self.energy[k], self.seconds.get(k, 0.0), k))  # before energy: by time held
        for k in live[:excess]:
            other = (k[0], OTHER)
            seen = self.last_seen.get(k, 0.0)
            self.merged[k] = seen
            self.labels.setdefault(other, pseudo_labels(OTHER))
            self.energy[other] += 0.0
            self.last_seen[other] = max(seen, self.last_seen.get(other, seen))
            if k not in self.unshown:
                continue  # shown: kept as it is until it expires
            self.energy[other] += self.energy[k]
            if k in self.seconds:
                self.seconds[other] += self.seconds[k]
            for ck in [ck for ck in self.cost if (ck[0], ck[1]) == k]:
                self.cost[(k[0], OTHER, ck[2], ck[3])] += self.cost[ck]
            self._drop(k)
        return excess

    # -- reading ----------------------------------------------------------

    def rows(self) -> tuple[WorkloadRow, ...]:
        return _rows(self.energy, self.cost, self.labels, self.seconds)

    def frozen_rows(self) -> "FrozenRows":
        """The rows as they are now, built only when read: a snapshot is frozen every tick, and
        most ticks nobody scrapes (copying the totals is microseconds, building rows is not)."""
        self.unshown.clear()
        return FrozenRows(dict(self.energy), dict(self.cost), dict(self.labels), dict(self.seconds))

    # -- persistence ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "rows": [
                [u, k, j, self.last_seen.get((u, k), 0.0), dict(self.labels.get((u, k), {}))]
                for (u, k), j in sorted(self.energy.items())
            ],
            "cost": [[u, k, kind, c, v] for (u, k, kind, c), v in sorted(self.cost.items())],
            "seconds": [[u, k, v] for (u, k), v in sorted(self.seconds.items())],
            "merged": [[u, k, t] for (u, k), t in sorted(self.merged.items())],
        }

    @staticmethod
    def parse_state(data: Any) -> "WorkloadTotals":
        """A :class:`WorkloadTotals` from :meth:`state`'s output, every value checked.

        Raises ValueError naming the first bad value (``workloads.rows[3][2]: -1 is negative``).
        """
        out = WorkloadTotals()
        if not isinstance(data, dict):
            raise ValueError(f"workloads: expected an object, got {statecheck.kind_of(data)}")
        for name in ("rows", "cost", "merged"):
            if not isinstance(data.get(name), list):
                raise ValueError(f"workloads.{name}: expected a list, got {statecheck.kind_of(data.get(name))}")
        for i, row in enumerate(data["rows"]):
            where = f"workloads.rows[{i}]"
            if not isinstance(row, list) or len(row) != 5:
                raise ValueError(f"{where}: expected [gpu uuid, workload, joules, last seen, labels]")
            k = (statecheck.name(row[0], f"{where}[0]"), statecheck.name(row[1], f"{where}[1]"))
            if k in out.energy:
                raise ValueError(f"{where}: {list(k)} appears twice")
            out.energy[k] = statecheck.number(row[2], f"{where}[2]", statecheck.MAX_JOULES)
            out.last_seen[k] = statecheck.number(row[3], f"{where}[3]", statecheck.MAX_TIMESTAMP)
            labels = row[4]
            if not isinstance(labels, dict):
                raise ValueError(f"{where}[4]: expected an object of labels, got {statecheck.kind_of(labels)}")
            clean: dict[str, str] = {}
            for name in IDENTITY_LABELS:
                v = labels.get(name, "")
                if not isinstance(v, str) or len(v) > 1024:
                    raise ValueError(f"{where}[4][{name!r}]: expected a string of at most 1024 characters")
                clean[name] = v
            out.labels[k] = clean
        for i, row in enumerate(data["cost"]):
            where = f"workloads.cost[{i}]"
            # [gpu uuid, workload, currency, number]: saved before cost kinds, energy cost only.
            if isinstance(row, list) and len(row) == 4:
                row = [row[0], row[1], ENERGY, row[2], row[3]]
            if not isinstance(row, list) or len(row) != 5:
                raise ValueError(f"{where}: expected [gpu uuid, workload, cost kind, currency, number]")
            ck = (statecheck.name(row[0], f"{where}[0]"), statecheck.name(row[1], f"{where}[1]"), row[2],
                  statecheck.name(row[3], f"{where}[3]"))
            if ck[2] not in COST_KINDS:
                raise ValueError(f"{where}[2]: expected a cost kind ({', '.join(COST_KINDS)}), got {row[2]!r:.40}")
            if (ck[0], ck[1]) not in out.energy:
                raise ValueError(f"{where}: cost of {list(ck[:2])}, which has no energy row")
            out.cost[ck] = statecheck.number(row[4], f"{where}[4]", statecheck.MAX_MONEY)
        for i, row in enumerate(data.get("seconds", [])):  # absent before capacity was charged
            where = f"workloads.seconds[{i}]"
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError(f"{where}: expected [gpu uuid, workload, seconds]")
            k = (statecheck.name(row[0], f"{where}[0]"), statecheck.name(row[1], f"{where}[1]"))
            if k not in out.energy:
                raise ValueError(f"{where}: seconds of {list(k)}, which has no energy row")
            out.seconds[k] = statecheck.number(row[2], f"{where}[2]", statecheck.MAX_TIMESTAMP)
        for i, row in enumerate(data["merged"]):
            where = f"workloads.merged[{i}]"
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError(f"{where}: expected [gpu uuid, workload, last seen]")
            k = (statecheck.name(row[0], f"{where}[0]"), statecheck.name(row[1], f"{where}[1]"))
            out.merged[k] = statecheck.number(row[2], f"{where}[2]", statecheck.MAX_TIMESTAMP)
        return out

    def take(self, other: "WorkloadTotals") -> None:
        """Replace this object's totals by ``other``'s (its limits stay)."""
        self.energy = other.energy
        self.cost = other.cost
        self.seconds = other.seconds
        self.labels = other.labels
        self.last_seen = other.last_seen
        self.merged = other.merged
        self.unshown = set()  # loaded from a state saved from snapshots: shown


def _rows(energy: Mapping[Key, float], cost: Mapping[tuple[str, str, str, str], float],
          labels: Mapping[Key, Mapping[str, str]], seconds: Mapping[Key, float]) -> tuple[WorkloadRow, ...]:
    by_key: dict[Key, dict[tuple[str, str], float]] = defaultdict(dict)
    for (uuid, key, kind, cur), v in cost.items():
        by_key[(uuid, key)][(kind, cur)] = v
    rows = []
    for k, j in sorted(energy.items()):
        workload, gpu_instance = split_key(k[1])
        costs = by_key.get(k, {})
        energy_cost = {cur: v for (kind, cur), v in costs.items() if kind == ENERGY}
        rows.append(WorkloadRow(k[0], workload, dict(labels.get(k, {})), j, energy_cost, gpu_instance,
                                costs, seconds.get(k, 0.0)))
    return tuple(rows)


class FrozenRows(Sequence[WorkloadRow]):
    """Workload rows of one instant (copies of the totals), built on first read and kept."""

    __slots__ = ("_parts", "_rows")

    def __init__(self, energy: dict[Key, float], cost: dict[tuple[str, str, str, str], float],
                 labels: dict[Key, Mapping[str, str]], seconds: dict[Key, float]) -> None:
        self._parts = (energy, cost, labels, seconds)
        self._rows: tuple[WorkloadRow, ...] | None = None

    def _built(self) -> tuple[WorkloadRow, ...]:
        rows = self._rows
        if rows is None:  # two first readers at once build the same rows; either is kept
            rows = self._rows = _rows(*self._parts)
        return rows

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._built()[i]

    def __len__(self) -> int:
        return len(self._built())

    def __iter__(self) -> Iterator[WorkloadRow]:
        return iter(self._built())
