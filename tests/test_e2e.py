"""End to end: the real agent process, over real HTTP, on the recorded H100 trace."""

from __future__ import annotations

import time

import pytest
from agentproc import AgentProcess, past_first_loop, value
from helpers import counter_delta_joules, real_nvml_present

from agent.cli import demo_trace_path
from agent.trace import load as load_trace

UUID = "GPU-d9a96f9e-f458-7f0a-44e5-804222e7f75f"


def test_replay_over_http_matches_the_trace(h100_trace):
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--tick", "1")
    try:
        agent.wait_ready()
        early = agent.metrics()
        assert value(early, "gpucost_agent_info", source="replay") == 1
        agent.wait_finished()
        m = agent.metrics()
        last = h100_trace.rows[-1]["gpus"]["0"]
        labels = {"gpu": "0", "uuid": UUID}
        # Energy: the exported counter equals the trace's hardware-counter delta.
        energy = value(m, "gpucost_gpu_energy_joules_total", source="counter", **labels)
        truth = counter_delta_joules(h100_trace)
        assert abs(energy - truth) / truth < 0.001
        # Readings: the final state is the trace's last row.
        assert value(m, "gpucost_gpu_power_watts", **labels) == last["power_mw"] / 1000
        assert value(m, "gpucost_gpu_temperature_celsius", **labels) == last["temp_c"]
        assert value(m, "gpucost_gpu_utilization_ratio", **labels) == last["util_gpu_pct"] / 100
        assert value(m, "gpucost_gpu_memory_used_bytes", **labels) == last["mem_used_bytes"]
        assert value(m, "gpucost_gpu_memory_total_bytes", **labels) == 85520809984
        assert value(m, "gpucost_gpu_power_limit_watts", **labels) == 700.0
        assert value(m, "gpucost_gpu_up", **labels) == 1
        assert value(m, "gpucost_gpu_info", name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:00:06.0",
                     driver_version="580.159.04", energy_method="counter", **labels) == 1
        assert value(m, "gpucost_replay_progress_ratio") == 1.0
        assert value(m, "gpucost_replay_position_seconds") == pytest.approx(99.2, abs=0.01)
        assert value(m, "gpucost_agent_ticks_total") >= 100
        # Counter read every 15 s of trace time (the default), not every tick: the first read,
        # six on the cadence over 99 s, and the final one.
        assert 7 <= value(m, "gpucost_agent_gpu_energy_reads_total") <= 9
        assert value(m, "gpucost_agent_sample_duration_seconds") < 0.05
        assert value(m, "process_resident_memory_bytes") > 0
        # After the end the state is frozen: a later scrape shows the same energy.
        time.sleep(0.3)
        assert value(agent.metrics(), "gpucost_gpu_energy_joules_total", source="counter", **labels) == energy
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output
    assert "replay finished" in agent.output


def test_replay_with_counter_hidden_uses_the_sample_buffer(h100_trace):
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--hide", "energy_mj")
    try:
        agent.wait_ready()
        agent.wait_finished()
        m = agent.metrics()
        energy = value(m, "gpucost_gpu_energy_joules_total", source="samples", gpu="0")
        truth = counter_delta_joules(h100_trace)
        assert abs(energy - truth) / truth < 0.005
        assert value(m, "gpucost_gpu_energy_joules_total", source="counter", gpu="0") is None
    finally:
        assert agent.stop() == 0


@pytest.mark.skipif(real_nvml_present(), reason="a real NVIDIA driver is present: `run` serves the real GPU")
def test_run_without_nvml_serves_host_and_agent_metrics_and_says_so():
    agent = AgentProcess("run", "--tick", "0.2")
    try:
        agent.wait_ready()
        time.sleep(0.5)
        m = agent.metrics()
        assert value(m, "gpucost_gpu_source_up", source="nvml") == 0
        assert value(m, "gpucost_agent_info", source="nvml") == 1
        assert value(m, "gpucost_gpu_up") is None  # no GPU series at all, never a fake one
        assert value(m, "gpucost_agent_ticks_total") >= 2
        h = agent.health()
        assert h["status"] == "degraded" and "NVML" in h["error"]
    finally:
        assert agent.stop() == 0
    assert "no GPU can be read" in agent.output
    assert "replay" not in agent.output.lower()  # never falls back to replay silently


def test_demo_loops_the_bundled_trace():
    one_loop = counter_delta_joules(load_trace(demo_trace_path()))  # 30,268.9 J
    agent = AgentProcess("demo", "--speed", "200")
    try:
        agent.wait_ready()
        m = past_first_loop(agent)
        assert value(m, "gpucost_agent_info", source="replay") == 1
        assert value(m, "gpucost_gpu_energy_joules_total", source="counter", gpu="0") > one_loop
        assert value(m, "gpucost_agent_errors_total", kind="counter_reset") == 0
    finally:
        assert agent.stop() == 0


def test_unknown_path_is_404_and_index_links_metrics():
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "100")
    try:
        agent.wait_ready()
        assert agent.get("/nope")[0] == 404
        code, body = agent.get("/")
        assert code == 200 and 'href="/metrics"' in body
    finally:
        agent.stop()


def test_port_in_use_is_a_clear_error():
    first = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "100")
    try:
        first.wait_ready()
        second = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", port=first.port)
        rc = second.proc.wait(15)
        out = second.proc.stdout.read()
        # One line naming the address, and none of the log lines of a good start before it.
        assert rc == 1
        assert out.strip() == f"gpu-cost-agent: cannot listen on 127.0.0.1:{first.port}: address already in use"
    finally:
        first.stop()


def test_systemd_notify_ready_watchdog_stopping(tmp_path):
    """The agent speaks systemd's notify protocol (Type=notify, WatchdogSec=) on $NOTIFY_SOCKET."""
    import socket

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "20", env={"NOTIFY_SOCKET": path})
    try:
        messages = [sock.recv(256).decode() for _ in range(3)]
        assert messages[0] == "READY=1"  # sent once the endpoint serves
        assert agent.get("/healthz")[0] == 200
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]  # one per tick
    finally:
        assert agent.stop() == 0
        sock.settimeout(1)
        rest = []
        try:
            while True:
                rest.append(sock.recv(256).decode())
        except OSError:
            pass
        sock.close()
    assert rest[-1] == "STOPPING=1"
