"""Run Debian's VictoriaMetrics on loopback for a test, as deploy/victoriametrics/ sets it up.

Debian's ``victoria-metrics`` package (1.79) gives the three binaries: the single-node store
(``victoria-metrics``), ``vmagent`` (scrapes, remote-writes) and ``vmalert`` (rules). Each
starts with the flags of its ``deploy/victoriametrics/*.default`` file, where only the
addresses, paths and intervals a test must own are replaced (a flag the file does not set
cannot be replaced: the test fails), on free loopback ports, with its data in a temporary
directory. Processes are stopped with SIGTERM, killed if they do not stop, and asked by the
kernel to die with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import re
import shlex
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

import yaml
from agentproc import ROOT, free_port
from promserver import JOB, TARGET_LABELS, PromQLError, with_group_interval

DEPLOY = ROOT / "deploy" / "victoriametrics"
VICTORIA_METRICS = shutil.which("victoria-metrics")
VMAGENT = shutil.which("vmagent")
VMALERT = shutil.which("vmalert")
INSTALL = "apt install victoria-metrics"


def deploy_flags(name: str) -> list[tuple[str, str]]:
    """(flag, value) of ``ARGS="…"`` in ``deploy/victoriametrics/<name>.default``, in order."""
    text = (DEPLOY / f"{name}.default").read_text(encoding="utf-8")
    m = re.search(r'^ARGS="([^"]*)"\s*$', text, re.M)
    assert m, f"no ARGS=\"…\" line in deploy/victoriametrics/{name}.default"
    out = []
    for word in shlex.split(m.group(1)):
        flag, eq, value = word.lstrip("-").partition("=")
        assert word.startswith("-") and eq, f"{name}.default: {word!r} is not -flag=value"
        out.append((flag, value))
    return out


def with_flags(flags: list[tuple[str, str]], replace: dict[str, str], add: dict[str, str] | None = None) -> list[str]:
    """The command-line words of ``flags`` with the values of ``replace`` (each must be there)
    and the flags of ``add`` (each must not be there) appended."""
    names = {f for f, _ in flags}
    missing = set(replace) - names
    assert not missing, f"the deploy file sets no {sorted(missing)}"
    doubled = set(add or {}) & names
    assert not doubled, f"the deploy file already sets {sorted(doubled)}"
    words = [f"-{f}={replace.get(f, v)}" for f, v in flags]
    return words + [f"-{f}={v}" for f, v in (add or {}).items()]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class Process:
    """One VictoriaMetrics binary listening on ``127.0.0.1:port``, logging to ``log``."""

    def __init__(self, binary: str, args: list[str], port: int, log: Path) -> None:
        self.binary, self.args, self.port, self.log = binary, args, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{Path(self.binary).name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{Path(self.binary).name} not healthy after {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{Path(self.binary).name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get_json(self, path: str, **params: Any) -> Any:
        """GET ``path``; the JSON body (of an error answer too)."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            try:
                return json.load(e)
            except ValueError:
                raise PromQLError(f"HTTP {e.code} from {path}") from None


