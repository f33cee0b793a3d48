"""What a newcomer ran into (issue 19), each through the real process: an IPMI source whose
command is missing, the host line of a replay, a closed pipe, a URL as listen address, a
misspelt key, holidays that run out, and "1 GPUs"."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

from agentproc import ROOT, AgentProcess, free_port

IPMI = '[host.ipmi]\nenabled = true\n'


def _agent(*args: str, env: dict[str, str] | None = None, stdout=subprocess.PIPE, timeout: float = 60) \
        -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


def test_check_config_and_run_say_when_the_ipmi_command_is_missing(tmp_path):
    """[host.ipmi] enabled without ipmitool: check-config warns at once (it used to say nothing,
    and run then counted a dcmi error every poll); run says it in its first lines."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(IPMI)
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _agent("check-config", str(cfg), env={"PATH": str(empty)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu-cost-agent: warning: [host.ipmi] is enabled, but ipmitool is not found on PATH: no wall power is "
        "read and every poll (each 10 s) counts a dcmi error; install ipmitool or set [host.ipmi] command"]
    assert "BMC wall power: `ipmitool dcmi power reading` every 10 s (timeout 5 s), cost basis components" \
        in proc.stdout
    agent = AgentProcess("run", "--config", str(cfg), env={"PATH": str(empty)})
    try:
        agent.wait_ready()
    finally:
        assert agent.stop() == 0, agent.output
    assert "WARNING agent: [host.ipmi] is enabled, but ipmitool is not found on PATH" in agent.output
    # A command that is there: no warning. One named by path that is not: named.
    fake = empty / "ipmitool"
    fake.write_text("#!/bin/sh\ncat " + str(ROOT / "fixtures" / "ipmi" / "dell_reading.txt") + "\n")
    fake.chmod(0o755)
    assert _agent("check-config", str(cfg), env={"PATH": str(empty)}).stderr == ""
    cfg.write_text(IPMI + 'command = ["/nonexistent/ipmitool", "dcmi", "power", "reading"]\n')
    assert "but /nonexistent/ipmitool does not exist" in _agent("check-config", str(cfg)).stderr
    # A replay never polls a BMC: nothing to say.
    assert _agent("check-config", "--demo", str(cfg)).stderr == ""


def test_a_replay_says_it_models_the_recorded_host_not_a_mode_nobody_set():
    """deploy/config.flat.toml sets no [host] mode: the demo used to log 'mode = "model" in
    [host]'. It models the recorded host, and says so; and one GPU is '1 GPU'."""
    agent = AgentProcess("demo", "--config", "deploy/config.flat.toml")
    try:
        agent.wait_ready()
    finally:
        assert agent.stop() == 0, agent.output
    assert "host power: model (replay: the trace's CPU and memory readings)" in agent.output
    assert 'mode = "model" in [host]' not in agent.output
    assert "(1 GPU, 74.9 s)" in agent.output and "GPUs" not in agent.output.split("replaying", 1)[1].split("\n")[0]


def test_check_config_into_a_closed_pipe_ends_quietly():
    """`check-config … | head -3` used to end in a BrokenPipeError traceback. The reader here
    is gone before the first line is written, so the pipe is broken for sure."""
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "check-config", "deploy/config.tou.toml"], cwd=ROOT,
                            stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    os.close(read)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err  # 128 + SIGPIPE, as `cat` would end
    assert err == ""
    # And as the shell does it: head reads three lines and leaves.
    shell = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{sys.executable} -m agent check-config deploy/config.tou.toml | head -3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shell.stdout.splitlines()[0] == "deploy/config.tou.toml: OK" and len(shell.stdout.splitlines()) == 3
    assert shell.stderr == "" and shell.returncode in (0, 141)


