"""Worked examples through the ledger: idle cost, amortisation, host energy in replays, record."""

from __future__ import annotations

import random

import pytest
from fakes import FakeGpu, FakeSource, real_time_source
from helpers import counter_delta_joules, replay_through_sampler

from agent.accounting import Ledger
from agent.cost import Amortization, CostModel, HardwareConfig, IdleConfig, PueConfig, TariffConfig
from agent.energy import EnergySlice
from agent.record import record
from agent.sampler import Sampler
from agent.sources.replay import ReplaySource
from agent.trace import load

T = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def test_idle_cost_is_the_cost_of_energy_used_below_the_threshold():
    led = Ledger(cost=CostModel(TariffConfig(currency="EUR", flat_price_per_kwh=0.36), PueConfig(value=1.25)),
                 idle=IdleConfig(utilization_threshold=0.05), gpu_uuids={0: "GPU-a"})
    led.add([
        EnergySlice(0, T, T + 3600, 360_000.0, "counter", utilization=0.02),   # 0.1 kWh idle
        EnergySlice(0, T + 3600, T + 7200, 1_440_000.0, "counter", utilization=0.90),  # 0.4 kWh busy
        EnergySlice(0, T + 7200, T + 7300, 3_600.0, "counter", utilization=0.05),  # at the threshold: not idle
        EnergySlice(0, T + 7300, T + 7400, 3_600.0, "counter", utilization=None),  # unknown: not idle
    ])
    # Idle: 0.1 kWh × 1.25 PUE × 0.36 EUR = 0.045 EUR.
    assert led.idle_cost[("gpu:GPU-a", "EUR")] == pytest.approx(0.045)
    # All: (0.1 + 0.4 + 0.001 + 0.001) kWh × 1.25 × 0.36 = 0.2259 EUR.
    assert led.energy_cost[("gpu:GPU-a", "EUR")] == pytest.approx(0.2259)
    assert led.facility_energy["gpu:GPU-a"] == pytest.approx(1_807_200.0 * 1.25)


def test_amortisation_per_hour_through_the_sampler():
    # 30,000 over 5 years of 365.25 days = 30000 / 43830 h = 0.684463 per GPU-hour;
    # node 60,000 over 5 years = 1.368925 per hour.
    hw = HardwareConfig(currency="EUR", gpu_price=30000, gpu_lifetime_years=5, node_price=60000,
                        node_lifetime_years=5)
    src = FakeSource([FakeGpu(lambda t: 100.0), FakeGpu(lambda t: 100.0)], t0=T)
    led = Ledger(amortization=Amortization(hw), hardware_currency="EUR")
    s = Sampler(src, clock=src.clock, ledger=led, energy_method="polled")
    s.tick()
    for _ in range(60):
        src.t += 60.0  # one hour in 1-minute ticks
        s.tick()
    assert led.hardware_cost[("gpu:GPU-fake-0", "EUR")] == pytest.approx(30000 / 43830, rel=1e-9)
    assert led.hardware_cost[("gpu:GPU-fake-1", "EUR")] == pytest.approx(0.684463, abs=1e-6)
    assert led.hardware_cost[("node", "EUR")] == pytest.approx(1.368925, abs=1e-6)
    assert led.hardware_rate_per_hour() == pytest.approx(2 * 0.684463 + 1.368925, abs=1e-5)
    assert s.snapshot.cost.hardware_cost_rate_per_hour == pytest.approx(2.737851, abs=1e-5)


def test_no_tariff_means_no_cost_but_energy_and_facility_energy():
    led = Ledger(cost=CostModel(None, PueConfig(value=1.5)), gpu_uuids={0: "GPU-a"})
    led.add([EnergySlice(0, T, T + 10, 1000.0, "counter", 0.5)])
    assert dict(led.energy_cost) == {} and dict(led.idle_cost) == {}
    assert led.facility_energy["gpu:GPU-a"] == 1500.0


def test_replay_carries_host_readings_through_the_model(h100_trace):
    from agent.sources.host import HostConfig

    src = ReplaySource(h100_trace)
    sampler = Sampler(src, clock=lambda: (src.t, src.t), host=src.host_source(HostConfig()))
    sampler.tick()
    while not src.finished:
        src.seek(src.t + 1.0)
        sampler.tick(final=src.finished)
    host = sampler.ledger.host_energy
    span = h100_trace.end - h100_trace.start
    # DRAM: 0.375 W/GiB × 135,148,564,480 B installed (125.87 GiB) = 47.20 W, for the whole trace.
    assert host[("dram", "model")] == pytest.approx(0.375 * 135148564480 / 2**30 * span, rel=1e-9)
    # CPU: 16 vCPUs → 12 W idle .. 56 W full; the trace's host CPU stayed low (a few %).
    assert 12.0 * span < host[("cpu", "model")] < 20.0 * span
    assert sampler.snapshot.host.cpu_util_ratio == pytest.approx(h100_trace.rows[-1]["host"]["cpu_util_pct"] / 100)


