"""Issue 15, item 6, as Prometheus sees it: counters never go backwards across crashes.

The real agent (``run`` on the fake NVML: two GPUs at a constant 300 W, so the truth is
300 J per second per GPU) is scraped every second by a real Prometheus while it is killed
with SIGKILL three times at random moments, stopped with SIGTERM while GPU 1 has hung for
35 s, and restarted once more, each new process on the same address. Over the whole run:

* ``resets()`` is 0 for every ``gpucost_*_total`` series Prometheus stored (GPU, host, node,
  cost, idle, emissions, workloads and the agent's own counters), and
* ``increase()`` of each GPU's energy equals 300 W x the run's length within one second's
  energy (300 J) per restart.

Before, a kill -9 could take the idle cost to 0 and the host energy, host cost and emissions
back to the last save, which Prometheus reads as a reset and counts the whole total again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from agentproc import ROOT, AgentProcess, free_port, value
from promserver import PrometheusServer

FAKE = ROOT / "tests" / "fakenvml"
WATTS = 300.0
CONFIG = """\
[agent]
tick_seconds = 0.5
[gpu]
energy_counter_interval_seconds = 1.0
[tariff]
currency = "EUR"
flat_price_per_kwh = 0.25
[pue]
value = 1.3
[carbon]
grams_per_kwh = 400
[hardware]
gpu_price = 30000
gpu_lifetime_years = 5
node_price = 20000
node_lifetime_years = 5
[[running_costs]]
name = "colocation"
amount = 900
period = "month"
scope = "node"
"""


def _scenario(path: Path, *, hang: bool) -> None:
    gpu1 = {"watts": WATTS, "hang": True} if hang else {"watts": WATTS}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": {"0": {"watts": WATTS}, "1": gpu1}}))
    os.replace(tmp, path)


def test_kill_9_sigterm_with_a_hung_gpu_and_restarts_leave_no_reset_and_the_true_energy(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    scenario = tmp_path / "scenario.json"
    _scenario(scenario, hang=False)
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE), str(ROOT)]),
        "FAKE_NVML_GPUS": "2",
        "FAKE_NVML_SCRIPT": str(scenario),
        "FAKE_NVML_STATS": str(tmp_path / "stats.json"),
        "STATE_DIRECTORY": str(state),
    }
    port = free_port()

    def start() -> AgentProcess:
        agent = AgentProcess("run", "--config", str(config), env=env, port=port)
        agent.wait_ready()
        return agent

    restarts = 0
    outputs: list[str] = []
    with PrometheusServer(f"127.0.0.1:{port}", scrape_interval="1s") as prom:
        agent = start()
        try:
            # Wait for Prometheus's first scrape: the run is measured from it.
            deadline = time.monotonic() + 20
            while prom.value('up{job="gpu-cost-agent"}') != 1:
                assert time.monotonic() < deadline, prom.log_tail()
                time.sleep(0.2)
            t_start = time.time()
            for _ in range(3):  # kill -9 at random moments
                time.sleep(rng.uniform(3.0, 8.0))
                assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
                outputs.append(agent.output)
                agent = start()
                restarts += 1
            time.sleep(rng.uniform(3.0, 6.0))
            _scenario(scenario, hang=True)  # GPU 1 hangs for 35 s, then SIGTERM while it hangs
            time.sleep(35.0)
            assert value(agent.metrics(), "gpucost_gpu_up", gpu="1") == 0
            assert agent.stop() == 0
            outputs.append(agent.output)
            _scenario(scenario, hang=False)
            agent = start()
            restarts += 1
            time.sleep(rng.uniform(3.0, 6.0))
            assert agent.stop() == 0  # a plain restart
            outputs.append(agent.output)
            agent = start()
            restarts += 1
            time.sleep(6.0)  # the counter catches up with the downtimes and Prometheus scrapes it
            t_end = time.time()
        finally:
            agent.stop()
            outputs.append(agent.output)
        time.sleep(1.0)

        window_ms = int((t_end - t_start) * 1000)
        window = window_ms / 1000.0
        rng_s = f"{window_ms}ms"
        names = [n for n in prom.api("label/__name__/values")
                 if n.startswith("gpucost_") and n.endswith("_total")]
        expected = {"gpucost_gpu_energy_joules_total", "gpucost_host_energy_joules_total",
                    "gpucost_energy_cost_total", "gpucost_gpu_idle_cost_total",
                    "gpucost_emissions_grams_total", "gpucost_hardware_cost_total",
                    "gpucost_running_cost_total", "gpucost_node_it_energy_joules_total",
                    "gpucost_node_facility_energy_joules_total", "gpucost_workload_cost_total",
                    "gpucost_workload_gpu_energy_joules_total", "gpucost_agent_ticks_total",
                    "gpucost_agent_gpu_energy_reads_total", "gpucost_agent_errors_total"}
        assert expected <= set(names), sorted(expected - set(names))
        reset_series = []
        for name in names:
            for r in prom.query(f"resets({name}[{rng_s}] @ {t_end:.3f})"):
                if float(r["value"][1]) != 0:
                    reset_series.append((name, r["metric"], r["value"][1]))
        assert reset_series == [], f"seed {seed}: series that went backwards: {reset_series}"

        for gpu in ("0", "1"):
            got = prom.value(f'sum(increase(gpucost_gpu_energy_joules_total{{gpu="{gpu}"}}[{rng_s}] @ {t_end:.3f}))')
            truth = WATTS * window
            print(f"\nGPU {gpu}: increase() {got:.1f} J, truth {truth:.1f} J over {window:.1f} s, "
                  f"{restarts} restarts, off by {got - truth:+.1f} J (seed {seed})")
            assert got == pytest.approx(truth, abs=WATTS * 1.0 * restarts), (gpu, got, truth, seed)
    assert not any("Traceback" in o for o in outputs), outputs
