"""Prometheus families of the workloads on each GPU (issue 9 contract).

Their own families, never job labels multiplied onto device series:

- ``gpucost_workload_gpu_energy_joules_total`` — a GPU's energy split among its workloads;
  summed over ``workload`` it is the GPU's energy (while no workload has expired).
- ``gpucost_workload_cost_total`` — what the workload cost, fully loaded, by ``cost_kind``:
  ``energy`` (its GPU energy priced like the GPU's, plus its share of the node's host energy),
  ``hardware`` and ``running`` (its share, by GPU time held, of the GPU's and the node's
  amortisation and running costs), with ``currency``. Summed over workloads, per kind: the
  node's total of that kind.
- ``gpucost_workload_gpu_seconds_total`` — seconds the workload held the GPU (shared seconds
  split as the capacity cost is); summed over workloads: the seconds the agent counted.

Every label is always present, "" when not known or switched off. ``gpu_instance`` is
the MIG GPU instance id, "" without MIG (and for ``other``). Rendered from the snapshot only.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .attribution.split import COMMAND
from .attribution.workloads import IDENTITY_LABELS
from .snapshot import Snapshot

WORKLOAD_LABELS = ["gpu", "uuid", "gpu_instance", "workload", *IDENTITY_LABELS]


def workload_families(snap: Snapshot) -> Iterator[Metric]:
    rows = snap.workloads
    if rows is None:
        return
    index_of = {g.info.uuid: str(g.info.index) for g in snap.gpus}
    energy = CounterMetricFamily(
        "gpucost_workload_gpu_energy_joules",
        "GPU energy split among the workloads on the GPU (above-idle by SM activity, idle by GPU memory; "
        "unallocated = no process on the GPU). Summed over workloads: the GPU's energy.",
        labels=WORKLOAD_LABELS,
    )
    cost = CounterMetricFamily(
        "gpucost_workload_cost",
        "Fully loaded cost of each workload by cost_kind: energy (its GPU energy, priced when used, plus its "
        "share of host energy), hardware and running (its share of amortisation and running costs by GPU time "
        "held). Summed over workloads per kind: the node's total.",
        labels=WORKLOAD_LABELS + ["cost_kind", "currency"],
    )
    seconds = CounterMetricFamily(
        "gpucost_workload_gpu_seconds",
        "Seconds each workload held the GPU (several at once share by GPU memory; unallocated = nobody).",
        labels=WORKLOAD_LABELS,
    )
    command = GaugeMetricFamily(
        "gpucost_workload_command_info",
        "The command line of a workload's process ([attribution] cmdline = true only; command lines can "
        "hold secrets). Join on gpu, uuid, gpu_instance, workload.",
        labels=["gpu", "uuid", "gpu_instance", "workload", "command"],
    )
    for r in rows:
        gpu = index_of.get(r.uuid)
        if gpu is None:
            continue  # a GPU not present now exports nothing
        labels = [gpu, r.uuid, r.gpu_instance, r.workload] + [str(r.labels.get(n, "")) for n in IDENTITY_LABELS]
        energy.add_metric(labels, r.energy_joules)
        seconds.add_metric(labels, r.seconds)
        for (kind, currency), value in sorted(r.costs.items()):
            cost.add_metric(labels + [kind, currency], value)
        cmd = r.labels.get(COMMAND)
        if cmd:
            command.add_metric(labels[:4] + [cmd], 1.0)
    yield energy
    yield cost
    yield seconds
    if command.samples:
        yield command
