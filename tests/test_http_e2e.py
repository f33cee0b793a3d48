"""The endpoint through the real agent process: IPv6, TLS with basic auth, a bad web config.

(A taken port: tests/test_e2e.py.)
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from agentproc import AgentProcess, free_port, value
from tlsutil import bcrypt_hash, client_context, make_cert


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_listens_on_ipv6_loopback():
    agent = AgentProcess("demo", "--speed", "10", host="::1")
    try:
        agent.wait_ready()
        assert value(agent.metrics(), "gpucost_agent_info", source="replay") == 1
        assert agent.health()["status"] == "ok"
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output
    assert f"serving on http://[::1]:{agent.port}/metrics" in agent.output


def test_tls_and_basic_auth_through_the_process(tmp_path):
    cert, key = make_cert(tmp_path, "server")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{bcrypt_hash('scrape-me')}'\n")
    ctx = client_context(cert)
    agent = AgentProcess("demo", "--speed", "10", "--web.config.file", str(web), context=ctx,
                         auth=("prometheus", "scrape-me"))
    try:
        agent.wait_ready()
        m = agent.metrics()  # HTTPS, right password
        assert value(m, "gpucost_agent_info", source="replay") == 1
        assert value(m, "gpucost_agent_ticks_total") >= 1
        assert agent.get("/healthz")[0] == 200
        assert agent.get("/metrics", auth=("prometheus", "wrong"))[0] == 401
        assert agent.get("/metrics", auth=("someone", "scrape-me"))[0] == 401
        agent.auth = None
        for path in ("/metrics", "/healthz"):
            status, body = agent.get(path)  # no credentials
            assert status == 401 and "gpucost" not in body
        # Plain HTTP on the same port gets nothing.
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/metrics", timeout=2)
        # An untrusting client refuses the self-signed certificate.
        agent.context = ssl.create_default_context()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            agent.get("/metrics")
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output
    assert f"serving on https://127.0.0.1:{agent.port}/metrics" in agent.output
    assert "basic auth for 1 user" in agent.output


def test_a_bad_web_config_stops_the_process_with_one_line(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: nowhere.pem\n  key_file: nowhere.key\n")
    agent = AgentProcess("demo", "--web.config.file", str(web), port=free_port())
    rc = agent.proc.wait(20)
    agent.stop()
    assert rc == 2
    assert agent.output.strip() == (f"gpu-cost-agent: config error: {web}: tls_server_config.cert_file: "
                                    f"cannot read {tmp_path}/nowhere.pem: no such file or directory")


def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_path):
    """Prometheus itself (Go's TLS, gzip, keep-alive, OpenMetrics) against the agent; the same
    web-config passes exporter-toolkit's own check (promtool check web-config)."""
    from tools import need

    prometheus = need("prometheus", "apt install prometheus")
    promtool = need("promtool", "apt install prometheus")
    cert, key = make_cert(tmp_path, "server")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS12\n"
                   f"basic_auth_users:\n  prometheus: '{bcrypt_hash('scrape-me')}'\n"
                   "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    check = subprocess.run([promtool, "check", "web-config", str(web)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    agent = AgentProcess("demo", "--speed", "10", "--web.config.file", str(web), context=client_context(cert),
                         auth=("prometheus", "scrape-me"))
    prom_port = free_port()
    target = f"['127.0.0.1:{agent.port}']"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\nscrape_configs:\n"
        f"- job_name: right\n  scheme: https\n  tls_config: {{ca_file: {cert}}}\n"
        f"  basic_auth: {{username: prometheus, password: scrape-me}}\n  static_configs: [{{targets: {target}}}]\n"
        f"- job_name: wrong\n  scheme: https\n  tls_config: {{ca_file: {cert}}}\n"
        f"  basic_auth: {{username: prometheus, password: guess}}\n  static_configs: [{{targets: {target}}}]\n"
    )
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> dict[str, float]:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=2) as r:
            result = json.load(r)["data"]["result"]
        return {s["metric"].get("job", ""): float(s["value"][1]) for s in result}

    try:
        agent.wait_ready()
        up: dict[str, float] = {}
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            try:
                up = query("up")
                if up.get("right") == 1 and "wrong" in up and query("gpucost_agent_ticks_total"):
                    break
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert up == {"right": 1.0, "wrong": 0.0}
        assert query("gpucost_agent_ticks_total")["right"] >= 1
    finally:
        prom.terminate()
        prom.wait(10)
        agent.stop()


def test_sighup_applies_a_changed_web_config_and_refuses_a_broken_one_naming_the_file(tmp_path):
    """SIGHUP reads the web-config file again, as the start does: new passwords and headers apply to
    the next request, TLS switched on applies to the next connection on the same port; a file that
    cannot be used is refused with one line naming it, and the running endpoint stays as it was."""
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{bcrypt_hash('old')}'\n")
    agent = AgentProcess("demo", "--speed", "10", "--web.config.file", str(web), auth=("prometheus", "old"))

    def status(auth: tuple[str, str] | None) -> int:
        try:
            return agent.get("/healthz", auth=auth)[0] if auth else agent.get("/healthz")[0]
        except (OSError, http.client.HTTPException):
            return -1

    def until(check, what: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        agent.stop()
        raise AssertionError(f"{what}; agent output:\n{agent.output[-3000:]}")

    try:
        agent.wait_ready()
        assert status(("prometheus", "old")) == 200
        web.write_text(f"basic_auth_users:\n  prometheus: '{bcrypt_hash('new')}'\n"
                       "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
        agent.proc.send_signal(signal.SIGHUP)
        until(lambda: status(("prometheus", "new")) == 200, "the new password was not accepted")
        assert status(("prometheus", "old")) == 401
        with urllib.request.urlopen(urllib.request.Request(
                agent.base + "/healthz", headers={"Authorization": "Basic " + base64.b64encode(b"prometheus:new")
                                                  .decode()}), timeout=2) as r:
            assert r.headers["X-Frame-Options"] == "deny"
        web.write_text("basic_auth_users: [\n")  # broken: the running endpoint must stay as it is
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert agent.proc.poll() is None
        assert status(("prometheus", "new")) == 200 and status(("prometheus", "old")) == 401
        cert, key = make_cert(tmp_path, "server")
        web.write_text(f"tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
                       f"basic_auth_users:\n  prometheus: '{bcrypt_hash('tls')}'\n")
        agent.proc.send_signal(signal.SIGHUP)
        agent.base = agent.base.replace("http://", "https://")
        agent.context = client_context(cert)
        until(lambda: status(("prometheus", "tls")) == 200, "TLS did not come on at the same port")
        assert status(("prometheus", "new")) == 401
        agent.auth = ("prometheus", "tls")
        assert value(agent.metrics(), "gpucost_agent_info", source="replay") == 1
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP gets nothing now
            urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/healthz", timeout=2)
    finally:
        rc = agent.stop()
    assert rc == 0, agent.output[-3000:]
    refused = [ln for ln in agent.output.splitlines() if "new configuration refused" in ln]
    assert len(refused) == 1 and f"config error: {web}: invalid YAML" in refused[0], refused
    assert "web config" in agent.output and "TLS TLS12-TLS13, basic auth for 1 user" in agent.output
