"""The running daemon: scheduler, HTTP endpoint, signals and systemd notification."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from apscheduler.events import EVENT_JOB_ERROR, JobEvent
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from .config import Settings, parse_listen
from .exporter import health_of, make_registry
from .http import Listener, MetricsServer
from .sampler import Sampler

log = logging.getLogger(__name__)


#: A SIGHUP came before the service put up its own handlers (see :func:`defer_sighup_until_serving`).
_early_hup = False


def defer_sighup_until_serving() -> None:
    """At the start of a serving command: a SIGHUP from now on only notes itself, and the
    service reads the configuration again once it serves (:meth:`Service.run_forever`).
    SIGHUP's default action ends the process, and a start can take long (an NVML init that
    hangs for its 10 s, a long trace being read)."""

    def on_hup(_signum: int, _frame: Any) -> None:
        global _early_hup
        _early_hup = True  # only this in the handler: the main thread may be anywhere (holding a lock)

    try:
        signal.signal(signal.SIGHUP, on_hup)
    except ValueError:  # not the main thread (tests calling main): nothing to defer there
        pass


#: The notify socket, connected once (WATCHDOG=1 goes out every tick): (address, socket).
_notify: tuple[str, socket.socket] | None = None
_notify_lock = threading.Lock()


def sd_notify(message: str) -> None:
    """Tell systemd about our state (``Type=notify``, ``WatchdogSec=``); no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with _notify_lock:
        _send_notify(address, message)


def _send_notify(address: str, message: str) -> None:
    global _notify
    try:
        if _notify is None or _notify[0] != address:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(address)
            except OSError:
                s.close()
                raise
            _notify = (address, s)
        _notify[1].sendall(message.encode())
    except OSError as exc:
        if _notify is not None:
            _notify[1].close()
            _notify = None  # connected again on the next message
        log.debug("sd_notify failed: %s", exc)


#: NVML init that failed at start is retried after this long, doubling up to the cap. Units: s.
SOURCE_RETRY_FIRST_SECONDS = 5.0
SOURCE_RETRY_MAX_SECONDS = 300.0


class _PacedTrigger(BaseTrigger):
    """A trigger that never fires by itself: :class:`MonotonicPacer` sets each run.

    apscheduler's own triggers compute the next run in wall-clock time, so an
    NTP step or a VM resume that moves the clock back by 20 s stops every job
    for 20 s. Here the pacer decides *when* on the monotonic clock and hands
    the run to apscheduler, which still executes it on its thread pool with
    ``max_instances=1`` (a run never overlaps the previous one).
    """

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        # None at creation: the job waits, paused, for the pacer. After a run, a
        # date far away keeps the job in the store (None would remove it).
        return None if previous_fire_time is None else previous_fire_time + timedelta(days=3650)


class MonotonicPacer:
    """Runs apscheduler jobs every ``interval`` seconds of the monotonic clock.

    Beats lie on a fixed grid (no drift). Beats that passed while the process
    was stalled are skipped, not run in a burst, and reported to ``on_skip``.
    """

    def __init__(self, scheduler: BackgroundScheduler, on_skip: Callable[[str, int], None]) -> None:
        self.scheduler = scheduler
        self.on_skip = on_skip
        self._jobs: list[list[Any]] = []  # [job id, interval, next beat (monotonic)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacer", daemon=True)

    def add(self, job_id: str, func: Callable[[], Any], interval: float, *, first_now: bool = False) -> None:
        self.scheduler.add_job(
            func, _PacedTrigger(), id=job_id, max_instances=1, coalesce=True, misfire_grace_time=None
        )
        with self._lock:
            self._jobs.append([job_id, interval, time.monotonic() + (0.0 if first_now else interval)])
        self._changed.set()

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs = [j for j in self._jobs if j[0] != job_id]
        try:
            self.scheduler.remove_job(job_id)
        except JobLookupError:
            pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [j for j in self._jobs if now >= j[2]]
                for j in due:
                    behind = math.floor((now - j[2]) / j[1])
                    if behind:
                        self.on_skip(j[0], behind)
                    j[2] += j[1] * (behind + 1)
                wait = min((j[2] for j in self._jobs), default=now + 1.0) - now
            for j in due:
                try:
                    self.scheduler.modify_job(j[0], next_run_time=datetime.now(timezone.utc))
                except JobLookupError:
                    pass
            self._changed.wait(max(0.0, wait))
            self._changed.clear()


