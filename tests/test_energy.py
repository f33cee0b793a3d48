"""Unit tests of GpuEnergy and the Sampler: counter resets, missing fields, late ticks."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
from fakes import FakeGpu, FakeSource, make_sampler

from agent.energy import GpuEnergy
from agent.sources.gpu import GpuError


def bursty(t: float) -> float:
    """3 s at 650 W, 2 s at 120 W: the load where polling every 5 s goes badly wrong."""
    return 650.0 if (t % 5.0) < 3.0 else 120.0


def run(source: FakeSource, sampler, seconds: float, tick: float = 1.0, final: bool = True):
    n = int(round(seconds / tick))
    for k in range(n):
        source.t += tick
        sampler.tick(final=final and k == n - 1)


def total(sampler, gpu: int = 0) -> float:
    return sum(sampler.snapshot.gpus[gpu].energy_joules.values())


# -- exactness on a bursty load ----------------------------------------------------------


def test_counter_path_is_exact_on_a_bursty_load_that_polling_gets_wrong():
    src = FakeSource([FakeGpu(bursty)])
    s = make_sampler(src, counter_interval=5.0)
    run(src, s, 60.0)
    truth = src.energy_between(0, src.t0, src.t)
    assert total(s) == pytest.approx(truth, rel=1e-4)
    # The same load polled every 5 s, phase-locked with the bursts: far off.
    src2 = FakeSource([FakeGpu(bursty, counter=False, samples=False)])
    s2 = make_sampler(src2)
    run(src2, s2, 60.0, tick=5.0)
    assert s2.energy_method(0) == "polled"
    assert abs(total(s2) - truth) / truth > 0.3


def test_samples_path_keeps_bursts_between_ticks():
    src = FakeSource([FakeGpu(bursty, counter=False)])
    s = make_sampler(src)
    run(src, s, 60.0, tick=2.0)
    assert s.energy_method(0) == "samples"
    truth = src.energy_between(0, src.t0, src.t)
    assert total(s) == pytest.approx(truth, rel=0.01)
    assert {k for k, v in s.snapshot.gpus[0].energy_joules.items() if v > 0} == {"samples"}


# -- counter reset ---------------------------------------------------------------------


def test_counter_going_backwards_neither_goes_negative_nor_loses_the_total():
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src, counter_interval=5.0)
    run(src, s, 20.0, final=False)  # 20 s at 300 W, counter read at 0, 5, 10, 15, 20 s
    before = total(s)
    assert before == pytest.approx(6000.0, rel=1e-3)
    # Driver reload: the counter restarts near zero.
    src.gpus[0].counter_offset_mj = -src.energy_between(0, src.t0 - 100, src.t) * 1000
    seen = []
    for _ in range(10):
        src.t += 1.0
        s.tick()
        seen.append(total(s))
    assert all(b >= a for a, b in zip([before] + seen, seen)), "exported total went backwards"
    # Nothing lost: the reset interval is filled from polled power, the next one is exact again.
    assert total(s) == pytest.approx(before + 3000.0, rel=1e-3)
    assert s.errors["counter_reset"] == 1
    assert "polled" in s.snapshot.gpus[0].energy_joules  # the estimated part says so
    assert s.snapshot.gpus[0].energy_joules["polled"] == pytest.approx(1500.0, rel=1e-3)


def test_implausible_counter_jump_is_treated_as_reset():
    e = GpuEnergy(0, "counter", counter_interval=5.0, max_watts=700.0)
    e.tick(0.0, 100.0, 200.0, counter_mj=1_000_000)
    for k in range(1, 5):
        assert e.tick(float(k), 100.0 + k, 200.0) == []
    # 5 s at ≤700 W is ≤3.5 kJ; a jump of 10 MJ cannot be energy.
    out = e.tick(5.0, 105.0, 200.0, counter_mj=10_001_000_000)
    assert sum(x.joules for x in out) == pytest.approx(1000.0)
    assert {x.source for x in out} == {"polled"}


# -- apportioning ----------------------------------------------------------------------


def test_exact_delta_is_apportioned_by_each_ticks_power_and_keeps_wall_times():
    e = GpuEnergy(0, "counter", counter_interval=4.0)
    assert e.tick(0.0, 1000.0, 100.0, counter_mj=0) == []
    e.tick(1.0, 1001.0, 100.0)
    e.tick(2.0, 1002.0, 300.0)
    e.tick(3.0, 1003.0, 300.0)
    out = e.tick(4.0, 1004.0, 100.0, counter_mj=900_000)  # exactly 900 J
    assert [(x.t0, x.t1) for x in out] == [(1000.0, 1001.0), (1001.0, 1002.0), (1002.0, 1003.0), (1003.0, 1004.0)]
    # Each tick weighted by the power read at its end (on Hopper the average over
    # that tick): 100, 300, 300, 100 W × 1 s (sum 800) → 900 J × w/800.
    assert [round(x.joules, 6) for x in out] == [112.5, 337.5, 337.5, 112.5]
    assert sum(x.joules for x in out) == pytest.approx(900.0)


def test_counter_is_read_on_the_tick_that_crosses_a_tariff_boundary():
    from agent.accounting import Ledger
    from agent.cost import CostModel, TariffConfig

    # Bands change at 08:00 UTC; the fake source starts at 1.8e9 s = 2027-01-15 08:00:00 UTC.
    t0 = 1_800_000_000.0 - 2.5  # 07:59:57.5
    tariff = TariffConfig(currency="EUR", timezone="UTC", bands=[
        {"name": "night", "price_per_kwh": 0.1, "days": ["weekday", "weekend"], "start": "00:00", "end": "08:00"},
        {"name": "day", "price_per_kwh": 0.3, "days": ["weekday", "weekend"], "start": "08:00", "end": "00:00"},
    ])
    src = FakeSource([FakeGpu(lambda t: 600.0 if t >= 1_800_000_000.0 else 100.0)], t0=t0)
    s = make_sampler(src, counter_interval=60.0, ledger=Ledger(cost=CostModel(tariff)))
    reads = src.calls["energy_mj"]
    run(src, s, 3.0, final=False)  # ticks at 58.5, 59.5, 00.5: the last crosses 08:00
    # Read on the tick before the crossing (59.5: the next tick is due to cross) and on the
    # crossing (00.5), long before 60 s: the straddling tick is bracketed by two reads.
    assert src.calls["energy_mj"] == reads + 2
    cost = s.ledger.energy_cost[("gpu:GPU-fake-0", "EUR")]
    # 57.5 → 59.5: exactly 200 J (2 s × 100 W). 59.5 → 00.5: exactly 0.5 s × 100 W + 0.5 s ×
    # 600 W = 350 J, the straddling tick's own delta, split by time: 175 J on each side. (With a
    # read only at the crossing, the 550 J of 57.5 → 00.5 were shared by the power read at each
    # tick's end, 100, 100, 600 of 800, and the straddling tick had 412.5 J, 206.25 J a side.)
    night, day = 200.0 + 175.0, 175.0
    assert cost == pytest.approx((night * 0.1 + day * 0.3) / 3.6e6, rel=1e-4)
    # With a 60 s counter interval and no boundary read, the same 550 J would have been
    # spread over the whole interval's ticks; here the counter cut it at the crossing.


# -- missing fields --------------------------------------------------------------------


def test_gpu_without_counter_or_samples_falls_back_and_says_so():
    src = FakeSource([FakeGpu(lambda t: 200.0, counter=False, samples=False)])
    s = make_sampler(src, energy_method="auto")
    run(src, s, 10.0)
    assert s.energy_method(0) == "polled"
    assert s.snapshot.gpus[0].energy_joules == {"polled": pytest.approx(2000.0)}
    assert "energy_mj" not in src.calls or src.calls["energy_mj"] == 1  # asked once at start, never again


def test_unsupported_reading_is_absent_not_zero():
    from agent.exporter import make_registry

    src = FakeSource([FakeGpu(lambda t: 200.0, temperature=None)])
    s = make_sampler(src)
    run(src, s, 2.0)
    reg = make_registry(lambda: s.snapshot, process_metrics=False)
    labels = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert reg.get_sample_value("gpucost_gpu_temperature_celsius", labels) is None
    assert reg.get_sample_value("gpucost_gpu_power_watts", labels) == 200.0
    assert reg.get_sample_value("gpucost_gpu_memory_total_bytes", labels) is None


def test_counter_that_keeps_failing_is_bridged_by_polled_power():
    src = FakeSource([FakeGpu(lambda t: 400.0)])
    s = make_sampler(src, counter_interval=5.0)
    run(src, s, 10.0, final=False)
    exact_so_far = total(s)
    src.gpus[0].fail_counter = True
    run(src, s, 40.0, final=False)
    # Held back at most counter_stale_after (30 s); then settled from power, not lost.
    assert total(s) >= exact_so_far + 400.0 * 30 - 1
    assert s.errors["energy_counter"] > 0
    assert s.errors["energy_counter_stale"] == 1
    src.gpus[0].fail_counter = False
    run(src, s, 10.0)
    assert total(s) == pytest.approx(400.0 * 60, rel=1e-3)



def test_a_counter_failing_for_five_minutes_keeps_the_total_moving_every_tick_with_back_off():
    """Issue 16 item 1: after the stale limit every tick is settled from polled power at once (the
    total tracks 300 W x time, nothing piles up), the counter is asked with doubling back-off, and
    its return is a new baseline. Before: the total froze at 12,300 J from ~40 s on."""
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src, counter_interval=5.0)
    run(src, s, 10.0, final=False)
    src.gpus[0].fail_counter = True
    reads = src.calls.get("energy_mj", 0)
    behind = []
    for second in range(290):
        run(src, s, 1.0, final=False)
        if second > 40:
            behind.append(300.0 * (11 + second) - total(s))  # the truth minus the total
    assert s.errors["energy_counter_stale"] == 1
    assert s.snapshot.gpus[0].energy_counter_stale
    assert max(behind) <= 300.0 * 1 + 1e-6 and min(behind) >= -1e-6  # at most the tick in hand
    asked = src.calls.get("energy_mj", 0) - reads
    assert asked <= 12, asked  # 5, 10, 20, 40, 80, 160 s ... not 290 times
    src.gpus[0].fail_counter = False
    run(src, s, 320.0, final=False)  # the next try comes within the back-off's cap (300 s)
    assert not s.snapshot.gpus[0].energy_counter_stale
    run(src, s, 10.0)
    # The whole run, 630 s at 300 W: no held-back stretch lands twice on top of the estimate.
    assert total(s) == pytest.approx(300.0 * 630, rel=1e-4)
    assert s.snapshot.gpus[0].energy_joules["counter"] > 0


# -- late ticks ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["counter", "samples", "polled"])
def test_late_tick_uses_real_elapsed_time(method):
    src = FakeSource([FakeGpu(lambda t: 250.0)])
    s = make_sampler(src, energy_method=method, counter_interval=5.0)
    run(src, s, 5.0, final=False)
    src.t += 1.7  # the scheduler was late
    s.tick()
    src.t += 3.3
    s.tick(final=True)
    assert total(s) == pytest.approx(250.0 * 10.0, rel=1e-3)


def test_tick_later_than_the_ring_buffer_marks_the_gap_as_estimated():
    src = FakeSource([FakeGpu(lambda t: 500.0, counter=False)])
    s = make_sampler(src)
    run(src, s, 3.0)
    src.t += 6.0  # longer than the 2.4 s the driver keeps
    s.tick()
    e = s.snapshot.gpus[0].energy_joules
    assert e["samples"] + e["polled"] == pytest.approx(500.0 * 9.0, rel=0.01)
    assert e["polled"] > 500.0 * 3.0  # the lost stretch is labelled as an estimate
    assert s.errors["samples_gap"] >= 1


def test_duplicate_or_backwards_tick_adds_nothing():
    e = GpuEnergy(0, "polled")
    e.tick(10.0, 10.0, 100.0)
    assert sum(x.joules for x in e.tick(11.0, 11.0, 100.0)) == pytest.approx(100.0)
    assert e.tick(11.0, 11.0, 100.0) == []
    assert e.tick(10.5, 10.5, 100.0) == []


def test_final_tick_at_the_same_instant_settles_what_is_pending():
    """SIGTERM right after a tick (a replay's clock does not move): nothing held back is lost."""
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src, counter_interval=5.0)
    run(src, s, 7.0, final=False)  # counter read at 0 and 5 s; 2 s pending
    assert total(s) == pytest.approx(1500.0, rel=1e-3)
    s.tick(final=True)  # same instant, forced counter read
    assert total(s) == pytest.approx(2100.0, rel=1e-3)
    s.tick(final=True)  # and again: nothing counted twice
    assert total(s) == pytest.approx(2100.0, rel=1e-3)


