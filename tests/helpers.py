"""Test helpers importable from every test module."""

from __future__ import annotations

import bisect
from pathlib import Path

from agent.sampler import Sampler
from agent.sources.replay import ReplaySource
from agent.trace import Trace


ROOT = Path(__file__).resolve().parents[1]
H100_TRACE = ROOT / "fixtures" / "h100_trace_a.jsonl"
#: Two processes on one H100, with the driver's real power-sample buffer (fixtures/make_h100_trace_c.py).
H100_TRACE_C = ROOT / "fixtures" / "h100_trace_c.jsonl"
#: 74.9 s on a real H100, two users' processes, recorded by ``gpu-cost-agent record``.
H100_TWO_USERS = ROOT / "fixtures" / "h100_two_users.jsonl.gz"


def counter_delta_joules(trace: Trace, gpu: str = "0") -> float:
    """The trace's own hardware-counter delta from first to last row: the truth. Units: J."""
    values = [r["gpus"][gpu]["energy_mj"] for r in trace.rows if r["gpus"].get(gpu, {}).get("energy_mj") is not None]
    return (values[-1] - values[0]) / 1000.0


def replay_through_sampler(
    trace: Trace,
    *,
    tick: float = 1.0,
    hide: tuple[str, ...] = (),
    method: str = "auto",
    counter_interval: float = 5.0,
    start_offset: float = 0.0,
    poll: bool = True,
    attribution: bool = False,
    ledger=None,
    on_tick=None,
) -> Sampler:
    """Play ``trace`` once through the real Sampler with a ``tick`` (trace seconds) and return it.

    As the service does, the replay clock stops between ticks for the reads of the
    power-sample buffer (``poll=False``: no reads between ticks, as before they existed).
    ``on_tick(sampler, trace_time)`` is called after every tick, the first included.
    """
    src = ReplaySource(trace, hide=hide)
    stage = None
    if attribution:
        from agent.accounting import Ledger
        from agent.attribution.split import Attributor, recorded_keys, replay_keys

        ledger = ledger or Ledger()
        stage = Attributor(ledger.workloads, recorded_keys(src.identities) if src.identities else replay_keys)
    sampler = Sampler(
        src, clock=lambda: (src.t, src.t), energy_method=method, counter_interval=counter_interval, tick_seconds=tick,
        ledger=ledger, attribution=stage,
    )
    if start_offset:
        src.seek(src.t + start_offset)
    sampler.tick()
    if on_tick:
        on_tick(sampler, src.t)
    every = sampler.samples_poll_seconds if poll else None
    while not src.finished:
        src.advance(tick, every=every, on_step=sampler.poll_samples)
        sampler.tick(final=src.finished)
        if on_tick:
            on_tick(sampler, src.t)
    return sampler


def real_nvml_present() -> bool:
    """True on a machine with a working NVIDIA driver (where "no GPU" cannot be tested for real)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def exported_energy(sampler: Sampler, gpu: int = 0) -> float:
    return sum(sampler.snapshot.gpus[gpu].energy_joules.values())


def _counter_series(trace: Trace, gpu: str) -> tuple[list[float], list[float]]:
    rows = [r for r in trace.rows if r["gpus"].get(gpu, {}).get("energy_mj") is not None]
    return [float(r["t"]) for r in rows], [r["gpus"][gpu]["energy_mj"] / 1000.0 for r in rows]


def counter_at(trace: Trace, t: float, gpu: str = "0") -> float:
    """The counter (J) at trace time ``t``, linear between rows; past the last row it goes on
    at the counter's own mean power over its last second. Units: J."""
    times, joules = _counter_series(trace, gpu)
    if t >= times[-1]:
        k = bisect.bisect_left(times, times[-1] - 1.0)
        watts = (joules[-1] - joules[k]) / (times[-1] - times[k])
        return joules[-1] + watts * (t - times[-1])
    i = max(0, bisect.bisect_right(times, t) - 1)
    return joules[i] + (joules[i + 1] - joules[i]) * (t - times[i]) / (times[i + 1] - times[i])


def counter_delay_seconds(trace: Trace, gpu: str = "0") -> float:
    """How far the energy counter runs behind the power-sample buffer's timestamps (s).

    Best fit, on a 5 ms grid from 0 to 200 ms, of the counter read at each row against the
    samples integrated up to that row's time less the delay (an offset left free). The
    counter moves in ~100 ms steps, so a read is on average tens of ms stale.
    """
    rows = (r["gpus"].get(gpu, {}) for r in trace.rows)
    samples = sorted((ts / 1e6, mw / 1000.0) for g in rows for ts, mw in g.get("samples", ()))
    st = [s[0] for s in samples]
    cum = [0.0]
    for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
        cum.append(cum[-1] + 0.5 * (p0 + p1) * (t1 - t0))

    def integrated(t: float) -> float:
        i = bisect.bisect_right(st, t) - 1
        if i < 0:
            return 0.0
        if i >= len(st) - 1:
            return cum[-1]
        return cum[i] + samples[i][1] * (t - st[i])

    times, joules = _counter_series(trace, gpu)
    inside = [(t, j) for t, j in zip(times, joules) if st[0] + 0.2 <= t <= st[-1]]
    best: tuple[float, float] | None = None
    for ms in range(0, 201, 5):
        d = [j - integrated(t - ms / 1000.0) for t, j in inside]
        mean = sum(d) / len(d)
        rms = (sum((x - mean) ** 2 for x in d) / len(d)) ** 0.5
        if best is None or rms < best[0]:
            best = (rms, ms / 1000.0)
    assert best is not None
    return best[1]
