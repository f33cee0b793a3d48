"""Whole-server ("wall") power from the BMC via ``ipmitool dcmi power reading``.

The BMC measures AC input at the power supplies, so its reading includes
everything: CPUs, DRAM, GPUs, fans, NICs, drives and PSU conversion losses.
Each call is a subprocess and a round trip to the BMC (tens of ms to seconds,
and BMCs have few session slots), so :class:`DcmiPoller` is meant to be run on
its own slow schedule (``interval_seconds``, default 10 s), never in the tick
thread; the tick thread only looks at :attr:`DcmiPoller.last_reading`.

Two output layouts exist and both are parsed::

    ipmitool <= 1.8.18                                   ipmitool 1.8.19+ / ports
    Instantaneous power reading:       298 Watts         Instantaneous power reading   : 214   Watts
    IPMI timestamp:      Thu Mar 14 09:11:06 2019        IPMI timestamp : 2024-05-05 13:06:44 UTC
    Sampling period:     00000001 Seconds.               Sampling period : 1000 Milliseconds

Some 1.8.19 builds print the timestamp without a newline, so "IPMI timestamp"
and "Sampling period" share a line; the parser does not rely on line breaks.

Units: power W, time s.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

DEFAULT_COMMAND = ("ipmitool", "dcmi", "power", "reading")


class IpmiConfig(BaseModel):
    """TOML table ``[host.ipmi]``."""

    model_config = ConfigDict(extra="forbid")

    #: Poll the BMC at all. Off by default: needs ipmitool, /dev/ipmi0 and root.
    enabled: bool = False
    #: argv of the command; its stdout must be ``ipmitool dcmi power reading`` output.
    command: list[str] = Field(default_factory=lambda: list(DEFAULT_COMMAND))
    #: Seconds between polls; the agent runs them on their own schedule, never in the tick.
    interval_seconds: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    #: Seconds before the command is killed.
    timeout_seconds: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    #: "components": cost from GPU + host components; "wall": cost from the BMC reading.
    cost_basis: Literal["components", "wall"] = "components"

    @field_validator("command")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or not v[0]:
            raise ValueError("command must name a program, e.g. [\"ipmitool\", \"dcmi\", \"power\", \"reading\"]")
        return v


def command_problem(cfg: IpmiConfig, path: str | None = None) -> str | None:
    """Why ``cfg.command`` cannot be run on this machine (its program is not on ``PATH``, does
    not exist or is not executable), or None. Asked before the first poll, so ``check-config``
    and the start say it at once instead of the poller counting ``dcmi`` errors."""
    program = cfg.command[0]
    if "/" in program:
        if not os.path.isfile(program):
            return f"{program} does not exist"
        if not os.access(program, os.X_OK):
            return f"{program} is not executable"
        return None
    if shutil.which(program, path=path) is None:
        return f"{program} is not found on PATH"
    return None


class DcmiError(Exception):
    """The BMC or the command did not give a usable power reading."""


@dataclass(frozen=True)
class DcmiReading:
    """One DCMI Get Power Reading answer. Power in W.

    ``min``/``max``/``average`` cover the BMC's own sampling period
    (``sampling_period_seconds``); they are ``None`` if the line is absent.
    """

    watts: float
    min: float | None
    max: float | None
    average: float | None
    state_active: bool
    timestamp_text: str | None
    sampling_period_seconds: float | None = None


_NUM = r"(\d+(?:\.\d+)?)"
_RE_INSTANT = re.compile(r"Instantaneous power reading\s*:\s*" + _NUM + r"\s*Watts", re.I)
_RE_MIN = re.compile(r"Minimum during sampling period\s*:\s*" + _NUM + r"\s*Watts", re.I)
_RE_MAX = re.compile(r"Maximum during sampling period\s*:\s*" + _NUM + r"\s*Watts", re.I)
_RE_AVG = re.compile(r"Average power reading over sample period\s*:\s*" + _NUM + r"\s*Watts", re.I)
_RE_TS = re.compile(r"IPMI timestamp\s*:\s*(.*?)\s*(?=Sampling period|$)", re.I | re.M)
_RE_PERIOD = re.compile(r"Sampling period\s*:\s*(\d+)\s*(milliseconds?|ms|seconds?|s)\b", re.I)
_RE_STATE = re.compile(r"Power reading state is\s*:?\s*([A-Za-z]+)", re.I)
_ERROR_HINTS = ("error", "could not open device", "unable to", "dcmi request failed", "invalid", "failed")


def _first_error_line(text: str) -> str | None:
    for line in text.splitlines():
        s = line.strip()
        if s and any(h in s.lower() for h in _ERROR_HINTS):
            return s
    return None


def _opt(rx: re.Pattern[str], text: str) -> float | None:
    m = rx.search(text)
    return float(m.group(1)) if m else None


def parse_dcmi_power_reading(text: str) -> DcmiReading:
    """Parse ``ipmitool dcmi power reading`` stdout. Raises :class:`DcmiError`.

    Errors: empty output, an error answer ("Error: ...", "Could not open
    device ...", "DCMI request failed ..."), no instantaneous reading (garbage),
    ``Power reading state is: deactivated`` (the BMC is not measuring, its
    numbers are stale or zero) and a reading of 0 W (no powered server draws 0 W;
    BMCs without a meter answer that).
    """
    if not text or not text.strip():
        raise DcmiError("empty output from the BMC")
    m = _RE_INSTANT.search(text)
    if m is None:
        err = _first_error_line(text)
        if err:
            raise DcmiError(f"BMC error: {err}")
        first = text.strip().splitlines()[0][:80]
        raise DcmiError(f"no 'Instantaneous power reading' in output (starts with {first!r})")
    watts = float(m.group(1))

    state_m = _RE_STATE.search(text)
    state = state_m.group(1).lower() if state_m else "activated"  # always printed by ipmitool
    active = state in ("activated", "active")
    if not active:
        raise DcmiError(f"power reading state is {state}: the BMC is not measuring power")
    if watts <= 0:
        raise DcmiError("BMC reports 0 W: no power meter behind DCMI on this server")

    ts_m = _RE_TS.search(text)
    ts = (ts_m.group(1).strip() or None) if ts_m else None
    period: float | None = None
    p = _RE_PERIOD.search(text)
    if p:
        period = float(p.group(1))
        if p.group(2).lower().startswith("m"):
            period /= 1000.0
    return DcmiReading(
        watts=watts,
        min=_opt(_RE_MIN, text),
        max=_opt(_RE_MAX, text),
        average=_opt(_RE_AVG, text),
        state_active=active,
        timestamp_text=ts,
        sampling_period_seconds=period,
    )


class RunResult(NamedTuple):
    """What a runner returns: like ``subprocess.CompletedProcess`` (text mode)."""

    returncode: int
    stdout: str
    stderr: str


#: ``runner(argv, timeout_seconds) -> RunResult``; may raise ``subprocess.TimeoutExpired``
#: or ``OSError`` (e.g. ``FileNotFoundError``), which the poller turns into errors.
Runner = Callable[[Sequence[str], float], RunResult]


def subprocess_runner(argv: Sequence[str], timeout: float) -> RunResult:
    """Run ``argv`` without a shell; the child is killed when ``timeout`` (s) passes."""
    cp = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )
    return RunResult(cp.returncode, cp.stdout or "", cp.stderr or "")


class DcmiPoller:
    """Runs the DCMI command and keeps the last good reading with its age.

    :meth:`poll` never raises: it returns the new reading or ``None``. Each
    distinct error is logged once (WARNING) until a good reading clears it, so a
    BMC that is down for a day logs one line, not 8 640.
    """

    def __init__(
        self,
        cfg: IpmiConfig,
        runner: Runner | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.cfg = cfg
        self._run = runner or subprocess_runner
        self._clock = clock
        self._log = logger or log
        self._last: tuple[DcmiReading, float] | None = None  # one attribute: atomic swap across threads
        self._logged_error: str | None = None
        #: The latest error message, ``None`` after a good reading.
        self.last_error: str | None = None
        self.polls = 0
        self.failures = 0
        self.consecutive_failures = 0

    def _command_text(self) -> str:
        return " ".join(self.cfg.command)

    def _fetch(self) -> DcmiReading:
        argv = list(self.cfg.command)
        try:
            res = self._run(argv, self.cfg.timeout_seconds)
        except subprocess.TimeoutExpired:
            raise DcmiError(f"`{self._command_text()}` timed out after {self.cfg.timeout_seconds:g} s") from None
        except FileNotFoundError:
            raise DcmiError(f"command not found: {argv[0]} (install ipmitool or set [host.ipmi] command)") from None
        except OSError as exc:
            raise DcmiError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        if res.returncode != 0:
            detail = _first_error_line(res.stderr) or _first_error_line(res.stdout)
            detail = detail or (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[0][:120]
            raise DcmiError(f"`{self._command_text()}` exited with status {res.returncode}: {detail}")
        return parse_dcmi_power_reading(res.stdout)

    def poll(self) -> DcmiReading | None:
        """Run the command once (blocking up to ``timeout_seconds``). Never raises."""
        self.polls += 1
        try:
            reading = self._fetch()
        except DcmiError as exc:
            msg = str(exc)
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = msg
            if msg != self._logged_error:
                self._log.warning("ipmi dcmi: %s", msg)
                self._logged_error = msg
            return None
        if self._logged_error is not None:
            self._log.info("ipmi dcmi: readings are back (%g W)", reading.watts)
        self._logged_error = None
        self.last_error = None
        self.consecutive_failures = 0
        self._last = (reading, self._clock())
        return reading

    @property
    def last_reading(self) -> DcmiReading | None:
        """The last good reading, however old (see :meth:`age_seconds`)."""
        last = self._last
        return last[0] if last else None

    @property
    def last_reading_t_mono(self) -> float | None:
        """``clock()`` when the last good reading arrived, s."""
        last = self._last
        return last[1] if last else None

    def age_seconds(self, now: float | None = None) -> float | None:
        """Seconds since the last good reading; ``None`` if there never was one."""
        last = self._last
        if last is None:
            return None
        return (self._clock() if now is None else now) - last[1]

    def fresh_reading(self, max_age_seconds: float | None = None, now: float | None = None) -> DcmiReading | None:
        """The last good reading if younger than ``max_age_seconds``.

        Default max age: 3 × ``interval_seconds`` (two missed polls tolerated).
        """
        limit = 3 * self.cfg.interval_seconds if max_age_seconds is None else max_age_seconds
        last = self._last
        if last is None:
            return None
        age = (self._clock() if now is None else now) - last[1]
        return last[0] if age <= limit else None
