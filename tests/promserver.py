"""Run a real Prometheus server on loopback for a test, and query it over its HTTP API.

Debian's ``prometheus`` package (2.42) gives the binary. The server scrapes one agent
target under ``job="gpu-cost-agent"`` with the fleet labels a scrape config attaches
(``cluster``, ``team``), evaluates the given rule files, keeps its TSDB in a temporary
directory and listens on a free loopback port. It is stopped with SIGTERM, killed if it
does not stop, and asked by the kernel to die with the test process (PR_SET_PDEATHSIG),
so no server outlives a test run.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from agentproc import free_port

PROMETHEUS = shutil.which("prometheus")
JOB = "gpu-cost-agent"
TARGET_LABELS = {"cluster": "test", "team": "ml"}


class PromQLError(AssertionError):
    """Prometheus answered a query with an error."""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the fixture's stop() still applies
        pass


def with_group_interval(text: str, interval: str) -> str:
    """A rule file with every group's ``interval:`` set to ``interval``.

    Only groups carry an ``interval`` key in a rule file (rules have ``for``), so a
    line rewrite is enough and needs no YAML library; groups without one use the
    server's ``evaluation_interval``, which the harness sets to the same value.
    """
    return re.sub(r"^(\s*(?:-\s+)?)interval:\s*\S+\s*$", rf"\g<1>interval: {interval}", text, flags=re.M)


class PrometheusServer:
    """A Prometheus scraping ``target`` (``host:port``) every ``scrape_interval``, sending its
    alerts to ``alertmanager`` (``host:port``) when given.

    ``rule_files`` are copied into the server's directory with their group interval
    set to ``evaluation_interval``, so rules written for a 1 m production cadence
    are evaluated every second in a test that lasts seconds.
    """

    def __init__(
        self,
        target: str,
        *,
        rule_files: Iterable[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        binary: str | None = None,
        alertmanager: str | None = None,
    ) -> None:
        self.binary = binary or PROMETHEUS
        if self.binary is None:
            raise FileNotFoundError("prometheus binary not found (apt install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="gpucost-prom-"))
        self.rule_origin: dict[str, str] = {}  # the copy Prometheus loads -> the project's file
        for i, path in enumerate(rule_files):
            copy = self.dir / f"{i:02d}-{Path(path).name}"
            copy.write_text(with_group_interval(Path(path).read_text(), evaluation_interval))
            self.rule_origin[str(copy)] = str(path)
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": list(self.rule_origin),
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [{"targets": [target], "labels": TARGET_LABELS}],
            }],
        }
        if alertmanager is not None:  # host:port of an Alertmanager to send the alerts to
            config["alerting"] = {"alertmanagers": [{"api_version": "v2", "static_configs": [{"targets": [alertmanager]}]}]}
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    # -- life cycle --------------------------------------------------------

    #: How long the TSDB keeps samples (a subclass serving backfilled history keeps more).
    retention = "1h"

    def start(self, timeout: float = 20.0) -> "PrometheusServer":
        args = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.retention.time={self.retention}",
            "--log.level=warn",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP API ----------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns ``data``, raises PromQLError on an error answer."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400 / 422 / 503 carry a JSON error
            try:
                body = json.load(e)
            except ValueError:
                raise PromQLError(f"HTTP {e.code} from /api/v1/{path}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        """Instant query: the ``result`` list (vector or matrix); a scalar becomes one sample."""
        data = self.api("query", query=expr, time=time)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str, time: float | None = None) -> float | None:
        """The single value of ``expr``; None when it has no data. Fails on more than one series."""
        result = self.query(expr, time)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 20.0, interval: float = 0.25) -> list[dict]:
        """Poll ``expr`` until it returns data; its result. Query errors fail at once."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr} after {timeout:g} s")
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(interval)

    def rules(self) -> list[dict]:
        """Every loaded rule (recording and alerting) with its group, health and last error."""
        out = []
        for group in self.api("rules")["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "group": group["name"], "file": self.rule_origin.get(group["file"], group["file"])})
        return out
