"""GPU calls on worker threads with a deadline, so a GPU that hangs stalls only itself.

An NVML call blocks in C and cannot be interrupted. The tick therefore hands
each GPU's calls to a worker thread and waits for them with a deadline: a GPU
whose call runs past it is left to its worker (which then belongs to that
call alone), marked as not answering, and gets no new call until the stuck
one returns. The other GPUs' calls go on on another worker. In the common
case one worker runs every GPU's calls of a tick in turn, so a tick costs
one thread hand-off, not one per GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

#: (True, value) or (False, the exception the call raised).
Outcome = tuple[bool, Any]
Job = tuple[int, Callable[[], Any]]

#: Idle workers kept for the next tick; more are ended when they come back.
_SPARE_WORKERS = 2


class _Worker:
    """One thread that runs jobs in order. Abandoned while stuck, it serves that call only."""

    def __init__(self, owner: GpuCalls, number: int) -> None:
        self.owner = owner
        self.cv = threading.Condition(threading.Lock())
        self.jobs: deque[Job] = deque()
        self.results: dict[int, Outcome] = {}
        #: The GPU whose call is running, and since when (monotonic s).
        self.current: int | None = None
        self.since = 0.0
        self.abandoned = False
        self.retired = False
        self.thread = threading.Thread(target=self._loop, name=f"gpu-calls-{number}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        cv = self.cv
        while True:
            with cv:
                while not self.jobs:
                    if self.retired:
                        return
                    cv.wait()
                index, fn = self.jobs.popleft()
                self.current, self.since = index, time.monotonic()
                results = self.results
            try:
                outcome: Outcome = (True, fn())
            except BaseException as exc:  # handed to the tick, which decides
                outcome = (False, exc)
            with cv:
                self.current = None
                late, self.abandoned = self.abandoned, False
                if not late:
                    results[index] = outcome
                    if not self.jobs:
                        cv.notify_all()
            if late:
                self.owner._came_back(self, index)


class GpuCalls:
    """Runs per-GPU jobs with at most one call in flight per GPU and a deadline for each."""

    def __init__(self, deadline: float) -> None:
        #: A call running longer than this marks its GPU as not answering. Units: s.
        self.deadline = deadline
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        #: GPU index -> (its worker, monotonic start of the call that has not returned).
        self._stuck: dict[int, tuple[_Worker, float]] = {}
        self._returned: list[tuple[int, float]] = []
        self._made = 0

    def stuck(self, index: int) -> bool:
        """Whether a call to GPU ``index`` ran past its deadline and has not returned yet."""
        return index in self._stuck

    def came_back(self) -> list[tuple[int, float]]:
        """GPUs whose stuck call returned since the last ask: (index, seconds it took)."""
        with self._lock:
            out, self._returned = self._returned, []
        return out

    def _worker(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self._made += 1
            number = self._made
        return _Worker(self, number)

    def _came_back(self, worker: _Worker, index: int) -> None:
        with self._lock:
            _, since = self._stuck.pop(index, (worker, time.monotonic()))
            self._returned.append((index, time.monotonic() - since))
            keep = len(self._idle) < _SPARE_WORKERS
            if keep:
                self._idle.append(worker)
        if not keep:
            with worker.cv:
                worker.retired = True
                worker.cv.notify_all()

    def run(self, jobs: Sequence[Job], budget: float) -> tuple[dict[int, Outcome], list[int], list[int]]:
        """Run ``jobs`` (GPU index, function) in order, skipping GPUs that are stuck.

        Returns the outcome of every job that finished, the GPUs whose call ran
        past the deadline now, and the GPUs not started because ``budget``
        seconds had passed (they are asked again next time). Takes at most
        about ``budget + deadline`` seconds.
        """
        results: dict[int, Outcome] = {}
        timed_out: list[int] = []
        todo: deque[Job] = deque(j for j in jobs if j[0] not in self._stuck)
        end = time.monotonic() + budget
        while todo and time.monotonic() < end:
            worker = self._worker()
            cv = worker.cv
            with cv:
                worker.results = results
                worker.jobs.extend(todo)
                todo.clear()
                cv.notify_all()
                while worker.jobs or worker.current is not None:
                    now = time.monotonic()
                    if now >= end and worker.jobs:
                        todo.extend(worker.jobs)  # out of time: left for the next tick
                        worker.jobs.clear()
                        continue
                    if worker.current is not None and now - worker.since >= self.deadline:
                        index = worker.current
                        worker.abandoned = True
                        todo.extend(worker.jobs)  # the rest go on on another worker
                        worker.jobs.clear()
                        timed_out.append(index)
                        with self._lock:
                            self._stuck[index] = (worker, worker.since)
                        break
                    wait = self.deadline if worker.current is None else worker.since + self.deadline - now
                    if worker.jobs:
                        wait = min(wait, end - now)
                    cv.wait(max(wait, 0.001))
                else:
                    with self._lock:
                        self._idle.append(worker)
        skipped = [index for index, _ in todo]
        return results, timed_out, skipped


class Pending:
    """``fn`` running on a daemon thread of its own; :meth:`wait` gives its outcome once it
    has returned. A call that hangs is left to hang: nothing else waits for it for long."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._box: list[Outcome] = []
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._box.append((True, fn()))
        except BaseException as exc:
            self._box.append((False, exc))
        self._done.set()

    def wait(self, timeout: float) -> Outcome | None:
        """The outcome, or None if the call has not returned within ``timeout`` s."""
        return self._box[0] if self._done.wait(timeout) else None