def test_gpu_lost_marks_it_down_and_keeps_sampling_the_others():
    src = FakeSource([FakeGpu(lambda t: 100.0), FakeGpu(lambda t: 200.0)])
    s = make_sampler(src, counter_interval=5.0)  # GPU 1's counter read at 5 and 10 s
    run(src, s, 5.0, final=False)
    before = total(s, 0)
    src.gpus[0].lost = True
    run(src, s, 5.0, final=False)
    snap = s.snapshot
    assert not snap.gpus[0].up and snap.gpus[1].up
    assert snap.gpus[0].reading is None
    assert total(s, 0) == before  # totals kept, not reset
    assert s.errors["gpu_lost"] == 1  # one loss, however many ticks it lasts
    assert total(s, 1) == pytest.approx(200.0 * 10, rel=1e-3)


def test_lost_gpu_is_retried_with_back_off_and_picked_up_with_its_totals():
    src = FakeSource([FakeGpu(lambda t: 100.0), FakeGpu(lambda t: 200.0)])
    s = make_sampler(src)
    run(src, s, 5.0)
    before = total(s, 0)
    src.gpus[0].lost = True
    reads = src.calls["read"]
    run(src, s, 10.0, final=False)
    # GPU 1 ten times; GPU 0 once when lost, then retried after 1, 2 and 4 s (t+1, t+3, t+7).
    assert src.calls["read"] - reads == 10 + 4
    src.gpus[0].lost = False
    run(src, s, 10.0)  # the next retry (8 s later, at t+15) finds it
    assert s.snapshot.gpus[0].up and s.errors["gpu_lost"] == 1
    # Its energy continues from the kept total; the whole lost stretch is in the counter delta.
    assert total(s, 0) == pytest.approx(before + 100.0 * 20, rel=1e-3)


