"""Exact GPU energy from the hardware counter, the driver's power samples, or polled power.

One :class:`GpuEnergy` per GPU turns the readings of each tick into
:class:`EnergySlice` s: "this GPU used J joules between wall times t0 and t1,
measured by <source>". Everything downstream (totals, cost, attribution) adds
slices up, so energy is counted exactly once and each joule keeps the time it
was used (a tariff band can change inside a counter interval).

Methods, best first:

``counter``
    ``nvmlDeviceGetTotalEnergyConsumption``. Exact between two reads, but one
    read costs ~3.8 ms of CPU on H100, so it is read every
    ``counter_interval`` seconds (15 s by default), not every tick, and besides
    at the ends of every stretch priced differently: the sampler forces a read on
    the tick that crosses a tariff band, PUE or carbon edge, and at shutdown or
    reload. Polled power only shapes the energy between two exact reads. The exact delta of each
    counter interval is apportioned across the ticks inside it in proportion
    to the polled power of each tick. Totals therefore advance when a counter
    interval closes: they lag by at most one interval and never go backwards.
``samples``
    The driver's power ring buffer (one sample per 20 ms on H100, ~2.4 s deep),
    read every tick and, when the tick is longer than a second, also between
    ticks (:meth:`GpuEnergy.add_samples`), and integrated sample by sample, so
    bursts between ticks are kept and a long tick loses nothing.
``polled``
    Trapezoidal integration of the power read each tick: the last resort, and
    ~4 % off already at 5 s polling of instantaneous power on the H100 trace.

A stretch that the chosen method could not measure (a counter that went
backwards, samples lost from the ring buffer, a counter that stopped
answering) is estimated (from polled power; lost samples by the straight line
between the samples around them) and its slice says ``polled``, so the
exported ``source`` label never claims more exactness than there was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

METHODS = ("counter", "samples", "polled")


@dataclass(frozen=True)
class EnergySlice:
    """Energy one GPU used in one stretch of wall time. Units: J, s since the epoch."""

    gpu: int
    t0: float
    t1: float
    joules: float
    #: How it was measured: ``counter``, ``samples`` or ``polled``.
    source: str
    #: GPU utilisation during the stretch (the tick's reading), if known. Units: ratio.
    utilization: float | None = None


@dataclass
class _Tick:
    t0: float
    t1: float
    weight: float  # share of an exact counter delta this tick gets (J-like)
    polled: float  # polled energy estimate (J), used where no exact delta exists
    utilization: float | None


@dataclass
class GpuEnergy:
    """Energy accounting for one GPU. Feed it one :meth:`tick` per sampling tick."""

    gpu: int
    method: str
    counter_interval: float = 15.0
    #: The nominal tick (s). The counter is read on the tick due within half a tick
    #: of the interval's end, so tick jitter never pushes a read one tick late.
    tick_seconds: float = 1.0
    #: A counter interval whose reads kept failing this long is filled from polled power.
    counter_stale_after: float = 30.0
    #: While the counter is stale it is asked again after this long, doubling up to the max. Units: s.
    counter_retry_max: float = 300.0
    #: Longest stretch without power samples that is still bridged by the samples path.
    samples_max_gap: float = 1.0
    #: Upper bound for plausible power (W), to tell a counter reset from a real jump.
    max_watts: float | None = None
    on_event: Callable[[str], None] = lambda kind: None

    _mono: float | None = None
    _wall: float | None = None
    _power: float | None = None
    _counter_mj: int | None = None
    _counter_mono: float | None = None
    #: Monotonic s since which no counter read succeeded while one was due: the last good read,
    #: else the first tick. Stale is judged from it.
    _counter_since: float | None = None
    #: Whether the counter is stale: its reads failed for ``counter_stale_after``. Every tick is
    #: then settled at once from polled power, and the counter is asked at ``_retry_at`` only.
    _stale: bool = False
    _retry_at: float = 0.0
    _retry_delay: float = 0.0
    #: The counter reading the persisted totals end at, from the state of an earlier run on
    #: this boot: (mJ, monotonic s). The first read bridges the time the agent was not running.
    _resume: tuple[int, float, float] | None = None
    #: Energy counted from polled power past the last counter reading by :meth:`flush` (a
    #: shutdown without an answer from the GPU). The counter reading stays the mark: the next
    #: read, or the next start's bridge, counts the counter's delta less this. Units: J.
    _flushed_j: float = 0.0
    _pending: list[_Tick] = field(default_factory=list)
    #: Newest power sample integrated: the left edge of the next sample's stretch.
    _anchor: tuple[int, int] | None = None
    #: Newest sample timestamp received (µs). Never goes back, so no sample counts twice.
    _seen_us: int = 0
    #: Sample energy integrated since the last tick (J), to be settled by the next one.
    _exact_j: float = 0.0
    #: Stretches between samples longer than ``samples_max_gap`` since the last tick:
    #: their length (s) and the straight line over them (J), a fallback estimate.
    _gap_s: float = 0.0
    _gap_line_j: float = 0.0
    #: Whether any new sample arrived since the last tick.
    _fresh: bool = False
    #: Samples only set where integration starts, nothing is counted from them: up to
    #: the first tick, and after a tick filled from polled power (the buffer still holds
    #: samples of that stretch, which must not count twice) until a tick reads new ones.
    _resync: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown energy method {self.method!r}")

    @property
    def _stale_after(self) -> float:
        """Seconds since the last good read after which the counter is stale: at least two
        intervals, so a long interval is not judged stale before a read was even due. Units: s."""
        return max(self.counter_stale_after, 2.0 * self.counter_interval)

    # -- what the sampler should read this tick ---------------------------

    def counter_due(self, mono: float) -> bool:
        """Whether this tick (at monotonic ``mono``) should read the energy counter.

        The read falls on the tick due within half a tick of the interval's end:
        ticks jitter by milliseconds, and with an exact comparison the tick that
        came a hair early was skipped, so a 5 s interval was read every 6 s.
        """
        if self.method != "counter":
            return False
        if mono < self._retry_at - 0.5 * self.tick_seconds:
            return False  # a read failed: the next try is put off (one interval; doubling once stale)
        if self._stale or self._counter_mono is None:
            return True
        return mono - self._counter_mono >= self.counter_interval - 0.5 * self.tick_seconds

    @property
    def counter_stale(self) -> bool:
        """Whether the energy counter has failed for ``counter_stale_after`` and not answered
        since: the GPU's energy is then estimated from polled power (``source="polled"``)."""
        return self._stale

    @property
    def samples_since_us(self) -> int:
        """Timestamp of the newest power sample received (0 before the first): read newer ones."""
        return self._seen_us

    def add_samples(self, samples: list[tuple[int, int]] | None) -> None:
        """Integrate power samples read from the driver's buffer between two ticks.

        The buffer holds only ~2.4 s (H100), so with a longer tick the sampler
        reads it in between. The energy is held until the next :meth:`tick`,
        which settles it into that tick's slice. Samples not newer than
        :attr:`samples_since_us` are ignored. Before the first tick the samples
        only set where integration starts.
        """
        if self.method == "samples" and samples:
            self._integrate(samples)

    def _integrate(self, samples: list[tuple[int, int]]) -> bool:
        """Integrate the samples newer than any seen; returns whether there were any."""
        fresh = sorted(s for s in samples if s[0] > self._seen_us)
        if not fresh:
            return False
        if not self._resync:
            prev = self._anchor
            for ts, mw in fresh:
                if prev is not None:
                    span = (ts - prev[0]) / 1e6
                    e = 0.5 * (prev[1] + mw) / 1000.0 * span
                    if span > self.samples_max_gap:
                        # The ring buffer lost samples here (read too late, or the
                        # driver paused): only an estimate can fill it.
                        self._gap_s += span
                        self._gap_line_j += e
                    else:
                        self._exact_j += e
                prev = (ts, mw)
            self._fresh = True
        self._anchor = fresh[-1]
        self._seen_us = fresh[-1][0]
        return True

    # -- per tick ---------------------------------------------------------

    def tick(
        self,
        mono: float,
        wall: float,
        power_watts: float | None,
        utilization: float | None = None,
        counter_mj: int | None = None,
        samples: list[tuple[int, int]] | None = None,
    ) -> list[EnergySlice]:
        """Account one tick; returns the slices that became final with it.

        ``counter_mj`` is passed only on ticks where the counter was read,
        ``samples`` only by the samples method (new samples since
        :attr:`samples_since_us`). Ticks may arrive late or irregularly: all
        integration uses the real ``mono`` times, never the nominal interval.
        """
        if self._mono is not None and (mono < self._mono or (mono == self._mono and counter_mj is None)):
            return []  # a duplicate or out-of-order tick carries no time
        # (A same-instant tick that brings a counter reading still closes the
        # counter interval: the final read at shutdown must settle what is pending.)
        first = self._mono is None
        dt = 0.0 if first else mono - self._mono  # type: ignore[operator]
        t0 = wall - dt
        p_prev = self._power if self._power is not None else power_watts
        p_now = power_watts if power_watts is not None else self._power
        polled = 0.0 if (p_prev is None or p_now is None) else 0.5 * (p_prev + p_now) * dt
        self._mono, self._wall = mono, wall
        if power_watts is not None:
            self._power = power_watts
        if self.method == "counter":
            # The reading at the end of a tick is, on Hopper and later, the
            # average over about the last second: the best weight for the tick
            # that just ended (on the H100 trace it halves the mean error of
            # splitting a counter interval, against the trapezoid).
            weight = p_now * dt if p_now is not None else dt
            return self._tick_counter(first, mono, _Tick(t0, wall, weight, polled, utilization), counter_mj)
        if self.method == "samples":
            return self._tick_samples(first, t0, wall, polled, utilization, samples)
        if first:
            return []
        return [EnergySlice(self.gpu, t0, wall, polled, "polled", utilization)]

    @property
    def counter_mark(self) -> tuple[int, float] | None:
        """(counter mJ, monotonic s) that every joule accounted so far ends at, or None.

        Every counter read settles the ticks before it, so what the totals hold ends exactly at
        the last reading; None where that is not so (no read yet, reads stale, flushed)."""
        if self.method != "counter" or self._counter_mj is None or self._counter_mono is None:
            return None
        return self._counter_mj, self._counter_mono

    @property
    def counted_past_mark(self) -> float:
        """Energy the totals hold past :attr:`counter_mark`, from polled power (see :meth:`flush`). Units: J."""
        return self._flushed_j

    def resume(self, counter_mj: int, mono: float, counted_j: float = 0.0) -> None:
        """Continue from the reading an earlier run's totals ended at (same boot: the monotonic
        clock and the counter go on across processes). The first read then counts the energy
        used while no agent ran, exact from the counter, if it is plausibly the same count, less
        ``counted_j`` the earlier run counted past that reading from polled power."""
        self._resume = (int(counter_mj), float(mono), max(0.0, float(counted_j)))

    def _bridge(self, wall: float, mono: float, counter_mj: int) -> list[EnergySlice]:
        """The energy between an earlier run's last reading and this first one, as one slice.

        Taken only if it cannot be a counter that restarted in between: the delta is not negative,
        fits under the GPU's power limit over the gap, and the earlier reading exceeds what a counter
        restarted in the gap could have reached (so a driver reload is never mistaken for use)."""
        resume, self._resume = self._resume, None
        if resume is None:
            return []
        mj0, mono0, counted = resume
        gap = mono - mono0
        delta_j = (counter_mj - mj0) / 1000.0
        bound = None if self.max_watts is None else self.max_watts * gap * 1.1 + 1.0
        if gap <= 0 or bound is None or not (0 <= delta_j <= bound) or mj0 / 1000.0 <= bound:
            log.info("GPU %d: the energy used while the agent was not running (%.1f s) is not counted: "
                     "the counter cannot bridge it (%.3f J -> %.3f J)", self.gpu, gap, mj0 / 1000.0,
                     counter_mj / 1000.0)
            return []
        if counted:
            log.info("GPU %d: %.3f J since its last counter reading %.1f s ago, %.3f J of it counted from polled "
                     "power at the last stop (the GPU did not answer then): the rest, %.3f J, from the counter",
                     self.gpu, delta_j, gap, counted, max(0.0, delta_j - counted))
            delta_j = max(0.0, delta_j - counted)
        else:
            log.info("GPU %d: %.3f J used in the %.1f s the agent was not running, from the energy counter",
                     self.gpu, delta_j, gap)
        return [EnergySlice(self.gpu, wall - gap, wall, delta_j, "counter")] if delta_j > 0 else []

    def _tick_counter(self, first: bool, mono: float, tick: _Tick, counter_mj: int | None) -> list[EnergySlice]:
        if not first:
            self._pending.append(tick)
        elif counter_mj is None:
            self._resume = None  # only a first read can bridge: later ones are this run's
        if self._counter_since is None:
            self._counter_since = mono
        if counter_mj is None:
            due = self.counter_due(mono)
            if self._stale:
                # Stale: nothing is held back, each tick is settled from polled power now; a
                # read that was due and failed again puts the next one off twice as long.
                if due:
                    self._retry_delay = min(2 * self._retry_delay, self.counter_retry_max)
                    self._retry_at = mono + self._retry_delay
                return self._settle_polled()
            if due and self._counter_mono is not None:
                self._retry_at = mono + self.counter_interval  # asked and failed: once an interval, not each tick
            # No counter this tick. If reads have failed for too long, stop
            # holding energy back: settle what is pending from polled power.
            if mono - self._counter_since > self._stale_after:
                self.on_event("energy_counter_stale")
                log.warning("GPU %d: the energy counter has not answered for %.0f s: energy is estimated from "
                            "polled power (source=\"polled\") until it does; asked again with back-off",
                            self.gpu, mono - self._counter_since)
                self._stale = True
                self._retry_delay = self.counter_interval
                self._retry_at = mono + self._retry_delay
                out = self._settle_polled()
                self._counter_mj = None
                self._counter_mono = None
                return out
            return []
        self._counter_since = mono
        self._retry_at = 0.0
        if self._stale:
            self._stale = False
            log.warning("GPU %d: the energy counter answers again: exact from here on (a new baseline)", self.gpu)
        if self._counter_mj is None:
            # First read (or first after a stale stretch): a new baseline.
            out = self._settle_polled()
            if first:
                out += self._bridge(tick.t1, mono, counter_mj)
            self._counter_mj, self._counter_mono = counter_mj, mono
            return out
        span = mono - self._counter_mono  # type: ignore[operator]
        delta_j = (counter_mj - self._counter_mj) / 1000.0
        self._counter_mj, self._counter_mono = counter_mj, mono
        plausible = self.max_watts is None or delta_j <= self.max_watts * span * 1.5 + 1.0
        if delta_j < 0 or not plausible:
            # Driver reload or GPU reset: the counter restarted somewhere in the
            # interval, so its delta says nothing; fill the interval from power.
            log.warning(
                "GPU %d: energy counter went from %.3f to %.3f J; interval filled from polled power",
                self.gpu,
                self._counter_mj / 1000.0 - delta_j,
                counter_mj / 1000.0,
            )
            self.on_event("counter_reset")
            return self._settle_polled()
        if self._flushed_j:
            delta_j, self._flushed_j = max(0.0, delta_j - self._flushed_j), 0.0
        return self._settle_exact(delta_j)

    def _settle_exact(self, delta_j: float) -> list[EnergySlice]:
        ticks, self._pending = self._pending, []
        if not ticks:
            return []
        total_w = sum(t.weight for t in ticks)
        total_dt = sum(t.t1 - t.t0 for t in ticks)
        out = []
        for t in ticks:
            share = t.weight / total_w if total_w > 0 else (t.t1 - t.t0) / total_dt if total_dt > 0 else 1 / len(ticks)
            out.append(EnergySlice(self.gpu, t.t0, t.t1, delta_j * share, "counter", t.utilization))
        return out

    def _settle_polled(self) -> list[EnergySlice]:
        ticks, self._pending = self._pending, []
        return [EnergySlice(self.gpu, t.t0, t.t1, t.polled, "polled", t.utilization) for t in ticks]

    def flush(self) -> list[EnergySlice]:
        """Settle pending ticks from polled power (a final tick without an answer from the GPU).

        The counter reading stays the mark, with what was settled noted past it
        (:attr:`counted_past_mark`): saved with the totals, the next start's bridge counts the
        counter's delta less that, so a GPU hung at shutdown loses nothing and counts nothing twice.
        """
        out = self._settle_polled()
        self._flushed_j += sum(s.joules for s in out)
        return out

    def _tick_samples(
        self,
        first: bool,
        t0: float,
        t1: float,
        polled: float,
        utilization: float | None,
        samples: list[tuple[int, int]] | None,
    ) -> list[EnergySlice]:
        resync = self._resync
        read_now = self._integrate(samples or [])
        exact, gap_s, gap_line, fresh = self._exact_j, self._gap_s, self._gap_line_j, self._fresh
        self._exact_j = self._gap_s = self._gap_line_j = 0.0
        self._fresh = False
        if first:
            # Nothing counted yet, so nothing can count twice: integration starts at
            # the newest sample now, or at the first one to come.
            self._resync = False
            return []
        if resync:
            # After a stretch filled from polled power, integration starts at the
            # newest sample this tick read itself (about now); until then the tick
            # is not measured by samples.
            self._resync = not read_now
            if self._resync and t1 - t0 > self.samples_max_gap:
                self.on_event("samples_gap")
            return [EnergySlice(self.gpu, t0, t1, polled, "polled", utilization)]
        if not fresh and t1 - t0 > self.samples_max_gap:
            # No new samples over a long tick: the driver stopped sampling, or
            # the buffer could not be read. Fall back to polled power.
            self._resync = True
            self.on_event("samples_gap")
            return [EnergySlice(self.gpu, t0, t1, polled, "polled", utilization)]
        out = []
        if exact > 0 or not gap_s:
            out.append(EnergySlice(self.gpu, t0, t1, exact, "samples", utilization))
        if gap_s:
            # Samples lost from the buffer (reads between ticks failed or came too
            # late): bridged by the straight line between the samples around the
            # stretch, and labelled an estimate. (Filling it at the tick's polled
            # power instead was no better on the H100 traces: +4.6 % against
            # -1.1 % on trace_c at 5 s ticks without reads between them.)
            self.on_event("samples_gap")
            out.append(EnergySlice(self.gpu, t0, t1, gap_line, "polled", utilization))
        return out
