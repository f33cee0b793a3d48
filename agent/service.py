"""The running daemon: scheduler, HTTP endpoint, signals and systemd notification."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .config import Settings, parse_listen
from .exporter import MetricsServer, health_of, make_registry
from .sampler import Sampler

log = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Tell systemd about our state (``Type=notify``, ``WatchdogSec=``); no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


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
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.replay = replay
        self.tick_seconds = settings.agent.tick_seconds
        self.interval = self.tick_seconds / speed if replay is not None else self.tick_seconds
        self.store = store
        self.stopped = threading.Event()
        self._finished = False
        host, port = parse_listen(settings.agent.listen)
        registry = make_registry(lambda: self.sampler.snapshot)
        self.server = MetricsServer(host, port, registry, self._health)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self.dcmi = None
        ipmi = settings.host.ipmi
        if ipmi.enabled and replay is None:
            from .sources.ipmi import DcmiPoller

            self.dcmi = DcmiPoller(ipmi)

    def _health(self) -> tuple[bool, dict[str, Any]]:
        return health_of(self.sampler.snapshot, self.tick_seconds)

    def _on_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_ERROR:
            self.sampler.errors["tick_exception"] += 1
            log.error("sampling tick failed: %r", getattr(event, "exception", None))
        else:
            # The previous tick was still running (max_instances=1) or the
            # process was stalled past the grace time: the tick is skipped,
            # never run twice at once. Energy stays exact; it is time-based.
            self.sampler.errors["tick_skipped"] += 1

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
            threading.Thread(target=self._stop_schedule, daemon=True).start()
            self.persist()

    def _poll_dcmi(self) -> None:
        """The BMC is slow (a subprocess, up to timeout_seconds): its own job, never the tick's."""
        assert self.dcmi is not None
        self.dcmi.poll()
        reading = self.dcmi.fresh_reading()
        if reading is None and self.dcmi.consecutive_failures:
            self.sampler.errors["dcmi"] += 1
        self.sampler.wall_power = reading

    def persist(self) -> None:
        """Write the totals now. A failed write is logged and counted; the next one retries."""
        if self.store is None:
            return
        try:
            self.store.save(self.sampler.state())
            self.sampler.saved(time.time())
        except OSError as exc:
            self.sampler.errors["state_write"] += 1
            log.error("could not write state file %s: %s", self.store.path, exc)

    def _stop_schedule(self) -> None:
        try:
            self.scheduler.remove_job("sample")
        except Exception:
            pass

    def start(self) -> None:
        self.sampler.tick()  # first snapshot before the endpoint opens
        self.persist()  # proves the state file can be written, and dates the first save
        self.server.start()
        sd_notify("READY=1")  # serving from here on; WATCHDOG=1 follows every tick
        self.scheduler.add_job(
            self._job,
            IntervalTrigger(seconds=self.interval),
            id="sample",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(self.interval)),
        )
        poll = self.sampler.samples_poll_seconds
        if poll is not None and self.replay is None:
            # GPUs without an energy counter: their power-sample buffer holds ~2.4 s, so with
            # ticks longer than 1 s it is also read every second between them (replays: _job).
            self.scheduler.add_job(
                self.sampler.poll_samples, IntervalTrigger(seconds=poll), id="samples", max_instances=1, coalesce=True
            )
        if self.store is not None:
            self.scheduler.add_job(
                self.persist,
                IntervalTrigger(seconds=self.settings.agent.persist_interval_seconds),
                id="persist",
                max_instances=1,
                coalesce=True,
            )
        if self.dcmi is not None:
            self.scheduler.add_job(
                self._poll_dcmi,
                IntervalTrigger(seconds=self.settings.host.ipmi.interval_seconds),
                id="dcmi",
                max_instances=1,
                coalesce=True,
                next_run_time=datetime.now(timezone.utc),
            )
        self.scheduler.start()
        log.info("serving on http://%s:%d/metrics", self.server.httpd.server_address[0], self.server.port)

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        try:
            self.scheduler.shutdown(wait=True)
        except Exception:
            pass
        if not self._finished and self.sampler.source is not None:
            # A last tick with a counter read, so nothing counted is held back.
            self.sampler.tick(final=True)
        self.persist()
        self.server.stop()

    def run_forever(self) -> int:
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stopped.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not self.stopped.wait(1.0):
            pass
        started = time.monotonic()
        self.stop()
        log.info("stopped in %.2f s", time.monotonic() - started)
        return 0