def test_never_a_nan_or_negative_slice():
    src = FakeSource([FakeGpu(lambda t: 100.0 + 90.0 * math.sin(t))])
    s = make_sampler(src, counter_interval=3.0)
    values = []
    for _ in range(50):
        src.t += 0.7
        s.tick()
        values.append(total(s))
    assert all(v == v and v >= 0 for v in values)
    assert values == sorted(values)


# -- counter cadence -------------------------------------------------------------------


def test_counter_is_read_every_fifth_tick_despite_scheduler_jitter():
    """Ticks 20 ms early or late: the 5 s counter interval is read every 5 ticks, never 6."""
    rng = random.Random(8)
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src, counter_interval=5.0, tick_seconds=1.0)
    base, reads, read_at = src.t, s.counter_reads, []
    for k in range(1, 101):
        src.t = base + k + rng.uniform(-0.02, 0.02)
        s.tick()
        if s.counter_reads > reads:
            read_at.append(k)
        reads = s.counter_reads
    assert read_at == list(range(5, 101, 5))


def test_counter_read_on_the_tick_nearest_the_interval_end():
    e = GpuEnergy(0, "counter", counter_interval=5.0, tick_seconds=2.0)
    e.tick(0.0, 0.0, 100.0, counter_mj=0)
    # 2 s ticks: the read due at 5 s falls on the 4 s tick (within half a tick), not the 6 s one.
    assert not e.counter_due(2.0)
    assert e.counter_due(4.0)


