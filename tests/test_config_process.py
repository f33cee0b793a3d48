"""check-config refuses exactly what run and demo refuse, with the same line; unknown GPUCOST_*
variables are warned about by name. All through the real process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from agentproc import ROOT, AgentProcess, free_port

TARIFF = '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n'

#: (name, TOML, environment, the line every command must end with)
CORPUS = [
    ("cpu idle alone", "[host]\ncpu_idle_watts = 5000\n", {},
     "config error: host.cpu_idle_watts: 5000 W is above cpu_max_watts, which is unset and defaults to "),
    ("cpu max alone", "[host]\ncpu_max_watts = 0.1\n", {},
     "config error: host.cpu_max_watts: 0.1 W is below cpu_idle_watts"),
    ("cpu max below idle", "[host]\ncpu_idle_watts = 50\ncpu_max_watts = 40\n", {},
     "config error: host: cpu_max_watts (40.0) must be >= cpu_idle_watts (50.0)"),
    ("platform 1e308", "[host]\nplatform_watts = 1e308\n", {},
     "config error: host.platform_watts: Input should be less than or equal to 100000"),
    ("dram typo", "[host]\nmemory_watts_per_gib = 375\n", {},
     "config error: host.memory_watts_per_gib: Input should be less than or equal to 10"),
    ("rapl without rapl", '[host]\nmode = "rapl"\npowercap_root = "/nonexistent/powercap"\n', {},
     '[host] mode = "rapl" but '),
    ("price inf", '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = inf\n', {},
     "config error: tariff.flat_price_per_kwh: Input should be a finite number"),
    ("price 1e308", '[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 1e308\n', {},
     "config error: tariff.flat_price_per_kwh: Input should be less than or equal to 100000"),
    ("pue 14", "[pue]\nvalue = 14\n", {}, "config error: pue.value: Input should be less than or equal to 5"),
    ("carbon nan", "[carbon]\ngrams_per_kwh = nan\n", {},
     "config error: carbon.grams_per_kwh: Input should be a finite number"),
    ("lifetime a second", '[hardware]\ncurrency = "EUR"\ngpu_price = 30000\ngpu_lifetime_years = 3e-8\n', {},
     "config error: hardware.gpu_lifetime_years: Input should be greater than or equal to 0.1"),
    ("tick 1e308", "[agent]\ntick_seconds = 1e308\n", {},
     "config error: agent.tick_seconds: Input should be less than or equal to 300"),
    ("ipmi interval", "[host.ipmi]\ninterval_seconds = 1e9\n", {},
     "config error: host.ipmi.interval_seconds: Input should be less than or equal to 3600"),
    ("counter faster than tick", "[agent]\ntick_seconds = 2\n[gpu]\nenergy_counter_interval_seconds = 1\n", {},
     "config error: gpu.energy_counter_interval_seconds must be at least agent.tick_seconds"),
    ("env price abc", TARIFF, {"GPUCOST_TARIFF__FLAT_PRICE_PER_KWH": "abc"},
     "config error: GPUCOST_TARIFF__FLAT_PRICE_PER_KWH=abc: tariff.flat_price_per_kwh: Input should be a valid number"),
    ("env cpu idle", "", {"GPUCOST_HOST__CPU_IDLE_WATTS": "5000"},
     "config error: GPUCOST_HOST__CPU_IDLE_WATTS=5000: host.cpu_idle_watts: 5000 W is above cpu_max_watts"),
    ("env pue", "", {"GPUCOST_PUE__VALUE": "1e308"},
     "config error: GPUCOST_PUE__VALUE=1e308: pue.value: Input should be less than or equal to 5"),
    ("web config missing", '[agent]\nweb_config_file = "/nonexistent/web.yml"\n', {},
     "config error: /nonexistent/web.yml: cannot read: No such file or directory"),
    ("web config invalid", '[agent]\nweb_config_file = "{tmp}/bad-web.yml"\n', {},
     "config error: {tmp}/bad-web.yml: basic_auth_users: prometheus: not a bcrypt hash"),
    ("web config flag missing", "", {}, "config error: /nonexistent/flag-web.yml: cannot read: No such file"),
    # The node default reads the counter every 15 s, the demo's recording every 5 s: both refuse 20 s ticks.
    ("tick flag above counter", "", {},
     "config error: gpu.energy_counter_interval_seconds must be at least agent.tick_seconds ("),
    ("env tick above counter", "", {"GPUCOST_AGENT__TICK_SECONDS": "20"},
     "config error: gpu.energy_counter_interval_seconds must be at least agent.tick_seconds ("),
    ("pod-resources socket empty", '[attribution]\npod_resources = true\npod_resources_socket = ""\n', {},
     "config error: attribution.pod_resources_socket: the kubelet's pod-resources socket needs a path"),
]

#: Flags given to every command of a case (check-config takes the same overriding flags as run).
FLAGS = {
    "web config flag missing": ["--web.config.file", "/nonexistent/flag-web.yml"],
    "tick flag above counter": ["--tick", "20"],
}


#: A replay models the recorded host and never reads RAPL: the demo has nothing to refuse here.
RUN_ONLY = {"rapl without rapl"}


def _start(command: list[str], config: str, env: dict[str, str], state_dir: str) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": state_dir, **env}
    return subprocess.Popen([sys.executable, "-m", "agent", *command], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_check_config_refuses_exactly_what_run_and_demo_refuse(tmp_path):
    """Every bad config: check-config, run and demo all exit 2, and all end with the same
    one line (check-config and a config error print nothing else). The commands run side by
    side: about 50 interpreter starts."""
    (tmp_path / "bad-web.yml").write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    procs = {}
    for i, (name, toml, env, _) in enumerate(CORPUS):
        cfg = tmp_path / f"{i}.toml"
        cfg.write_text(toml.replace("{tmp}", str(tmp_path)))
        state_dir = tempfile.mkdtemp(dir=tmp_path)
        listen = ["--listen", f"127.0.0.1:{free_port()}", *FLAGS.get(name, [])]
        flags = FLAGS.get(name, [])
        procs[name] = {
            "check-config": _start(["check-config", str(cfg), *flags], "", env, state_dir),
            "run": _start(["run", "--config", str(cfg), *listen], "", env, state_dir),
        }
        if name not in RUN_ONLY:
            procs[name]["check-config --demo"] = _start(["check-config", "--demo", str(cfg), *flags], "", env,
                                                         state_dir)
            procs[name]["demo"] = _start(["demo", "--config", str(cfg), *listen], "", env, state_dir)
    results = {}
    try:
        for name, by_command in procs.items():
            for command, proc in by_command.items():
                _, err = proc.communicate(timeout=60)
                results[(name, command)] = (proc.returncode, err.strip().splitlines())
    finally:
        for by_command in procs.values():
            for proc in by_command.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    # check-config checks what run uses; with --demo, what demo uses (its host model describes
    # the recorded host, so the CPU model's defaults there are the trace's, not this machine's).
    pairs = [("check-config", "run"), ("check-config --demo", "demo")]
    for name, _, _, expected in CORPUS:
        for checker, command in pairs[:1] if name in RUN_ONLY else pairs:
            rc, lines = results[(name, checker)]
            assert rc == 2 and len(lines) == 1, (name, checker, rc, lines)
            line = lines[0]
            assert line.startswith(f"gpu-cost-agent: {expected.replace('{tmp}', str(tmp_path))}"), (name, line)
            rc, lines = results[(name, command)]
            assert rc == 2 and lines and lines[-1] == line, (name, command, rc, lines)
            assert not any("Traceback" in x for x in lines), (name, command)
            if line.startswith("gpu-cost-agent: config error:"):
                assert len(lines) == 1, (name, command, lines)  # refused before anything starts


@pytest.mark.parametrize("speed", ["0", "-2", "nan", "inf", "fast"])
def test_a_replay_speed_that_cannot_be_played_is_refused_before_anything_starts(tmp_path, speed):
    port = free_port()
    proc = _start(["demo", "--speed", speed, "--listen", f"127.0.0.1:{port}"], "", {}, str(tmp_path))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("gpu-cost-agent demo: error: argument --speed: ")
    assert "serving" not in out + err and "replaying" not in out + err  # nothing started
    assert not (tmp_path / "state.json").exists()


def test_a_missing_pod_resources_socket_is_accepted_by_check_config_as_by_run(tmp_path):
    """run does not refuse a pod-resources socket that is not there (a DaemonSet's config on a node
    without the kubelet's socket): it goes without pod names and says so. check-config accepts it
    too, and says the same."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('[attribution]\npod_resources = true\npod_resources_socket = "/nonexistent/kubelet.sock"\n')
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "pod names from the kubelet on (/nonexistent/kubelet.sock, not there now: run goes without pod names" \
        in proc.stdout
    agent = AgentProcess("run", "--config", str(cfg))
    try:
        agent.wait_ready()
        assert agent.get("/metrics")[0] == 200
    finally:
        assert agent.stop() == 0, agent.output
    assert "pod names from the kubelet: off, no /nonexistent/kubelet.sock" in agent.output


def test_demo_checks_the_cpu_model_against_the_recorded_host_not_this_machine(tmp_path):
    """The demo's trace was recorded on a host with its own CPU count (16 for the bundled one):
    an unset cpu_max_watts defaults to 3.5 W x that many there, whatever this machine has. A
    cpu_idle_watts between this machine's default max and the recorded host's is valid for one
    and not the other: run and check-config judge it for this machine, demo and check-config
    --demo for the recorded host, each with the same line."""
    from agent.cli import demo_trace_path
    from agent.trace import load as load_trace

    header = load_trace(demo_trace_path()).header
    recorded, hostname = header["host"]["cpu_count"], header["hostname"]
    local = os.cpu_count() or 1
    if local == recorded:
        pytest.skip("this machine has the recorded host's CPU count: both defaults are the same")
    idle = (3.5 * local + 3.5 * recorded) / 2  # between the two defaults of cpu_max_watts
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[host]\ncpu_idle_watts = {idle}\n")
    local_ok = local > recorded  # this machine's default max is above the recorded host's
    state_dir = tempfile.mkdtemp(dir=tmp_path)
    checks = {cmd: _start(list(cmd), "", {}, state_dir) for cmd in (
        ("check-config", str(cfg)), ("check-config", "--demo", str(cfg)))}
    out = {cmd: (p.wait(30), p.communicate()) for cmd, p in checks.items()}
    rc_local, (_, err_local) = out[("check-config", str(cfg))]
    rc_demo, (stdout_demo, err_demo) = out[("check-config", "--demo", str(cfg))]
    assert (rc_local == 0, rc_demo == 0) == (local_ok, not local_ok), out
    refused_line = (err_demo if local_ok else err_local).strip()
    if local_ok:
        assert f"on the recorded host {hostname} (3.5 W x {recorded} logical CPUs)" in refused_line
    else:
        assert f"on this machine (3.5 W x {local} logical CPUs)" in refused_line
        assert f"over {recorded} CPUs" in stdout_demo  # the host model check-config --demo describes
    accepted, refused = (["run"], ["demo"]) if local_ok else (["demo"], ["run"])
    agent = AgentProcess(*accepted, "--config", str(cfg), env={"STATE_DIRECTORY": state_dir})
    try:
        agent.wait_ready()
        assert agent.get("/metrics")[0] == 200
    finally:
        assert agent.stop() == 0, agent.output
    proc = _start([*refused, "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}"], "", {}, state_dir)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.strip().splitlines() == [refused_line], err


@pytest.mark.parametrize("command", [["check-config", "deploy/config.flat.toml"], ["demo", "--speed", "20"]])
def test_unknown_environment_variables_are_named_once_each(command):
    env = {"GPUCOST_TARRIF__FLAT_PRICE_PER_KWH": "0.25", "GPUCOST_GPU__ENERGY_MTHOD": "polled",
           "GPUCOST_PUE__VALUE": "1.3"}
    if command[0] == "check-config":
        proc = subprocess.run([sys.executable, "-m", "agent", *command], cwd=ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "PUE: 1.3" in proc.stdout
        output = proc.stderr
    else:
        agent = AgentProcess(*command, env=env)
        try:
            agent.wait_ready()
            assert agent.get("/metrics")[0] == 200
        finally:
            assert agent.stop() == 0
        output = agent.output
    for var, setting, hint in [
        ("GPUCOST_TARRIF__FLAT_PRICE_PER_KWH", "tarrif.flat_price_per_kwh", "GPUCOST_TARIFF__FLAT_PRICE_PER_KWH"),
        ("GPUCOST_GPU__ENERGY_MTHOD", "gpu.energy_mthod", "GPUCOST_GPU__ENERGY_METHOD"),
    ]:
        lines = [line for line in output.splitlines() if var in line]
        assert len(lines) == 1, (var, output)
        assert lines[0].endswith(f"ignoring environment variable {var}: there is no setting {setting}; "
                                 f"did you mean {hint}?"), lines[0]
    assert "GPUCOST_PUE__VALUE" not in output  # a known one is not warned about
