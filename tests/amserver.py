"""Run a real Alertmanager on loopback for a test, with a webhook receiver that records what it
is sent.

Debian's ``prometheus-alertmanager`` package (0.25) gives the binary (``prometheus-alertmanager``;
upstream builds call it ``alertmanager``) and ``amtool``. The server loads the project's routing
(``deploy/alertmanager/alertmanager.yml``) with every webhook URL pointed at the test's receiver,
``http://127.0.0.1:<port>/<receiver name>``, so the path a notification arrives on says which
receiver the routing chose, and with the waits shortened (``group_wait`` and ``group_interval``
1 s). Clustering is off, the data directory temporary; the server is stopped with SIGTERM, killed
if it does not stop, and dies with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import yaml
from agentproc import ROOT, free_port
from promserver import _die_with_parent

ROUTING = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
TEMPLATES = ROOT / "deploy" / "alertmanager" / "templates"
INSTALL = "install Debian's prometheus-alertmanager package"


def alertmanager_binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class WebhookReceiver:
    """An HTTP server on loopback that keeps every JSON body POSTed to it, with its path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._cond:
                    receiver.received.append((self.path, json.loads(body)))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, match: Callable[[str, dict], bool], timeout: float, what: str = "a notification") -> tuple[str, dict]:
        """The first notification (path, body) for which ``match`` is true; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for path, body in self.received:
                    if match(path, body):
                        return path, body
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(p, [a["labels"].get("alertname") for a in b.get("alerts", [])]) for p, b in self.received]
                    raise AssertionError(f"no {what} after {timeout:g} s; received {got}")
                self._cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def routing_for_test(webhook_port: int, wait: str = "1s") -> dict:
    """The project's routing with every webhook sent to ``webhook_port`` and short waits."""
    config = yaml.safe_load(ROUTING.read_text())
    config["templates"] = [str(TEMPLATES / "*.tmpl")]
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"

    def shorten(route: dict) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route or route is config["route"]:
                route[key] = wait
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return config


class AlertmanagerServer:
    def __init__(self, binary: str, webhook_port: int) -> None:
        self.binary = binary
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.dir = Path(tempfile.mkdtemp(prefix="gpucost-am-"))
        self.config = self.dir / "alertmanager.yml"
        self.config.write_text(yaml.safe_dump(routing_for_test(webhook_port), sort_keys=False))
        self.log = self.dir / "alertmanager.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "AlertmanagerServer":
        args = [self.binary, f"--config.file={self.config}", f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address={self.address}", "--cluster.listen-address=", "--log.level=warn"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"alertmanager exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"alertmanager not ready after {timeout:g} s:\n{self.log_tail()}")

    def post_alerts(self, alerts: list[dict]) -> None:
        request = urllib.request.Request(f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as r:
            return json.load(r)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