# -- sample buffer at long ticks -------------------------------------------------------


def _long_ticks(src: FakeSource, s, ticks: int, tick: float, poll: bool) -> None:
    """What the service does: ``poll_samples`` every second between ticks longer than that."""
    every = s.samples_poll_seconds if poll else None
    for _ in range(ticks):
        start = src.t
        if every:
            for k in range(1, int(tick / every)):
                src.t = start + k * every
                s.poll_samples()
        src.t = start + tick
        s.tick()


def test_reads_between_long_ticks_keep_every_sample():
    src = FakeSource([FakeGpu(bursty, counter=False)])
    s = make_sampler(src, tick_seconds=5.0)
    assert s.energy_method(0) == "samples" and s.samples_poll_seconds == 1.0
    _long_ticks(src, s, 12, 5.0, poll=True)
    truth = src.energy_between(0, src.t0, src.t)
    e = s.snapshot.gpus[0].energy_joules
    assert e["polled"] == 0.0 and s.errors["samples_gap"] == 0
    assert e["samples"] == pytest.approx(truth, rel=0.005)
    # The same ticks without the reads in between: the 2.4 s buffer lost the rest of each tick.
    src2 = FakeSource([FakeGpu(bursty, counter=False)])
    s2 = make_sampler(src2, tick_seconds=5.0)
    _long_ticks(src2, s2, 12, 5.0, poll=False)
    assert s2.snapshot.gpus[0].energy_joules["polled"] > 0.3 * truth
    assert s2.errors["samples_gap"] == 12


