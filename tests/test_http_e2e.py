"""The endpoint through the real agent process: IPv6, TLS with basic auth, a bad web config.

(A taken port: tests/test_e2e.py.)
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
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
