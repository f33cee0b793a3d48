"""DCMI power reading: parser over recorded outputs (fixtures/ipmi/) and the poller."""

from __future__ import annotations

import logging
import subprocess

import pytest

from agent.sources.ipmi import (
    DcmiError,
    DcmiPoller,
    DcmiReading,
    IpmiConfig,
    RunResult,
    parse_dcmi_power_reading,
)


def text(ipmi_dir, name: str) -> str:
    return (ipmi_dir / name).read_text()


def test_dell_classic_layout(ipmi_dir):
    r = parse_dcmi_power_reading(text(ipmi_dir, "dell_reading.txt"))
    assert r == DcmiReading(
        watts=298.0,
        min=48.0,
        max=604.0,
        average=297.0,
        state_active=True,
        timestamp_text="Thu Mar 14 09:11:06 2024",
        sampling_period_seconds=1.0,
    )


def test_supermicro_timestamp_and_period_on_one_line(ipmi_dir):
    r = parse_dcmi_power_reading(text(ipmi_dir, "supermicro_reading.txt"))
    assert (r.watts, r.min, r.max, r.average) == (1012.0, 188.0, 2870.0, 964.0)
    assert r.timestamp_text == "05/14/24 11:42:17 UTC"
    assert r.sampling_period_seconds == 5.0
    assert r.state_active


def test_colon_aligned_layout_in_milliseconds(ipmi_dir):
    r = parse_dcmi_power_reading(text(ipmi_dir, "colon_aligned_reading.txt"))
    assert (r.watts, r.min, r.max, r.average) == (214.0, 2.0, 468.0, 184.0)
    assert r.timestamp_text == "2024-05-05 13:06:44 UTC"
    assert r.sampling_period_seconds == 1.0


@pytest.mark.parametrize(
    "name, message",
    [
        ("deactivated.txt", "power reading state is deactivated: the BMC is not measuring power"),
        ("error_session.txt", "BMC error: Error in open session response message : insufficient resources for session"),
        ("error_no_device.txt", "BMC error: Could not open device at /dev/ipmi0"),
        ("error_unsupported.txt", "BMC error: DCMI request failed because: Invalid command (c1)"),
    ],
)
def test_error_answers(ipmi_dir, name, message):
    with pytest.raises(DcmiError) as ei:
        parse_dcmi_power_reading(text(ipmi_dir, name))
    assert str(ei.value).startswith(message)