def test_no_reads_between_ticks_where_none_are_needed():
    short = make_sampler(FakeSource([FakeGpu(bursty, counter=False)]), tick_seconds=1.0)
    assert short.samples_poll_seconds is None  # the tick itself reads the buffer every second
    counter = make_sampler(FakeSource([FakeGpu(bursty)]), tick_seconds=5.0)
    assert counter.samples_poll_seconds is None  # no GPU measured from the buffer
    src = counter.source
    before = src.calls.get("power_samples", 0)
    counter.poll_samples()
    assert src.calls.get("power_samples", 0) == before


def test_poll_samples_never_raises_and_counts_failures():
    src = FakeSource([FakeGpu(lambda t: 200.0, counter=False), FakeGpu(lambda t: 300.0)])
    s = make_sampler(src, tick_seconds=5.0)

    def broken(index, since_us):
        raise RuntimeError("driver bug")

    def failing(index, since_us):
        raise GpuError("NVML_ERROR_UNKNOWN")

    src.power_samples = broken
    s.poll_samples()
    src.power_samples = failing
    s.poll_samples()
    assert s.errors["power_samples"] == 2  # GPU 1 has the counter: its buffer is not read


def test_poll_samples_skips_a_lost_gpu():
    src = FakeSource([FakeGpu(lambda t: 200.0, counter=False)])
    s = make_sampler(src, tick_seconds=5.0)
    src.gpus[0].lost = True
    src.t += 5.0
    s.tick()
    before = src.calls["power_samples"]
    s.poll_samples()
    assert src.calls["power_samples"] == before


def test_poll_samples_waits_for_a_running_tick():
    src = FakeSource([FakeGpu(lambda t: 200.0, counter=False)])
    s = make_sampler(src, tick_seconds=5.0)
    before = src.calls["power_samples"]
    with s._lock:  # as a tick holds it
        poller = threading.Thread(target=s.poll_samples)
        poller.start()
        poller.join(0.2)
        assert poller.is_alive() and src.calls["power_samples"] == before
    poller.join(5.0)
    assert not poller.is_alive() and src.calls["power_samples"] == before + 1


