"""Issue 17: ``gpu-cost-agent report`` — periods in the tariff's time zone, the connection to the
query API (basic auth, bearer token, headers, TLS as Grafana's data source has them), and
failures that name the query instead of writing a short bill.

Against a stand-in query API on loopback (http.server) that records what it was asked and
answers as told; the real Prometheus path is tests/test_report_month.py.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import pytest

from agentproc import ROOT
from tlsutil import make_cert

from agent.report.period import PeriodError, between, month


@pytest.mark.parametrize("label,tz,hours", [
    ("2026-10", "Europe/Berlin", 745), ("2026-03", "Europe/Berlin", 743), ("2026-11", "America/New_York", 721),
    ("2026-11", "Europe/Berlin", 720), ("2026-02", "UTC", 672), ("2028-02", "Asia/Kolkata", 696),
])
def test_a_month_is_the_local_calendar_month(label, tz, hours):
    p = month(label, tz)
    assert p.hours == hours
    start = datetime.fromtimestamp(p.start, ZoneInfo(tz))
    assert (start.day, start.hour, start.minute) == (1, 0, 0)
    assert sum(b - a for _, a, b in p.days()) == p.seconds


def test_the_dst_days_have_23_and_25_hours():
    days = {d: (b - a) / 3600 for d, a, b in month("2026-10", "Europe/Berlin").days()}
    assert days["2026-10-25"] == 25 and days["2026-10-24"] == 24 and len(days) == 31
    days = {d: (b - a) / 3600 for d, a, b in month("2026-03", "Europe/Berlin").days()}
    assert days["2026-03-29"] == 23


def test_last_month_and_stretches():
    now = datetime(2027, 1, 5, 12, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert month("last", "Europe/Berlin", now=now).label == "2026-12"
    assert month("this", "Europe/Berlin", now=now).label == "2027-01"
    p = between("2026-10-24", "2026-10-26", "Europe/Berlin")
    assert p.hours == 49
    p = between("2026-10-01T06:00:00Z", "2026-10-01T07:30:00+00:00", "Europe/Berlin")
    assert p.hours == 1.5
    with pytest.raises(PeriodError, match="must be after"):
        between("2026-10-02", "2026-10-01", "UTC")
    with pytest.raises(PeriodError, match="YYYY-MM"):
        month("2026-13", "UTC")
    with pytest.raises(PeriodError, match="unknown time zone"):
        month("2026-10", "Europe/Berlim")


class FakeAPI:
    """A query API on loopback: answers every query with ``answer`` and records the requests."""

    def __init__(self, answer: dict | None = None, status: int = 200, tls: tuple[Path, Path] | None = None) -> None:
        self.answer = answer or {"status": "success", "data": {"resultType": "vector", "result": []}}
        self.status = status
        self.requests: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                self.answer(body)

            def do_GET(self):  # the label values endpoint: Prometheus answers it to GET only
                self.answer(self.path.partition("?")[2])

            def answer(self, form):
                headers = {k.lower(): v for k, v in self.headers.items()}  # names are case-insensitive
                api.requests.append({"path": self.path, "headers": headers, "form": parse_qs(form)})
                answer = api.answer
                if "/label/" in self.path and api.status == 200:
                    answer = {"status": "success", "data": []}
                data = json.dumps(answer).encode()
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_auth_and_headers_reach_the_api(tmp_path):
    api = FakeAPI()
    try:
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        proc = report("--prometheus", api.url, "--month", "2026-10", "--by", "team", "--basic-auth-user", "finops",
                      "--basic-auth-password-file", str(secret), "--header", "X-Scope-OrgID: fleet")
        token = tmp_path / "token"
        token.write_text("abc.def")
        report("--prometheus", api.url, "--month", "2026-10", "--by", "team", "--bearer-token-file", str(token))
    finally:
        api.close()
    assert proc.returncode == 1 and "no data for 2026-10" in proc.stderr  # the stand-in has nothing
    first = api.requests[0]
    assert first["headers"]["authorization"] == "Basic Zmlub3BzOnMzY3JldA=="  # finops:s3cret
    assert first["headers"]["x-scope-orgid"] == "fleet"
    assert first["form"]["partial_response"] == ["false"]  # Thanos: fail rather than answer in part
    assert api.requests[-1]["headers"]["authorization"] == "Bearer abc.def"


def test_a_partial_answer_is_an_error_naming_the_query():
    api = FakeAPI({"status": "success", "warnings": ["store gateway-3 did not answer"],
                   "data": {"resultType": "vector", "result": []}})
    try:
        proc = report("--prometheus", api.url, "--month", "2026-10", "--by", "team")
    finally:
        api.close()
    assert proc.returncode == 1
    assert "partial answer: store gateway-3 did not answer" in proc.stderr
    assert "gpucost_" in proc.stderr and "no bill written" in proc.stderr
    assert proc.stdout == ""


def test_a_failed_query_is_an_error_naming_it():
    api = FakeAPI({"status": "error", "errorType": "execution", "error": "query timed out"}, status=503)
    try:
        proc = report("--prometheus", api.url, "--month", "2026-10", "--by", "team")
    finally:
        api.close()
    assert proc.returncode == 1 and "HTTP 503: execution: query timed out" in proc.stderr
    assert "label values of 'instance' for gpucost_node_it_energy_joules_total" in proc.stderr  # the first question
    proc = report("--prometheus", "http://127.0.0.1:9", "--month", "2026-10", "--by", "team")
    assert proc.returncode == 1 and "cannot ask http://127.0.0.1:9" in proc.stderr


def test_tls_with_a_ca_file_or_without_verification(tmp_path):
    cert = make_cert(tmp_path, "server")
    api = FakeAPI(tls=cert)
    try:
        ok = report("--prometheus", api.url, "--month", "2026-10", "--by", "team", "--ca-file", str(cert[0]))
        refused = report("--prometheus", api.url, "--month", "2026-10", "--by", "team")
        skip = report("--prometheus", api.url, "--month", "2026-10", "--by", "team", "--insecure-skip-verify")
    finally:
        api.close()
    assert "no data for 2026-10" in ok.stderr  # connected, asked, got the stand-in's empty answer
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert "no data for 2026-10" in skip.stderr


@pytest.mark.parametrize("args,message", [
    (["--month", "2026-13"], "expected YYYY-MM"),
    (["--from", "2026-10-01"], "--from needs --to"),
    (["--month", "2026-10", "--to", "2026-11-01"], "--to goes with --from"),
    (["--month", "2026-10", "--timezone", "Mars/Olympus"], "unknown time zone"),
])
def test_bad_arguments_exit_2(args, message):
    proc = report("--prometheus", "http://127.0.0.1:9", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_the_timezone_comes_from_the_agents_config(tmp_path):
    from agent.report.cli import _timezone, build_parser

    args = build_parser().parse_args(["--prometheus", "x", "--month", "2026-10", "--config",
                                      str(ROOT / "deploy" / "config.tou.toml")])
    assert _timezone(args) == "Europe/Berlin"
    args = build_parser().parse_args(["--prometheus", "x", "--month", "2026-10"])
    assert _timezone(args) == "UTC"


def test_help_lists_report():
    proc = subprocess.run([sys.executable, "-m", "agent", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "report" in proc.stdout