class Ticker:
    """Calls ``func`` every ``interval`` seconds of the monotonic clock, on its own thread.

    The sampling tick is the agent's only frequent work, so it does not go through
    apscheduler: there each tick woke three threads (pacer, scheduler, pool worker)
    and paid apscheduler's per-run bookkeeping. Here it wakes one. Measured whole
    (benchmarks/process_overhead.py, 8 fake GPUs, 2-core VM, back to back): 1.52 ms
    of CPU per second with the tick on apscheduler, 1.39 ms on this thread. The
    slower jobs (persist, sample buffer, BMC, pod names) stay on apscheduler. Semantics are those the job had: a tick never overlaps itself; beats
    that passed while a tick ran long are dropped (the next tick is the next beat of
    the grid), and beats missed while the process was stalled are not run in a burst
    (one late tick, then the grid); both are reported to ``on_skip``. An exception
    goes to ``on_error`` without stopping the beat. Beats lie on a fixed monotonic
    grid, so a wall-clock step cannot stall or hurry them.
    """

    def __init__(self, func: Callable[[], Any], interval: float, *, on_skip: Callable[[int], None],
                 on_error: Callable[[BaseException], None], name: str = "tick") -> None:
        self.func = func
        self.interval = interval
        self.on_skip = on_skip
        self.on_error = on_error
        # Held until stop() releases it; the beat waits on it with a timeout. A bare lock, not an
        # Event: Event.wait is a Condition (a new lock and a waiter list per wait), and on the 2-core
        # VM of benchmarks/process_overhead.py each timed wait cost ~90 µs of CPU against ~70.
        self._running = threading.Lock()
        self._running.acquire()
        self._stopping = False
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No beat starts after this; waits for a tick in progress (unless called from the tick itself)."""
        with self._stop_lock:
            if not self._stopping:
                self._stopping = True
                self._running.release()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        beat = time.monotonic() + self.interval
        while not self._running.acquire(timeout=max(0.0, beat - time.monotonic())):
            behind = math.floor((time.monotonic() - beat) / self.interval)
            if behind > 0:
                self.on_skip(behind)
            beat += self.interval * (max(behind, 0) + 1)
            try:
                self.func()
            except Exception as exc:  # a failing tick must never end the sampling
                self.on_error(exc)
            # Beats that came while this tick ran are dropped, as apscheduler's max_instances=1
            # drops them: the next tick is the next beat of the grid, not one at once.
            late = time.monotonic() - beat
            if late >= 0:
                missed = math.floor(late / self.interval) + 1
                self.on_skip(missed)
                beat += self.interval * missed


#: How often the kubelet is asked which pods hold which GPUs. Units: s.
POD_RESOURCES_INTERVAL_SECONDS = 30.0
#: How long a scrape waits for a save already under way (a slow disk) before it is served the
#: totals of the last save instead of the newest tick's. Units: s.
SERVE_SAVE_WAIT_SECONDS = 1.0


class Service:
    """Runs a :class:`Sampler` on a schedule and serves its snapshots.

    For a replay, each tick first moves the trace clock forward by
    ``tick_seconds`` of trace time; ticks then fire every
    ``tick_seconds / speed`` of real time. When a single (non-looping) replay
    reaches the end of the trace, a final tick reads the counters and the
    schedule stops; the endpoint keeps serving the final state.
    """

    def __init__(
        self,
        settings: Settings,
        sampler: Sampler,
        *,
        replay: Any = None,
        speed: float = 1.0,
        store: Any = None,
        reload: Callable[[], Any] | None = None,
        listener: Listener | None = None,
        open_source: Callable[[], tuple[Any, dict[int, str]]] | None = None,
        open_pending: Any = None,
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.replay = replay
        self.tick_seconds = settings.agent.tick_seconds
        self.interval = self.tick_seconds / speed if replay is not None else self.tick_seconds
        self.store = store
        if store is not None and sampler.attribution is not None:
            # Per-job records: each workload's final totals, appended when it expires (docs/report.md).
            from .jobrecords import JobRecords

            sampler.ledger.workloads.on_expire = JobRecords(store.dir)
        #: Why the last persist failed; None once one succeeds. Shown in /healthz.
        self.persist_error: str | None = None
        self.stopped = threading.Event()
        #: Set by a signal handler; the main loop acts on it (never inside the handler).
        self._wake = threading.Event()
        self._reload_requested = False
        self._save_requested = False
        self._stop_signal: str | None = None
        #: Loads and checks the configuration again (SIGHUP), as at start: returns an
        #: ``agent.cli.Checked`` or raises Refused; None: reload not possible.
        self._reload = reload
        self._finished = False
        #: Opens the GPU source and probes its energy methods (raises SourceUnavailable): tried
        #: again with back-off while the sampler has none (the driver loads after the agent).
        self._open_source = open_source
        #: The first open, still hanging at start (an ``agent.gpucalls.Pending``): its outcome
        #: is waited for before any new attempt, so attempts never pile onto a stuck driver.
        self._open_pending = open_pending
        #: Saves, and what changes the snapshot besides a tick (a reload, a GPU source attached),
        #: one at a time: a save knows which snapshot its totals cover.
        self._persist_lock = threading.Lock()
        #: The newest snapshot whose totals are all on disk (None before the first save).
        self._durable: Any = None
        #: The snapshot the scrape being rendered gets (see :meth:`_served_snapshot`).
        self._serving: Any = sampler.snapshot
        host, port = parse_listen(settings.agent.listen)
        registry = make_registry(lambda: self._serving)
        self.server = MetricsServer(
            host, port, registry, self._health, snapshot=self._served_snapshot,
            latest=lambda: self.sampler.snapshot, listener=listener
        )
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_event, EVENT_JOB_ERROR)
        self.pacer = MonotonicPacer(self.scheduler, self._on_skip)
        self.ticker = Ticker(self._job, self.interval, on_skip=lambda beats: self._on_skip("sample", beats),
                             on_error=self._on_tick_error, name="sample")
        self.dcmi = None
        ipmi = settings.host.ipmi
        if ipmi.enabled and replay is None:
            from .sources.ipmi import DcmiPoller

            self.dcmi = DcmiPoller(ipmi)

    def _health(self) -> tuple[bool, dict[str, Any]]:
        return health_of(self.sampler.snapshot, self.tick_seconds, persist_error=self.persist_error)

    def _on_event(self, event: JobEvent) -> None:
        """A job of the scheduler (persist, dcmi, samples; the tick has its own :class:`Ticker`) failed."""
        if event.code == EVENT_JOB_ERROR:
            self.sampler.count("tick_exception")
            log.error("%s job failed: %r", event.job_id, getattr(event, "exception", None))

    def _on_tick_error(self, exc: BaseException) -> None:
        self.sampler.count("tick_exception")
        log.error("sample job failed: %r", exc)

    def _on_skip(self, job_id: str, beats: int) -> None:
        """Whole beats of ``job_id`` passed while it ran long or the process was stalled (not run in a burst).
        Energy stays exact: it is time-based."""
        if job_id == "sample":
            self.sampler.count("tick_skipped", beats)

    def _job(self) -> None:
        if self._finished:
            return
        final = False
        if self.replay is not None:
            # The sub-tick reads of the power-sample buffer happen at their trace times.
            poll = self.sampler.samples_poll_seconds
            self.replay.advance(self.tick_seconds, every=poll, on_step=self.sampler.poll_samples)
            final = self.replay.finished
        self.sampler.tick(final=final)
        sd_notify("WATCHDOG=1")
        if final:
            self._finished = True
            log.info(
                "replay finished: %.1f s of trace; serving the final state until stopped",
                self.replay.duration_seconds,
            )
            self.ticker.stop()
            self.persist()

    def _poll_dcmi(self) -> None:
        """The BMC is slow (a subprocess, up to timeout_seconds): its own job, never the tick's."""
        assert self.dcmi is not None
        self.dcmi.poll()
        reading = self.dcmi.fresh_reading()
        if reading is None and self.dcmi.consecutive_failures:
            self.sampler.count("dcmi")
        self.sampler.wall_power = reading

    def _retry_source(self) -> None:
        """NVML did not open at start: try again, SOURCE_RETRY_FIRST_SECONDS doubling up to
        SOURCE_RETRY_MAX_SECONDS, until it opens; its GPUs are then sampled without a restart.
        Runs on its own daemon thread: an attempt that hangs holds up nothing else."""
        from .sources.gpu import SourceUnavailable

        assert self._open_source is not None
        delay = SOURCE_RETRY_FIRST_SECONDS
        pending = self._open_pending
        while pending is not None and not self.stopped.is_set():
            outcome = pending.wait(1.0)
            if outcome is None:
                continue
            pending = None
            ok, value = outcome
            if ok:
                if not self.stopped.is_set():
                    self._attach_source(*value)
                return
            log.info("GPU source still unavailable (%s); next try in %.0f s", value, delay)
        while not self.stopped.wait(delay):
            try:
                source, methods = self._open_source()
            except SourceUnavailable as exc:
                delay = min(2 * delay, SOURCE_RETRY_MAX_SECONDS)
                log.info("GPU source still unavailable (%s); next try in %.0f s", exc, delay)
                continue
            except Exception as exc:  # never let the retry thread die silently
                delay = min(2 * delay, SOURCE_RETRY_MAX_SECONDS)
                log.warning("opening the GPU source failed: %r; next try in %.0f s", exc, delay)
                continue
            if not self.stopped.is_set():
                self._attach_source(source, methods)
            return

    def _attach_source(self, source: Any, methods: dict[int, str]) -> None:
        with self._persist_lock:
            self.sampler.attach(source, methods)
        log.info("GPU source opened: %d GPU(s) are sampled from now on", len(source.devices()))
        self._add_samples_job()

    def _add_samples_job(self) -> None:
        poll = self.sampler.samples_poll_seconds
        if poll is not None and self.replay is None:
            # GPUs without an energy counter: their power-sample buffer holds ~2.4 s, so with
            # ticks longer than 1 s it is also read every second between them (replays: _job).
            self.pacer.add("samples", self.sampler.poll_samples, poll)

    def persist(self) -> bool:
        """Write the totals now. A failed write is logged, counted and shown in /healthz
        (degraded) until a write succeeds; the next one retries. Returns whether it was written."""
        if self.store is None:
            return True
        with self._persist_lock:
            return self._persist(sync=True)

    def _persist(self, *, sync: bool) -> bool:
        """:meth:`persist` under the lock; ``sync=False`` leaves the flush to disk to the kernel."""
        covered = self.sampler.snapshot  # the totals written next are at least this snapshot's
        try:
            self.store.save(self.sampler.state(), sync=sync)
        except (OSError, ValueError) as exc:
            self.sampler.count("state_write")
            self.persist_error = f"could not write state file {self.store.path if sync else self.store.recent_path}: {exc}"
            log.error("%s", self.persist_error)
            return False
        self.persist_error = None
        self.sampler.saved(time.time())
        dated = self.sampler.snapshot  # ``covered`` with the save's time, unless a tick came between
        same = (dated.agent.ticks_total == covered.agent.ticks_total and dated.t_wall == covered.t_wall)
        self._durable = dated if same else covered
        return True

    def _served_snapshot(self) -> Any:
        """The snapshot a scrape is served (on a render worker, never the event loop).

        With a state file, one whose totals are on disk: a scrape that finds a tick newer than the
        last save writes the totals first (at most one write per tick, however many scrapers;
        without fsync: a process killed with SIGKILL leaves what it wrote in the page cache), so
        whatever Prometheus has read, the next process starts from at least that and no counter
        goes back after ``kill -9``. A save that takes longer than :data:`SERVE_SAVE_WAIT_SECONDS`
        (one under way on a slow disk) serves the last saved totals; while saves fail
        (``/healthz`` degraded) the newest tick is served, as without a state file."""
        latest = self.sampler.snapshot
        if self.store is None or self._durable is None or self.persist_error is not None:
            self._serving = latest
            return latest
        if latest is not self._durable and self._persist_lock.acquire(timeout=SERVE_SAVE_WAIT_SECONDS):
            try:
                if self.sampler.snapshot is not self._durable:
                    self._persist(sync=False)
            finally:
                self._persist_lock.release()
        self._serving = self._durable if self.persist_error is None else self.sampler.snapshot
        return self._serving

    def start(self) -> None:
        self.sampler.tick()  # first snapshot before the endpoint opens
        self.persist()  # proves the state file can be written, and dates the first save
        self.server.start()
        sd_notify("READY=1")  # serving from here on; WATCHDOG=1 follows every tick
        self._add_samples_job()
        if self.store is not None:
            self.pacer.add("persist", self.persist, self.settings.agent.persist_interval_seconds)
        if self.dcmi is not None:
            self.pacer.add("dcmi", self._poll_dcmi, self.settings.host.ipmi.interval_seconds, first_now=True)
        stage = self.sampler.attribution
        if stage is not None and stage.pods is not None:
            # Pod names from the kubelet: a round trip of its own, never in the tick or a scrape.
            self.pacer.add("pod_resources", stage.refresh_pods, POD_RESOURCES_INTERVAL_SECONDS, first_now=True)
        self.scheduler.start()
        self.pacer.start()
        self.ticker.start()
        if self._open_source is not None and self.sampler.source is None:
            threading.Thread(target=self._retry_source, name="gpu-source-retry", daemon=True).start()
        log.info("serving on %s/metrics", self.server.url)

    def stop(self) -> bool:
        """Stop sampling, settle and save the totals, close the endpoint. False if the final save failed."""
        sd_notify("STOPPING=1")
        self.stopped.set()  # also ends the GPU source retry
        self.ticker.stop()
        self.pacer.stop()
        try:
            self.scheduler.shutdown(wait=True)
        except Exception:
            pass
        if not self._finished and self.sampler.source is not None:
            # A last tick with a counter read, so nothing counted is held back.
            self.sampler.tick(final=True)
        saved = self.persist()
        self.server.stop()
        return saved

    # -- signals ----------------------------------------------------------

    #: Signals that end the agent, always through the final save. SIGKILL cannot be caught:
    #: after it at most one persist interval is lost.
    STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
                    "SIGXCPU", "SIGXFSZ", "SIGPWR")

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name
            self.stopped.set()
            self._wake.set()

        def on_hup(_signum: int, _frame: Any) -> None:
            self._reload_requested = True
            self._wake.set()

        def on_usr1(_signum: int, _frame: Any) -> None:
            self._save_requested = True
            self._wake.set()

        for name in self.STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGUSR1, on_usr1)

    def reload(self) -> bool:
        """SIGHUP: apply a valid new configuration from now on; refuse an invalid one."""
        from .config import Refused, clip_line

        if self._reload is None:
            log.warning("received SIGHUP, but this agent has no configuration to reload")
            return False
        try:
            checked = self._reload()
        except Refused as exc:
            log.error("received SIGHUP: new configuration refused, the running one stays: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 — no file may end the daemon: validate should have said
            log.error("received SIGHUP: new configuration refused, the running one stays: %s",
                      clip_line(f"{type(exc).__name__}: {exc}"))
            return False
        new = checked.settings
        with self._persist_lock:
            self.sampler.reconfigure(new)
        # The web-config file is read again, as at start: TLS, basic auth and headers apply now.
        if checked.web is not None or self.server.listener.web is not None:
            try:
                self.server.apply_web(checked.web)
            except Exception as exc:  # never let the endpoint end the agent: it keeps what it had
                log.error("received SIGHUP: the web config could not be applied, the endpoint keeps its own: %r", exc)
            else:
                log.info("received SIGHUP: web config %s", f"{checked.web.path}: {checked.web.describe()}"
                         if checked.web is not None else "removed: plain HTTP, no auth")
        restart_only = [
            name for name, old, cur in (
                ("agent.listen", self.settings.agent.listen, new.agent.listen),
                ("agent.tick_seconds", self.settings.agent.tick_seconds, new.agent.tick_seconds),
                ("agent.state_dir", self.settings.agent.state_dir, new.agent.state_dir),
                ("agent.persist_interval_seconds", self.settings.agent.persist_interval_seconds,
                 new.agent.persist_interval_seconds),
                ("gpu", self.settings.gpu, new.gpu),
                ("host", self.settings.host, new.host),
            ) if old != cur
        ]
        logging.getLogger().setLevel(new.agent.log_level.upper())
        if restart_only:
            log.warning("received SIGHUP: %s changed and take effect only after a restart", ", ".join(restart_only))
        self.settings = new
        return True

    def run_forever(self) -> int:
        self._install_signals()
        self.start()
        global _early_hup
        if _early_hup:  # a SIGHUP while starting: acted on now that the agent serves
            _early_hup = False
            log.info("received SIGHUP while starting: reading the configuration again now")
            self._reload_requested = True
            self._wake.set()
        while not self.stopped.is_set():
            # No timeout: the signal handlers set _wake, so an idle agent's main thread never wakes.
            self._wake.wait()
            self._wake.clear()
            if self._reload_requested and not self.stopped.is_set():
                self._reload_requested = False
                try:
                    self.reload()
                except Exception as exc:  # noqa: BLE001 — applying it half-way must not end the agent
                    log.error("received SIGHUP: applying the new configuration failed: %r", exc)
            if self._save_requested:
                self._save_requested = False
                log.info("received SIGUSR1: writing the totals now")
                self.persist()
        log.info("received %s, stopping", self._stop_signal or "a stop request")
        started = time.monotonic()
        saved = self.stop()
        log.info("stopped in %.2f s", time.monotonic() - started)
        if not saved:  # the final save failed: say so to systemd and the operator
            print(f"gpu-cost-agent: the final save failed, totals since the last good save are lost: "
                  f"{self.persist_error}", file=sys.stderr)
            return 1
        return 0