def test_a_url_as_listen_address_is_refused_with_the_address_to_give():
    port = free_port()
    line = (f"gpu-cost-agent: config error: agent.listen: expected HOST:PORT, not a URL: use '127.0.0.1:{port}' "
            f"(TLS is set by the web-config file), got 'http://127.0.0.1:{port}'")
    for args in (["demo", "--listen", f"http://127.0.0.1:{port}"],
                 ["check-config", "deploy/config.flat.toml", "--listen", f"http://127.0.0.1:{port}/metrics"]):
        proc = _agent(*args)
        assert proc.returncode == 2
        got = proc.stderr.strip().splitlines()
        assert got == [line.replace("/metrics", "") if "demo" in args else line.replace(
            f"'http://127.0.0.1:{port}'", f"'http://127.0.0.1:{port}/metrics'")], got
    proc = _agent("check-config", "deploy/config.flat.toml", "--listen", "https://[::1]:9842")
    assert "not a URL: use '[::1]:9842'" in proc.stderr


def test_a_misspelt_key_is_refused_with_the_nearest_setting(tmp_path):
    """Environment variables got a 'did you mean'; a misspelt TOML key now does too, by check-config
    and run alike, for a table, a key, and a key of an array of tables."""
    cases = {
        "[agent]\ntick_secnds = 2\n": "agent.tick_secnds: unknown setting; did you mean tick_seconds?",
        '[tarif]\ncurrency = "EUR"\n': "tarif: unknown setting; did you mean tariff?",
        '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.3\n[[running_costs]]\nnmae = "colo"\namount = 1\n':
            "running_costs[0].nmae: unknown setting; did you mean name?",
        "[agent]\nzzz = 1\n": "agent.zzz: unknown setting",
    }
    for i, (toml, expected) in enumerate(cases.items()):
        cfg = tmp_path / f"{i}.toml"
        cfg.write_text(toml)
        for command in (["check-config", str(cfg)],
                        ["run", "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}"]):
            proc = _agent(*command, env={"STATE_DIRECTORY": str(tmp_path)})
            assert proc.returncode == 2, (command, proc.stderr)
            line = proc.stderr.strip().splitlines()[-1]
            assert line.startswith(f"gpu-cost-agent: config error: {expected}"), (command, line)
            if expected.endswith("unknown setting"):
                assert "did you mean" not in line


def test_holidays_that_end_before_the_coming_year_are_warned_about(tmp_path):
    """The example's holiday list ended with 2026 and nothing said so when it ran out. Now it
    reaches further, and a list with no date of the coming year is warned about by check-config
    and at start."""
    year = datetime.now(ZoneInfo("Europe/Berlin")).year
    bands = ('[[tariff.bands]]\nname = "all"\nprice_per_kwh = 0.2\ndays = ["weekday", "weekend"]\n'
             'start = "00:00"\nend = "00:00"\n')
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[tariff]\ncurrency = "EUR"\ntimezone = "Europe/Berlin"\nholidays = [{year}-12-25]\n{bands}')
    warning = (f"tariff.holidays: the last listed holiday is {year}-12-25, none of {year + 1} is listed: "
               f"holidays after {year}-12-25 are priced as ordinary days; add the coming year's")
    proc = _agent("check-config", str(cfg))
    assert proc.returncode == 0 and proc.stderr.strip() == f"gpu-cost-agent: warning: {warning}"
    agent = AgentProcess("demo", "--config", str(cfg))
    try:
        agent.wait_ready()
    finally:
        assert agent.stop() == 0, agent.output
    assert f"WARNING agent: {warning}" in agent.output
    # The coming year listed, or no bands for holidays to change: nothing to say.
    cfg.write_text(f'[tariff]\ncurrency = "EUR"\ntimezone = "Europe/Berlin"\nholidays = [{year + 1}-01-01]\n{bands}')
    assert _agent("check-config", str(cfg)).stderr == ""
    cfg.write_text(f'[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.2\nholidays = [{year - 1}-12-25]\n')
    assert _agent("check-config", str(cfg)).stderr == ""
    # The example lists holidays beyond the coming year (extend it before this fails).
    proc = _agent("check-config", "deploy/config.tou.toml")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