def test_record_writes_a_trace_that_replays_to_the_same_energy(tmp_path):
    # record() samples in real time: the fake GPU's clock follows the real one.
    live = real_time_source([FakeGpu(lambda t: 200.0 + 100.0 * ((t * 2) % 2 > 1))])
    t0 = live.t0
    live.gpus[0].procs = lambda t: [(77, 1 << 30)] if t > t0 + 0.5 else []
    live.gpus[0].util_samples = [(77, int((t0 + 0.6 + k * 0.2) * 1e6), 90, 20) for k in range(20)]
    path = tmp_path / "rec.jsonl.gz"
    rows = record(live, str(path), duration=1.5, interval=0.05, energy_interval=0.05, samples_interval=0.5)
    assert rows >= 20
    trace = load(path)
    assert trace.header["gpus"][0]["uuid"] == "GPU-fake-0"
    first = trace.rows[0]["gpus"]["0"]
    assert {"power_mw", "energy_mj", "samples", "temp_c", "power_limit_mw"} <= set(first)
    assert "mem_used_bytes" not in first  # the fake does not report it: absent, not 0
    assert "cpu_util_pct" in trace.rows[0]["host"]
    # The process list and the new per-process samples on every row, each sample once.
    assert all("processes" in r["gpus"]["0"] and "process_utilization" in r["gpus"]["0"] for r in trace.rows)
    assert trace.rows[-1]["gpus"]["0"]["processes"] == [[77, 1 << 30]]
    util = [tuple(u) for r in trace.rows for u in r["gpus"]["0"]["process_utilization"]]
    assert util == sorted(set(util)) and len(util) >= 3
    sampler = replay_through_sampler(trace, tick=0.25)
    assert sampler.energy_method(0) == "counter"
    assert sum(sampler.snapshot.gpus[0].energy_joules.values()) == pytest.approx(counter_delta_joules(trace), rel=1e-6)


def test_energy_of_every_gpu_in_one_pass_is_each_gpus_own():
    led = Ledger(cost=CostModel(None, PueConfig(value=1.0)), gpu_uuids={0: "GPU-a", 1: "GPU-b", 2: "GPU-c"})
    led.add([EnergySlice(0, T, T + 1, 10.0, "counter"), EnergySlice(1, T, T + 1, 20.0, "polled"),
             EnergySlice(0, T + 1, T + 2, 5.0, "polled"), EnergySlice(1, T + 1, T + 2, 7.0, "polled")])
    by_gpu = led.gpu_energy_by_gpu()
    assert by_gpu == {u: led.gpu_energy_by_source(u) for u in ("GPU-a", "GPU-b")}
    assert by_gpu["GPU-a"] == {"counter": 10.0, "polled": 5.0} and by_gpu["GPU-b"] == {"polled": 27.0}
    assert "GPU-c" not in by_gpu and led.gpu_energy_by_source("GPU-c") == {}


def test_host_read_every_5_s_counts_the_same_energy_as_every_second(monkeypatch):
    """The host is read every HOST_READ_SECONDS, not every tick: the model is linear in CPU
    utilisation measured as the average since the last read, so the energy is the same."""
    from types import SimpleNamespace

    from agent import sampler as sampler_mod
    from agent.sampler import Sampler
    from agent.sources.host import CpuUtilMeter, HostConfig, HostPowerSource

    def run(host_read_seconds: float) -> tuple[dict, int]:
        monkeypatch.setattr(sampler_mod, "HOST_READ_SECONDS", host_read_seconds)
        clock = {"t": 1000.0, "busy": 0.0, "idle": 0.0}
        rng = random.Random(4)

        def cpu_times():  # CPU time of 16 CPUs, busy a different share each second
            return SimpleNamespace(user=clock["busy"], nice=0.0, system=0.0, idle=clock["idle"], iowait=0.0,
                                   irq=0.0, softirq=0.0, steal=0.0, guest=0.0, guest_nice=0.0)

        mem = SimpleNamespace(total=64 << 30, available=40 << 30)
        host = HostPowerSource(HostConfig(mode="model", platform_watts=50.0), cpu_percent=CpuUtilMeter(cpu_times),
                               virtual_memory=lambda: mem, cpu_count=16)
        reads = []
        real_read = host.read
        host.read = lambda t: reads.append(t) or real_read(t)
        s = Sampler(None, clock=lambda: (1_800_000_000.0 + clock["t"], clock["t"]), host=host, source_kind="nvml")
        s.tick()
        for _ in range(60):
            share = rng.random()
            clock["busy"] += 16 * share
            clock["idle"] += 16 * (1 - share)
            clock["t"] += 1.0
            s.tick()
        s.tick(final=True)
        return dict(s.ledger.host_energy), len(reads)

    every_second, n1 = run(0.0)
    every_five, n5 = run(5.0)
    assert n1 == 62 and n5 <= 15
    assert every_five.keys() == every_second.keys()
    for k, joules in every_second.items():
        assert every_five[k] == pytest.approx(joules, rel=1e-9), k