class VictoriaMetricsStack:
    """The store, a vmagent scraping ``target`` (``host:port``) as job ``gpu-cost-agent`` with
    the target labels of promserver.TARGET_LABELS and remote-writing to the store, and a
    vmalert evaluating ``rule_files`` (copied, every group's interval set to
    ``evaluation_interval``) against the store and writing the results back to it.

    The test's own changes to the deploy flags: loopback ports and temporary paths;
    ``-dedup.minScrapeInterval`` set to the scrape interval (the deploy file's rule: the store
    keeps one sample per scrape interval); ``-search.latencyOffset=0s`` and vmalert's
    ``-datasource.lookback=0s`` so a test of seconds sees its newest samples; vmalert's
    alerts go to ``alertmanager`` (``host:port``; default: a port on which nothing listens).
    """

    def __init__(self, target: str, *, rule_files: Iterable[Path] = (), scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", alertmanager: str | None = None) -> None:
        for binary in (VICTORIA_METRICS, VMAGENT, VMALERT):
            if binary is None:
                raise FileNotFoundError(f"victoria-metrics, vmagent or vmalert not found ({INSTALL})")
        self.dir = Path(tempfile.mkdtemp(prefix="gpucost-vm-"))
        store_port, agent_port, alert_port = free_port(), free_port(), free_port()
        store_url = f"http://127.0.0.1:{store_port}"
        self.store = Process(VICTORIA_METRICS, with_flags(deploy_flags("victoria-metrics"), {
            "storageDataPath": str(self.dir / "data"),
            "httpListenAddr": f"127.0.0.1:{store_port}",
            "dedup.minScrapeInterval": scrape_interval,
            "search.latencyOffset": "0s",
        }), store_port, self.dir / "victoria-metrics.log")

        scrape = yaml.safe_load((DEPLOY / "vmagent.yml").read_text(encoding="utf-8"))
        scrape["global"].update(scrape_interval=scrape_interval, scrape_timeout=scrape_interval)
        [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == JOB]
        job["static_configs"] = [{"targets": [target], "labels": dict(TARGET_LABELS)}]
        config = self.dir / "vmagent.yml"
        config.write_text(yaml.safe_dump(scrape, sort_keys=False))
        self.vmagent = Process(VMAGENT, with_flags(deploy_flags("vmagent"), {
            "promscrape.config": str(config),
            "remoteWrite.url": f"{store_url}/api/v1/write",
            "remoteWrite.tmpDataPath": str(self.dir / "vmagent"),
            "httpListenAddr": f"127.0.0.1:{agent_port}",
        }, add={"remoteWrite.flushInterval": "200ms"}), agent_port, self.dir / "vmagent.log")

        rules = self.dir / "rules"
        rules.mkdir()
        self.rule_origin: dict[str, str] = {}
        for i, path in enumerate(rule_files):
            copy = rules / f"{i:02d}-{Path(path).name}"
            copy.write_text(with_group_interval(Path(path).read_text(encoding="utf-8"), evaluation_interval))
            self.rule_origin[str(copy)] = str(path)
        self.vmalert = Process(VMALERT, with_flags(deploy_flags("vmalert"), {
            "rule": str(rules / "*.yml"),
            "datasource.url": store_url,
            "remoteWrite.url": store_url,
            "remoteRead.url": store_url,
            "notifier.url": f"http://{alertmanager or f'127.0.0.1:{free_port()}'}",
            "evaluationInterval": evaluation_interval,
            "datasource.lookback": "0s",
            "httpListenAddr": f"127.0.0.1:{alert_port}",
        }, add={"remoteWrite.flushInterval": "200ms"}), alert_port, self.dir / "vmalert.log")
        self.url = store_url

    def start(self) -> "VictoriaMetricsStack":
        try:
            for p in (self.store, self.vmagent, self.vmalert):
                p.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[int | None]:
        codes = [p.stop() for p in (self.vmalert, self.vmagent, self.store)]
        shutil.rmtree(self.dir, ignore_errors=True)
        return codes

    def __enter__(self) -> "VictoriaMetricsStack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {Path(p.binary).name}:\n{p.log_tail()}" for p in (self.store, self.vmagent, self.vmalert))

    # -- the store's Prometheus query API ------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        body = self.store.get_json(f"/api/v1/{path}", **params)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        data = self.api("query", query=expr, time=time)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, time: float | None = None) -> float | None:
        result = self.query(expr, time)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 20.0, interval: float = 0.25) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr} after {timeout:g} s\n{self.logs()}")
            for p in (self.store, self.vmagent, self.vmalert):
                p.alive()
            time.sleep(interval)

    def rules(self) -> list[dict]:
        """Every rule vmalert loaded (its group, health, last error), from vmalert's API."""
        body = self.vmalert.get_json("/api/v1/rules")
        out = []
        for group in body["data"]["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "group": group["name"], "file": self.rule_origin.get(group["file"], group["file"])})
        return out