def test_samples_lost_before_a_fallback_are_not_counted_twice():
    """A long tick with no buffer read falls back to polled power; the buffer read after it
    must not bring back samples from that stretch (they would be counted twice)."""
    src = FakeSource([FakeGpu(lambda t: 500.0, counter=False)])
    s = make_sampler(src, tick_seconds=1.0)
    run(src, s, 3.0, final=False)
    real = src.power_samples
    src.power_samples = lambda index, since_us: (_ for _ in ()).throw(GpuError("busy"))
    src.t += 2.0  # one 2 s tick without samples: filled from polled power
    s.tick()
    src.power_samples = real
    run(src, s, 3.0, final=False)
    assert total(s) == pytest.approx(500.0 * 8.0, rel=0.01)


def test_service_reads_the_buffer_between_long_ticks():
    """The running service schedules the reads: with 5 s ticks, the buffer is read every second."""
    from agent.config import AgentSection, Settings
    from agent.service import Service

    src = FakeSource([FakeGpu(lambda t: 200.0, counter=False)])
    s = make_sampler(src, tick_seconds=5.0)
    service = Service(Settings(agent=AgentSection(tick_seconds=5.0, listen="127.0.0.1:0")), s)
    service.start()
    try:
        before = src.calls["power_samples"]
        time.sleep(2.5)
        ticks = s.ticks
        reads = src.calls["power_samples"] - before
    finally:
        service.stop()
    assert ticks == 2  # make_sampler's and start()'s: no scheduled 5 s tick has run yet
    assert reads >= 2  # ... but the buffer was read at 1 s and 2 s


# -- the time no agent ran: bridged by the counter on the same boot ----------------------


def _resumed(mj0: int, mono0: float, max_watts: float | None = 700.0) -> GpuEnergy:
    e = GpuEnergy(0, "counter", max_watts=max_watts)
    e.resume(mj0, mono0)
    return e


def test_first_read_after_a_restart_counts_the_energy_used_while_no_agent_ran():
    # The last run's totals ended at 50,000,000 mJ at monotonic 1000 s; 30 s later, at 300 W.
    e = _resumed(50_000_000, 1000.0)
    out = e.tick(1030.0, 1_800_000_030.0, 300.0, 0.5, counter_mj=50_000_000 + 9_000_000)
    assert [(s.t0, s.t1, s.joules, s.source) for s in out] == [(1_800_000_000.0, 1_800_000_030.0, 9000.0, "counter")]
    assert e.counter_mark == (59_000_000, 1030.0)
    # From here on, ordinary counter intervals.
    out = []
    for k in range(1, 6):
        out += e.tick(1030.0 + k, 1_800_000_030.0 + k, 300.0, 0.5,
                      counter_mj=59_000_000 + 1_500_000 if k == 5 else None)
    assert sum(s.joules for s in out) == pytest.approx(1500.0)


@pytest.mark.parametrize("mj0, mono0, now_mj, max_watts, why", [
    (50_000_000, 1000.0, 40_000_000, 700.0, "the counter went back: a driver reload in between"),
    (50_000_000, 1000.0, 50_000_000 + 30_000_000, 700.0, "more than the power limit allows over the gap"),
    (10_000_000, 1000.0, 10_000_000 + 3_000_000, 700.0, "a counter restarted in the gap could have got this far"),
    (50_000_000, 1030.0, 51_000_000, 700.0, "no time passed (a clock that is not this boot's)"),
    (50_000_000, 1000.0, 51_000_000, None, "no power limit to bound it"),
])
def test_a_gap_the_counter_cannot_vouch_for_is_not_counted(mj0, mono0, now_mj, max_watts, why):
    e = _resumed(mj0, mono0, max_watts)
    assert e.tick(1030.0, 1_800_000_030.0, 300.0, 0.5, counter_mj=now_mj) == [], why
    assert e.counter_mark == (now_mj, 1030.0)  # a plain new baseline


def test_only_the_first_read_bridges():
    """A first tick without a counter answer: later reads are this run's, never the gap's."""
    e = _resumed(50_000_000, 1000.0)
    assert e.tick(1030.0, 1_800_000_030.0, 300.0, 0.5, counter_mj=None) == []
    out = e.tick(1031.0, 1_800_000_031.0, 300.0, 0.5, counter_mj=59_300_000)
    assert all(s.t0 >= 1_800_000_030.0 for s in out) and sum(s.joules for s in out) <= 300.0
