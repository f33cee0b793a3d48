"""What a running ``gpu-cost-agent run`` has imported: nothing that only another mode needs.

Each module a daemon holds costs resident memory for as long as it runs (docs/performance.md, "Where
the resident memory goes"), so code used only by a web-config file, the kubelet's pod-resources socket,
replays, recording or ``check-config`` is imported when that mode asks for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agentproc import ROOT, free_port

FAKE_NVML = ROOT / "tests" / "fakenvml"

#: Runs the real `run` command in this interpreter and, once /healthz answers (asked over a
#: raw socket, so the probe imports nothing the agent does not), prints sys.modules and stops it.
DRIVER = r"""
import json, os, signal, socket, sys, threading, time

port = int(sys.argv[1])

def probe():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.05)
    time.sleep(1.5)  # a few ticks, a persist-free steady state
    sys.stdout.write("MODULES " + json.dumps(sorted(sys.modules)) + "\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
from agent.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_running_daemon_imports_no_code_of_other_modes(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE_NVML), str(ROOT)]), "FAKE_NVML_GPUS": "2",
           "STATE_DIRECTORY": str(tmp_path / "state")}
    args = ["run", "--listen", f"127.0.0.1:{port}", "--config", str(ROOT / "deploy" / "config.tou.toml")]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(port), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    modules = set(json.loads(lines[0][len("MODULES "):]))
    # it did run the NVML path with host power and attribution, as deploy/config.tou.toml asks
    assert {"agent.sources.nvml", "agent.sources.host", "agent.attribution.split", "pynvml"} <= modules
    only_elsewhere = {
        "agent.webconfig", "yaml", "bcrypt",  # --web.config.file
        "grpc",  # [attribution] pod_resources = true
        "agent.trace", "agent.sources.replay", "agent.record",  # demo, replay, record
        "difflib",  # the hint for a GPUCOST_* variable that names no setting
        "agent.report", "agent.report.cli", "agent.report.bill",  # gpu-cost-agent report
    }
    assert modules & only_elsewhere == set()
