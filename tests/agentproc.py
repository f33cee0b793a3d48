"""Run the real agent as a subprocess on a free port and talk to it over HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """``host`` is what the agent listens on and the tests connect to (``::1`` for IPv6);
    ``context`` (an ``ssl.SSLContext``) scrapes over HTTPS, ``auth`` = (user, password)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None,
                 host: str = "127.0.0.1", context: ssl.SSLContext | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        bracketed = f"[{host}]" if ":" in host else host
        self.base = f"{'https' if context else 'http'}://{bracketed}:{self.port}"
        self.context = context
        self.auth = auth
        self.args = [sys.executable, "-m", "agent", *args, "--listen", f"{bracketed}:{self.port}"]
        # `run` persists to $STATE_DIRECTORY by default: never the test machine's /var/lib.
        self._tmp = tempfile.mkdtemp(prefix="gpucost-test-")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": self._tmp, **(env or {})}
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = ""

    def get(self, path: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path)
        user_password = auth or self.auth
        if user_password is not None:
            token = base64.b64encode(":".join(user_password).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                self.get("/healthz", timeout=0.5)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        raise AssertionError("agent did not start serving in time")

    def wait_finished(self, timeout: float = 40.0) -> None:
        """Wait until a single replay has reached the end of its trace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health().get("replay") == "finished":
                return
            time.sleep(0.1)
        raise AssertionError("replay did not finish")

    def health(self) -> dict:
        return json.loads(self.get("/healthz")[1])

    def metrics(self) -> dict[str, list]:
        """Scrape /metrics and parse it: {family name: [samples]}."""
        status, text = self.get("/metrics")
        assert status == 200
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.output = self.proc.stdout.read()
        return rc


def value(families: dict[str, list], metric: str, /, **labels: str) -> float | None:
    for family in families.values():
        for s in family:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def past_first_loop(agent: AgentProcess, timeout: float = 20.0) -> dict[str, list]:
    """Scrape a looping demo until it has finished a loop and read the energy counter after the
    seam (read every 5 s), so the whole first loop is counted; the last scrape's families."""
    deadline = time.monotonic() + timeout
    while True:
        m = agent.metrics()
        if (value(m, "gpucost_replay_loops_total") or 0) >= 1 and value(m, "gpucost_replay_position_seconds") > 6:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the demo did not finish a loop in {timeout:.0f} s")
        time.sleep(0.2)


def saved_state(state_dir) -> dict:
    """The state the next start loads: the unsynced ``state-recent.json`` (scrape-time saves)
    where there is one, else ``state.json``."""
    from pathlib import Path

    d = Path(state_dir)
    recent = d / "state-recent.json"
    return json.loads((recent if recent.exists() else d / "state.json").read_text())
