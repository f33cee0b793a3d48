"""A client of the Prometheus HTTP query API (Prometheus, Thanos, Mimir, VictoriaMetrics).

Authentication and TLS as Grafana's Prometheus data source offers them: basic auth, a bearer
token, extra headers (``X-Scope-OrgID`` for Mimir), a CA file, a client certificate, and
skipping verification. The standard library's ``urllib`` does all of it; no HTTP library is
needed for a handful of GET requests.

A query that fails, times out, or comes back partial (a ``warnings`` list, which Thanos and
Mimir send when a store did not answer) raises :class:`QueryError` naming the query: a bill
is never built from a silent short answer. ``partial_response=false`` is sent too, which
Thanos honours by failing the query instead.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any


class QueryError(Exception):
    """A query failed or came back partial. ``str()`` names the query."""


@dataclass
class Auth:
    basic_user: str | None = None
    basic_password: str | None = None
    bearer_token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False


class PrometheusAPI:
    def __init__(self, url: str, auth: Auth | None = None, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.auth = auth or Auth()
        self.timeout = timeout
        self.queries = 0
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https:"):
            a = self.auth
            ctx = ssl.create_default_context(cafile=a.ca_file)
            if a.cert_file:
                ctx.load_cert_chain(a.cert_file, a.key_file)
            if a.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._context = ctx

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "gpu-cost-agent-report"}
        a = self.auth
        if a.basic_user is not None:
            token = base64.b64encode(f"{a.basic_user}:{a.basic_password or ''}".encode()).decode()
            h["Authorization"] = f"Basic {token}"
        elif a.bearer_token:
            h["Authorization"] = f"Bearer {a.bearer_token}"
        h.update(a.headers)
        return h

    def get(self, path: str, what: str, *, method: str = "POST", **params: Any) -> Any:
        """``/api/v1/<path>`` with ``params`` (POSTed as a form: long selectors fit; ``method="GET"``
        for the endpoints Prometheus answers only to GET); its ``data``."""
        params = {k: v for k, v in params.items() if v is not None}
        params.setdefault("partial_response", "false")
        form = urllib.parse.urlencode(params, doseq=True)
        if method == "GET":
            req = urllib.request.Request(f"{self.url}/api/v1/{path}?{form}", headers=self._headers())
        else:
            req = urllib.request.Request(f"{self.url}/api/v1/{path}", data=form.encode(), headers=self._headers(),
                                         method="POST")
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        self.queries += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._context) as r:
                answer = json.load(r, object_hook=_Shared().values)
        except urllib.error.HTTPError as e:
            try:
                answer = json.load(e)
            except ValueError:
                raise QueryError(f"{what}: HTTP {e.code} {e.reason} from {self.url}") from None
            raise QueryError(f"{what}: HTTP {e.code}: {answer.get('errorType')}: {answer.get('error')}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise QueryError(f"{what}: cannot ask {self.url}: {reason}") from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            err = answer.get("error") if isinstance(answer, dict) else answer
            raise QueryError(f"{what}: {err}")
        if answer.get("warnings"):
            raise QueryError(f"{what}: partial answer: {'; '.join(map(str, answer['warnings']))}")
        return answer.get("data")

    def instant(self, expr: str, t: float) -> tuple[str, list[dict]]:
        """An instant query at ``t``: (result type, result)."""
        data = self.get("query", f"query {expr!r} at {t:.0f}", query=expr, time=_ts(t))
        return data["resultType"], data["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        data = self.get("query_range", f"query_range {expr!r} {start:.0f}..{end:.0f} step {step:g}s",
                        query=expr, start=_ts(start), end=_ts(end), step=f"{step:g}")
        return data["result"]


    def label_values(self, label: str, matches: list[str], start: float, end: float) -> list[str]:
        """The values ``label`` takes on the series ``matches`` select with samples in [start, end]
        (the index only: no samples are read). A superset where the store keeps coarser time ranges."""
        data = self.get(f"label/{urllib.parse.quote(label, safe='')}/values",
                        f"label values of {label!r} for {', '.join(matches)}", method="GET",
                        **{"match[]": matches, "start": _ts(start), "end": _ts(end)})
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise QueryError(f"label values of {label!r}: expected a list of strings, got {str(data)[:80]}")
        return data


class _Shared:
    """One string object per distinct label value in an answer: a fleet's answer repeats
    ``job``, ``cluster``, ``team``, ``uuid``… in every series, and a parsed answer holds a new
    string for each (the parser shares keys, not values). About a third less memory."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def values(self, obj: dict[str, Any]) -> dict[str, Any]:
        seen = self.seen
        for k, v in obj.items():
            if type(v) is str:
                obj[k] = seen.setdefault(v, v)
        return obj


def _ts(t: float) -> str:
    return f"{t:.3f}"
