"""``gpu-cost-agent report``: the bill of a period from Prometheus, or from per-job records.

    gpu-cost-agent report --prometheus http://prometheus:9090 --month last --by team \\
        --timezone Europe/Berlin --output-dir bills/

writes ``bills/gpu-bill-<period>.csv``, ``.focus.csv``, ``.json`` and ``.html``; progress,
the per-currency totals and the reconciliation to the meter go to stderr (docs/report.md).
Exit status: 0 written, 1 a query failed or the period has no data, 2 a bad argument.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

PROG = "gpu-cost-agent report"


def build_parser() -> argparse.ArgumentParser:
    from .series import NODES_PER_QUERY

    p = argparse.ArgumentParser(prog=PROG, description="Write the bill of a period: CSV, FOCUS, JSON, HTML.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", metavar="URL",
                     help="a Prometheus-compatible query API (Prometheus, Thanos, Mimir, VictoriaMetrics)")
    src.add_argument("--records", metavar="DIR", help="per-job records (JSON Lines) under DIR, searched recursively")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--month", metavar="YYYY-MM", help="a calendar month in --timezone, or 'last' / 'this'")
    when.add_argument("--from", dest="start", metavar="WHEN", help="start: YYYY-MM-DD (local midnight) or ISO 8601")
    p.add_argument("--to", dest="end", metavar="WHEN", help="end (not included), with --from")
    p.add_argument("--timezone", metavar="TZ", help="the tariff's time zone (IANA); default: the --config "
                   "file's [tariff] timezone, else UTC")
    p.add_argument("--config", metavar="FILE", help="the agent's config, for its [tariff] timezone")
    p.add_argument("--by", action="append", default=[], metavar="LABEL[,LABEL]",
                   help="group by workload or target labels (team, cluster, user, slurm_job, namespace, pod, ...), "
                        "node (the instance label) or gpu_model; repeatable; default: team if present, else node")
    p.add_argument("--selector", default="", metavar="MATCHERS",
                   help="label matchers added to every query, e.g. 'job=\"gpu-cost-agent\",cluster=\"c1\"'")
    out = p.add_argument_group("output (default: CSV on stdout)")
    out.add_argument("--csv", metavar="FILE", help="one row per group and currency ('-': stdout)")
    out.add_argument("--focus", metavar="FILE", help="FOCUS cost and usage rows (CSV)")
    out.add_argument("--json", metavar="FILE", help="everything, reconciliation and daily cost included")
    out.add_argument("--html", metavar="FILE", help="a self-contained page with charts (inline SVG)")
    out.add_argument("--output-dir", metavar="DIR", help="write all four as DIR/gpu-bill-<period>.*")
    out.add_argument("--billing-account", default="gpu-cost-agent", help="FOCUS BillingAccountId (default %(default)s)")
    out.add_argument("--top", type=int, default=12, help="groups shown by name in the charts (default %(default)s)")
    a = p.add_argument_group("Prometheus connection")
    a.add_argument("--basic-auth-user", metavar="USER")
    a.add_argument("--basic-auth-password-file", metavar="FILE")
    a.add_argument("--bearer-token-file", metavar="FILE")
    a.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="an extra HTTP header, e.g. 'X-Scope-OrgID: fleet' for Mimir; repeatable")
    a.add_argument("--ca-file", metavar="FILE")
    a.add_argument("--cert-file", metavar="FILE", help="client certificate (TLS client auth)")
    a.add_argument("--key-file", metavar="FILE")
    a.add_argument("--insecure-skip-verify", action="store_true")
    a.add_argument("--timeout", type=float, default=120.0, help="seconds per query (default %(default)s)")
    a.add_argument("--step", type=float, default=None, help="seconds per step (default 3600 where it divides the period)")
    a.add_argument("--nodes-per-query", type=int, default=NODES_PER_QUERY, metavar="N",
                   help="ask for the series of at most N nodes (instance) at a time and add the parts up: "
                        "the same bill, in store memory a fleet needs (default %(default)s; 0: all at once)")
    a.add_argument("--lookback", type=float, default=62.0,
                   help="days searched before the start for a series' value there (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(_usage(f"{what} {path}: {exc.strerror or exc}"))


def _usage(msg: str) -> int:
    _err(msg)
    return 2


def _timezone(args: argparse.Namespace) -> str:
    if args.timezone:
        return args.timezone
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(_usage(f"--config {args.config}: {exc}"))
        tz = (data.get("tariff") or {}).get("timezone")
        if isinstance(tz, str) and tz:
            return tz
    return "UTC"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .period import PeriodError, between, month

    tz = _timezone(args)
    try:
        if args.month:
            if args.end:
                return _usage("--to goes with --from, not --month")
            period = month(args.month, tz)
        else:
            if not args.end:
                return _usage("--from needs --to")
            period = between(args.start, args.end, tz)
    except PeriodError as exc:
        return _usage(str(exc))
    by = [b.strip() for part in args.by for b in part.split(",") if b.strip()]
    progress = None if args.quiet else _err
    from .bill import ReportError

    try:
        if args.prometheus:
            bill = _from_prometheus(args, period, by, progress)
        else:
            from .records import from_records

            bill = from_records(Path(args.records), period, by or ["host"], progress=progress)
    except ReportError as exc:
        _err(str(exc))
        return 1
    return _write(args, bill)


def _from_prometheus(args: argparse.Namespace, period: Any, by: list[str], progress: Any) -> Any:
    from .bill import ReportError, from_prometheus
    from .promapi import Auth, PrometheusAPI, QueryError

    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise SystemExit(_usage(f"--header: expected 'Name: value', got {h!r}"))
        headers[name.strip()] = value.strip()
    auth = Auth(
        basic_user=args.basic_auth_user,
        basic_password=_read(args.basic_auth_password_file, "--basic-auth-password-file")
        if args.basic_auth_password_file else None,
        bearer_token=_read(args.bearer_token_file, "--bearer-token-file") if args.bearer_token_file else None,
        headers=headers, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
        insecure_skip_verify=args.insecure_skip_verify)
    try:
        api = PrometheusAPI(args.prometheus, auth, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        raise SystemExit(_usage(f"TLS files: {exc}"))
    if not by:
        by = _default_by(api, period, args.selector)
    if progress:
        p = period
        progress(f"{p.label}: {p.local(p.start).isoformat()} to {p.local(p.end).isoformat()} ({p.timezone}, "
                 f"{p.hours:g} h), by {', '.join(by)}, from {args.prometheus}")
    try:
        return from_prometheus(api, period, by, matchers=args.selector, step=args.step,
                               lookback=args.lookback * 86400.0, progress=progress,
                               nodes_per_query=args.nodes_per_query)
    except QueryError as exc:
        raise ReportError(f"query failed, no bill written: {exc}") from None


def _default_by(api: Any, period: Any, matchers: str) -> list[str]:
    from .bill import ReportError
    from .promapi import QueryError
    from .series import selector

    try:
        _, result = api.instant(f"count by (team) (last_over_time({selector('gpucost_workload_gpu_seconds_total', matchers)}"
                                f"[{int(period.seconds)}s]))", period.end)
    except QueryError as exc:
        raise ReportError(f"query failed, no bill written: {exc}") from None
    return ["team"] if any(r["metric"].get("team") for r in result) else ["node"]


def _write(args: argparse.Namespace, bill: Any) -> int:
    from .formats import summary_lines, write_csv, write_focus, write_json

    targets: dict[str, str] = {}
    if args.output_dir:
        base = Path(args.output_dir) / f"gpu-bill-{_safe(bill.period.label)}"
        targets = {"csv": f"{base}.csv", "focus": f"{base}.focus.csv", "json": f"{base}.json", "html": f"{base}.html"}
    for kind in ("csv", "focus", "json", "html"):
        if getattr(args, kind):
            targets[kind] = getattr(args, kind)
    if not targets:
        targets = {"csv": "-"}

    def html(b: Any, out: Any) -> None:
        from .html import write_html

        write_html(b, out, top=args.top)

    writers = {"csv": write_csv, "json": write_json, "html": html,
               "focus": lambda b, out: write_focus(b, out, account=args.billing_account)}
    for kind, path in targets.items():
        if path == "-":
            writers[kind](bill, sys.stdout)
            sys.stdout.flush()
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writers[kind](bill, fh)
            os.replace(tmp, path)
        except OSError as exc:
            _err(f"cannot write {path}: {exc.strerror or exc}")
            return 1
        if not args.quiet:
            _err(f"wrote {path}")
    if not args.quiet:
        for line in summary_lines(bill):
            print(line, file=sys.stderr)
    return 0


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