@pytest.mark.parametrize(
    "out, message",
    [
        ("", "empty output"),
        ("   \n\n", "empty output"),
        ("hello world\n", "no 'Instantaneous power reading' in output (starts with 'hello world')"),
        ("    Instantaneous power reading:    0 Watts\n    Power reading state is:   activated\n", "BMC reports 0 W"),
    ],
)
def test_garbage_and_zero(out, message):
    with pytest.raises(DcmiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_dcmi_power_reading(out)


def test_minimal_output_without_optional_lines():
    r = parse_dcmi_power_reading("Instantaneous power reading: 410 Watts\n")
    assert r == DcmiReading(410.0, None, None, None, True, None, None)


# -- poller ----------------------------------------------------------------------


class Script:
    """A fake runner: answers from a list, records argv and timeout."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv, timeout):
        self.calls.append((list(argv), timeout))
        a = self.answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return a


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ok(ipmi_dir, name="dell_reading.txt"):
    return RunResult(0, text(ipmi_dir, name), "")


def test_poll_success_and_age(ipmi_dir):
    run = Script(ok(ipmi_dir))
    clock = Clock(50.0)
    p = DcmiPoller(IpmiConfig(enabled=True, timeout_seconds=3), run, clock=clock)
    assert p.last_reading is None and p.age_seconds() is None and p.fresh_reading() is None
    r = p.poll()
    assert r is not None and r.watts == 298.0
    assert run.calls == [(["ipmitool", "dcmi", "power", "reading"], 3.0)]
    clock.t = 62.5
    assert p.age_seconds() == 12.5
    assert p.last_reading_t_mono == 50.0
    assert p.fresh_reading() is r  # 12.5 s <= 3 × 10 s
    assert p.fresh_reading(max_age_seconds=10) is None


def test_errors_logged_once_per_distinct_error_and_last_good_kept(ipmi_dir, caplog):
    session = RunResult(1, "", text(ipmi_dir, "error_session.txt"))
    nodev = RunResult(1, "", text(ipmi_dir, "error_no_device.txt"))
    run = Script(ok(ipmi_dir), session, session, session, nodev, nodev, ok(ipmi_dir, "supermicro_reading.txt"), session)
    clock = Clock(0.0)
    p = DcmiPoller(IpmiConfig(), run, clock=clock)
    with caplog.at_level(logging.INFO, logger="agent.sources.ipmi"):
        first = p.poll()
        for i in range(5):
            clock.t = 10.0 * (i + 1)
            assert p.poll() is None
            assert p.last_reading is first  # last good reading kept
        assert p.age_seconds() == 50.0
        assert p.consecutive_failures == 5 and p.failures == 5
        assert p.last_error == (
            "`ipmitool dcmi power reading` exited with status 1: "
            "Could not open device at /dev/ipmi0 or /dev/ipmi/0 or /dev/ipmidev/0: No such file or directory"
        )
        again = p.poll()
        assert again is not None and again.watts == 1012.0
        assert p.last_error is None and p.consecutive_failures == 0
        assert p.poll() is None  # the same error as before recovery is logged again
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert msgs == [
        (
            "WARNING",
            "ipmi dcmi: `ipmitool dcmi power reading` exited with status 1: "
            "Error in open session response message : insufficient resources for session",
        ),
        (
            "WARNING",
            "ipmi dcmi: `ipmitool dcmi power reading` exited with status 1: "
            "Could not open device at /dev/ipmi0 or /dev/ipmi/0 or /dev/ipmidev/0: No such file or directory",
        ),
        ("INFO", "ipmi dcmi: readings are back (1012 W)"),
        (
            "WARNING",
            "ipmi dcmi: `ipmitool dcmi power reading` exited with status 1: "
            "Error in open session response message : insufficient resources for session",
        ),
    ]
    assert p.polls == 8 and p.failures == 6


def test_deactivated_with_exit_zero(ipmi_dir):
    p = DcmiPoller(IpmiConfig(), Script(RunResult(0, text(ipmi_dir, "deactivated.txt"), "")))
    assert p.poll() is None
    assert p.last_error == "power reading state is deactivated: the BMC is not measuring power"


def test_unsupported_on_stdout_with_exit_one(ipmi_dir):
    p = DcmiPoller(IpmiConfig(), Script(RunResult(1, text(ipmi_dir, "error_unsupported.txt"), "")))
    assert p.poll() is None
    assert p.last_error.endswith("status 1: DCMI request failed because: Invalid command (c1)")


def test_timeout_missing_binary_and_os_error():
    cfg = IpmiConfig(command=["/usr/bin/ipmitool", "-I", "open", "dcmi", "power", "reading"], timeout_seconds=2)
    run = Script(
        subprocess.TimeoutExpired(cfg.command, 2),
        FileNotFoundError(2, "No such file or directory"),
        PermissionError(13, "Permission denied"),
        RunResult(1, "", ""),
    )
    p = DcmiPoller(cfg, run)
    assert p.poll() is None
    assert p.last_error == "`/usr/bin/ipmitool -I open dcmi power reading` timed out after 2 s"
    assert p.poll() is None
    assert p.last_error == "command not found: /usr/bin/ipmitool (install ipmitool or set [host.ipmi] command)"
    assert p.poll() is None
    assert p.last_error == "cannot run /usr/bin/ipmitool: Permission denied"
    assert p.poll() is None
    assert p.last_error.endswith("exited with status 1: no output")


def test_default_runner_really_runs_a_command(tmp_path):
    # The real subprocess path, with a stand-in for ipmitool.
    fake = tmp_path / "fake-ipmitool"
    fake.write_text("#!/bin/sh\nprintf '    Instantaneous power reading:   321 Watts\\n'\n")
    fake.chmod(0o755)
    p = DcmiPoller(IpmiConfig(command=[str(fake)]))
    r = p.poll()
    assert r is not None and r.watts == 321.0


def test_default_runner_timeout_kills(tmp_path):
    p = DcmiPoller(IpmiConfig(command=["sleep", "5"], timeout_seconds=0.2))
    assert p.poll() is None
    assert p.last_error == "`sleep 5` timed out after 0.2 s"
