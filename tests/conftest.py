"""Shared test helpers: the H100 fixture and a driver that replays it through the real sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def h100_trace():
    from helpers import H100_TRACE

    from agent.trace import load

    return load(H100_TRACE)


@pytest.fixture(scope="session")
def h100_trace_c():
    from helpers import H100_TRACE_C

    from agent.trace import load

    return load(H100_TRACE_C)


# -- tools, CI and skips ------------------------------------------------------------------------
#
# Under CI (CI set, and not "0"/"false"/"no"), a test never skips for a missing tool: `need` fails it,
# and any skip not in ALLOWED_SKIPS fails the run (pytest_sessionfinish), after listing every skip.


from tools import in_ci  # noqa: E402 - tests/ is on sys.path from the top of this file


#: The only skips CI accepts: (test id prefix, words of the reason) → why it may skip on a CI machine.
ALLOWED_SKIPS = {
    ("tests/host/test_host_rapl.py::", "running as root"):
        "root reads a chmod 000 file anyway; the injected-error test covers the unreadable counter",
    ("tests/test_http_e2e.py::", "no IPv6 loopback"): "a CI machine without IPv6 cannot bind ::1",
    ("tests/test_config_process.py::", "recorded host's CPU count"):
        "the machine has the recorded host's CPU count: both defaults are the same, nothing to tell apart",
    ("tests/test_prometheus_e2e.py::", "month began during the run"): "a run across the tariff's midnight of a month",
    ("tests/test_http_starvation.py::", "file descriptors"): "the machine's hard limit on open files is too low",
    ("tests/test_e2e.py::", "real NVIDIA driver"): "a machine with a GPU serves the real GPU",
    ("tests/test_nvml.py::", "real NVIDIA driver"): "a machine with a GPU serves the real GPU",
    ("tests/test_report_month.py::", "does not install on Python"):
        "focus-validator 1.0 needs numpy < 2, which has no release for Python 3.13 and later",
}

_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):  # noqa: ANN001 - pytest's hook
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):  # noqa: ANN001 - pytest's hook
    if not _skipped:
        return
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    out = tr.write_line if tr is not None else print
    refused = []
    out(f"\nskipped: {len(_skipped)}")
    for nodeid, reason in _skipped:
        allowed = next((why for (prefix, words), why in ALLOWED_SKIPS.items()
                        if nodeid.startswith(prefix) and words in reason), None)
        out(f"  {nodeid}: {reason}" + (f" (allowed: {allowed})" if allowed else ""))
        if allowed is None:
            refused.append(nodeid)
    if refused and in_ci():
        out(f"CI: {len(refused)} test(s) skipped outside tests/conftest.py ALLOWED_SKIPS: the run fails")
        session.exitstatus = 1
