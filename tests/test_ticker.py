"""The sample tick's own thread (agent.service.Ticker): a monotonic grid, no overlap, no burst."""

from __future__ import annotations

import threading
import time

from agent.service import Ticker


def run_ticker(func, interval: float, seconds: float):
    skips: list[int] = []
    errors: list[BaseException] = []
    ticker = Ticker(func, interval, on_skip=skips.append, on_error=errors.append)
    ticker.start()
    time.sleep(seconds)
    ticker.stop()
    return skips, errors


def test_beats_lie_on_a_fixed_grid():
    starts: list[float] = []
    t0 = time.monotonic()
    skips, errors = run_ticker(lambda: starts.append(time.monotonic() - t0), 0.05, 0.53)
    assert not skips and not errors
    assert len(starts) in (9, 10, 11)
    # Beat k falls at k x interval after the start: jitter does not add up over the run.
    for k, t in enumerate(starts, start=1):
        assert 0.05 * k - 0.002 <= t < 0.05 * k + 0.03, (k, t)


def test_a_long_tick_drops_the_beats_it_covered_and_the_next_falls_on_the_grid():
    starts: list[float] = []
    running = threading.Lock()
    t0 = time.monotonic()

    def tick():
        assert running.acquire(blocking=False), "two ticks at once"
        try:
            starts.append(time.monotonic() - t0)
            if len(starts) == 2:
                time.sleep(0.27)  # beats 3..7 (0.15..0.35 s) pass while this one runs
        finally:
            running.release()

    skips, errors = run_ticker(tick, 0.05, 0.62)
    assert not errors
    assert sum(skips) == 5, skips
    # No tick at once when the long one ends (0.37 s): the next is beat 8 at 0.40 s.
    assert 0.40 - 0.002 <= starts[2] < 0.40 + 0.03, starts


def test_a_failing_tick_is_reported_and_the_beat_goes_on():
    calls = []

    def tick():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    skips, errors = run_ticker(tick, 0.05, 0.33)
    assert [str(e) for e in errors] == ["boom"]
    assert len(calls) >= 5


def test_stop_waits_for_the_tick_in_progress_and_no_beat_follows():
    events: list[str] = []
    started = threading.Event()

    def tick():
        events.append("start")
        started.set()
        time.sleep(0.1)
        events.append("end")

    ticker = Ticker(tick, 0.02, on_skip=lambda n: None, on_error=lambda e: None)
    ticker.start()
    assert started.wait(2.0)
    ticker.stop()
    assert events[-1] == "end"
    n = len(events)
    time.sleep(0.1)
    assert len(events) == n
