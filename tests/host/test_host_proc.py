"""The per-tick /proc reads give what psutil gives (the host model's inputs must not change)."""

from __future__ import annotations

import psutil

from agent.sources.host import CpuUtilMeter, HostConfig, HostPowerSource, proc_cpu_times, proc_memory


def test_cpu_times_are_psutils():
    before = psutil.cpu_times()
    ours = proc_cpu_times()
    after = psutil.cpu_times()
    for field in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"):
        assert getattr(before, field) <= getattr(ours, field) <= getattr(after, field), field
    # Read twice through the same open descriptor: fresh values, never a cached first read.
    assert sum(proc_cpu_times()) >= sum(ours)


def test_memory_is_psutils():
    vm = psutil.virtual_memory()
    ours = proc_memory()
    assert ours.total == vm.total
    assert 0 < ours.available <= ours.total
    assert abs(ours.available - vm.available) < 0.05 * vm.total  # moments apart on a live machine


def test_default_host_source_reads_proc():
    src = HostPowerSource(HostConfig(mode="model"))
    first = src.read(0.0)
    second = src.read(1.0)
    assert first.mem_total_bytes == psutil.virtual_memory().total
    assert 0.0 <= second.cpu_util_ratio <= 1.0
    assert isinstance(src._cpu_percent, CpuUtilMeter)
