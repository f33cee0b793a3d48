"""Issue 17: the bill of a month, from a real Prometheus holding a month of the agent's history.

tests/billhistory.py runs the agent's real sampler, ledger, attribution and exporter on two
fake nodes over October 2026 (Europe/Berlin, 745 h: DST ends on the 25th) — two teams, two
currencies, several users and Slurm jobs, a job across each end of the month, one shorter than
a scrape interval, an agent restart that loses its state — and writes what Prometheus would
have scraped as OpenMetrics; ``promtool tsdb create-blocks-from openmetrics`` backfills it
into a real Prometheus (Debian's). ``gpu-cost-agent report`` then bills the month, and every
figure is checked against the agent's own totals, the meter, and the formats' rules.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import billhistory as bh
from agentproc import ROOT
from tools import in_ci, need

from agent.report.bill import ALLOCATED, IDLE, UNALLOCATED, bill_of, fetch
from agent.report.formats import ALLOCATED_COLUMNS, FOCUS_COLUMNS
from agent.report.period import month
from agent.report.promapi import PrometheusAPI
from agent.report.records import from_records, read_records

KINDS = ("energy", "hardware", "running")
REL = 1e-3  # the 0.1 %


class Month:
    pass


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    need("promtool", "apt install prometheus")
    need("prometheus", "apt install prometheus")
    out = tmp_path_factory.mktemp("month")
    began = time.monotonic()
    ctx = Month()
    ctx.out = out
    ctx.agent = bh.build(out)
    ctx.built_s = time.monotonic() - began
    server = bh.backfilled_server(out / "history.om").start(timeout=60)
    try:
        ctx.url = server.url
        ctx.backfill = server.backfill_table
        t = time.monotonic()
        # the command a FinOps person runs
        ctx.cli = subprocess.run(
            [sys.executable, "-m", "agent", "report", "--prometheus", server.url, "--month", bh.MONTH,
             "--timezone", bh.TZ, "--by", "team", "--output-dir", str(out / "bills")],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        ctx.cli_s = time.monotonic() - t
        ctx.period = month(bh.MONTH, bh.TZ)
        ctx.fetched = fetch(PrometheusAPI(server.url), ctx.period, progress=None)
        ctx.last_values = _last_values(server, ctx.period)
        yield ctx
    finally:
        server.stop()
    print(f"\nhistory built in {ctx.built_s:.1f} s; report CLI {ctx.cli_s:.1f} s")


def _last_values(server, period) -> dict:
    """Each workload series' last sample in the history (the exported final value)."""
    out = {}
    for name in ("gpucost_workload_cost_total",):
        res = server.query(f"last_over_time({name}[40d])", time=bh.END + 1)
        for r in res:
            out[tuple(sorted(r["metric"].items()))] = float(r["value"][1])
    return out


def bills(m):
    return Path(m.out / "bills")


def rows_by(m, label):
    bill = bill_of(m.fetched, [label])
    return bill, {(s.currency, r.group[0]): r for s in bill.sections for r in s.rows if r.allocation == ALLOCATED}


def test_the_cli_writes_every_format_and_reconciles(m):
    assert m.cli.returncode == 0, m.cli.stderr[-3000:]
    for suffix in ("csv", "focus.csv", "json", "html"):
        assert (bills(m) / f"gpu-bill-{bh.MONTH}.{suffix}").stat().st_size > 500
    err = m.cli.stderr
    assert "DIFFERS" not in err, err
    assert "745 h" in err  # the DST month
    # progress on stderr while it queries
    assert re.search(r"workload counters: \d+ queries", err), err
    print("\n" + "\n".join(line for line in err.splitlines() if "reconciliation" in line or "rows, total" in line))


@pytest.mark.parametrize("label", ["team", "user", "slurm_job"])
def test_per_group_totals_equal_the_agents_own(m, label):
    bill, rows = rows_by(m, label)
    expected = bh.expected_by(m.agent, label)
    expected = {k: v for k, v in expected.items() if k[1]}  # "" (not a Slurm job): the unallocated row
    worst = 0.0
    assert set(expected) <= set(rows), set(expected) - set(rows)
    for key, e in expected.items():
        r = rows[key]
        for kind in KINDS:
            assert r.cost[kind] == pytest.approx(e.get(kind, 0.0), rel=REL, abs=1e-9), (key, kind)
            if e.get(kind):
                worst = max(worst, abs(r.cost[kind] / e[kind] - 1))
        assert r.gpu_hours == pytest.approx(e["seconds"] / 3600, rel=REL), key
        assert r.it_kwh == pytest.approx(e["joules"] / 3.6e6, rel=REL), key
    # no group the agent did not charge
    assert {k for k, r in rows.items() if r.total > 1e-9} <= set(expected) | {k for k in rows if not k[1]}
    print(f"\n--by {label}: {len(expected)} groups, worst relative difference to the agent's totals {worst:.2e}")


def test_groups_idle_and_unallocated_add_up_to_the_meter(m):
    bill = bill_of(m.fetched, ["user"])
    assert {s.currency for s in bill.sections} == {"EUR", "USD"}  # never added together
    for s in bill.sections:
        allocations = {r.allocation for r in s.rows}
        assert {ALLOCATED, IDLE} <= allocations
        for c in s.checks:
            if not c.info:
                assert c.relative is not None and abs(c.relative) < 1e-9, (s.currency, c.what, c.report, c.metered)
        # the meter is the agent's own node counters' growth over the month
        node = "node-a" if s.currency == "EUR" else "node-b"
        meter = m.agent[node]["meter"]
        for kind in KINDS:
            own = math.fsum(v for k, v in meter.items() if k.split("|")[1:] == [kind, s.currency])
            check = next(c for c in s.checks if c.what == f"{kind} cost")
            assert check.metered == pytest.approx(own, rel=1e-9), (kind, check.metered, own)
    # by user, Slurm-less workloads (none here) and idle capacity are apart; by slurm_job dan's
    # interactive session (a `user` workload) is unallocated
    _, byjob = rows_by(m, "slurm_job")
    bill = bill_of(m.fetched, ["slurm_job"])
    usd = next(s for s in bill.sections if s.currency == "USD")
    unalloc = [r for r in usd.rows if r.allocation == UNALLOCATED]
    assert len(unalloc) == 1 and unalloc[0].total > 0


def test_the_dst_month_has_745_hours_and_every_gpu_hour_is_there(m):
    p = m.period
    assert p.hours == 745 and len(p.days()) == 31
    bill = bill_of(m.fetched, ["node"])
    held = {r.group[0]: 0.0 for s in bill.sections for r in s.rows}
    for s in bill.sections:
        for r in s.rows:
            held[r.group[0]] += r.gpu_hours
    # node-b ran all month: 2 GPUs x 745 h, to the second; node-a lost the 30 s of its restart
    assert held["node-b:9842"] == pytest.approx(2 * 745, abs=1e-6)
    assert held["node-a:9842"] == pytest.approx(2 * 745 - 2 * 30 / 3600, abs=1e-6)
    daily = json.loads((bills(m) / f"gpu-bill-{bh.MONTH}.json").read_text())["sections"][0]["daily_cost"]
    assert len(daily) == 31 and "2026-10-25" in daily


def test_exactness_births_resets_short_and_crossing_jobs(m):
    _, rows = rows_by(m, "slurm_job")
    expected = bh.expected_by(m.agent, "slurm_job")
    # the 25 s job, shorter than the 120 s scrape interval: its whole (tiny) cost is there
    short = rows[("EUR", bh.SHORT_JOB)]
    assert short.gpu_hours == pytest.approx(expected[("EUR", bh.SHORT_JOB)]["seconds"] / 3600, rel=1e-9)
    assert 0 < short.gpu_hours < 120 / 3600
    # jobs across the month's ends: only their October part
    for job, cur in zip(bh.CROSSING_JOBS, ("EUR", "USD")):
        r, e = rows[(cur, job)], expected[(cur, job)]
        assert r.total == pytest.approx(sum(e[k] for k in KINDS), rel=1e-9)
        inside = 4.0 if job == bh.CROSSING_JOBS[0] else 2.0  # hours of the job inside October
        assert 0.5 < r.gpu_hours <= inside + 1e-9  # held by memory share where others share its GPU
    # the restart reset every series of node-a: counted, never negative, nothing lost (above)
    assert m.fetched.stats["resets"] > 0
    assert all(v >= 0 for s in m.fetched.cost for v in s.steps.values())


def test_csv_rows_sum_to_the_totals(m):
    text = (bills(m) / f"gpu-bill-{bh.MONTH}.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and {r["currency"] for r in rows} == {"EUR", "USD"}
    assert set(rows[0]) >= {"period", "period_start", "period_end", "timezone", "currency", "team", "allocation",
                            "gpu_hours", "busy_gpu_hours", "it_energy_kwh", "facility_energy_kwh", "energy_cost",
                            "hardware_cost", "running_cost", "total_cost", "emissions_kg"}
    assert {r["period"] for r in rows} == {bh.MONTH} and {r["timezone"] for r in rows} == {bh.TZ}
    data = json.loads((bills(m) / f"gpu-bill-{bh.MONTH}.json").read_text())
    for sec in data["sections"]:
        mine = [r for r in rows if r["currency"] == sec["currency"]]
        assert math.fsum(float(r["total_cost"]) for r in mine) == pytest.approx(sec["total"]["total_cost"], abs=1e-5)
        for r in mine:
            assert float(r["total_cost"]) == pytest.approx(
                sum(float(r[f"{k}_cost"]) for k in KINDS), abs=3e-6)


def test_json_has_the_reconciliation_and_the_period(m):
    data = json.loads((bills(m) / f"gpu-bill-{bh.MONTH}.json").read_text())
    assert data["period"]["hours"] == 745 and data["period"]["timezone"] == bh.TZ
    assert data["period"]["start"] == "2026-09-30T22:00:00Z" and data["period"]["end"] == "2026-10-31T23:00:00Z"
    for sec in data["sections"]:
        checks = {c["what"]: c for c in sec["reconciliation"]}
        assert abs(checks["total cost"]["relative"]) < 1e-9
        assert sec["cloud_prices"], "the nodes have cloud prices"
        assert sum(sum(d.values()) for d in sec["daily_cost"].values()) == pytest.approx(
            sec["total"]["total_cost"], rel=1e-9)


# -- FOCUS -------------------------------------------------------------------------------------

#: focus-validator 1.0.0's "1.0" rule set still names five columns by their FOCUS 0.5 names
#: (InvoiceIssuer, Provider, Publisher, ResourceID; and SkuPriceId's rule reads ChargeType):
#: those rules are overridden, and the 1.0 columns they stand for checked directly below.
VALIDATOR_OVERRIDES = ["InvoiceIssuer_Required", "Provider_Required", "Publisher_Required", "ResourceID_Required",
                       "SkuPriceId_Nullable"]


def _validator():
    try:
        import focus_validator
    except ImportError as exc:  # the [test] extra installs it where it installs: Python < 3.13
        if sys.version_info >= (3, 13):
            pytest.skip(f"focus-validator 1.0 does not install on Python {sys.version_info[0]}.{sys.version_info[1]}")
        if in_ci():
            pytest.fail(f"focus-validator not importable and CI is set: pip install -e '.[test]' ({exc})")
        pytest.skip(f"focus-validator not installed ({exc})")
    return Path(focus_validator.__file__).parent


def _validate(csv_path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    pkg = _validator()
    override = tmp_path / "override.yaml"
    override.write_text("overrides:\n" + "".join(f"  - {o}\n" for o in VALIDATOR_OVERRIDES))
    exe = Path(sys.executable).with_name("focus-validator")
    # cwd: the validator reads its currency list by a path relative to its package's parent
    return subprocess.run([str(exe), "--data-file", str(csv_path), "--validate-version", "1.0",
                           "--override-file", str(override)], cwd=pkg.parent, capture_output=True, text=True,
                          timeout=300)


def test_focus_passes_the_finops_validator(m, tmp_path):
    path = bills(m) / f"gpu-bill-{bh.MONTH}.focus.csv"
    proc = _validate(path, tmp_path)
    assert "Validation succeeded." in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    # and it does fail a wrong file (its exit status is 0 either way: the text says)
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace(",EUR,", ",EURO,"))
    proc = _validate(bad, tmp_path)
    assert "Validation failed!" in proc.stdout and "BillingCurrency_IsCurrencyCode" in proc.stdout


def test_focus_follows_the_spec_column_rules(m):
    path = bills(m) / f"gpu-bill-{bh.MONTH}.focus.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    cols = list(rows[0])
    assert cols[:len(FOCUS_COLUMNS)] == FOCUS_COLUMNS
    assert set(ALLOCATED_COLUMNS) <= set(cols)
    spec = set(FOCUS_COLUMNS) | set(ALLOCATED_COLUMNS)
    assert all(c in spec or c.startswith("x_") for c in cols)  # custom columns: x_ prefix
    iso = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
    origin: dict = {}
    for r in rows:
        for c in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ConsumedQuantity", "PricingQuantity"):
            float(r[c])  # decimal, not null
        assert r["BilledCost"] == r["EffectiveCost"] == r["ListCost"] == r["ContractedCost"]
        for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"):
            assert iso.match(r[c]), (c, r[c])
        assert r["BillingPeriodStart"] == "2026-09-30T22:00:00Z" and r["ChargePeriodEnd"] == "2026-10-31T23:00:00Z"
        assert r["BillingCurrency"] in ("EUR", "USD")
        assert r["ChargeCategory"] == "Usage" and r["ChargeClass"] == ""
        assert r["ChargeFrequency"] in ("One-Time", "Recurring", "Usage-Based")
        assert r["PricingCategory"] in ("Standard", "Dynamic", "Committed", "Other")
        assert r["ServiceCategory"] == "Compute"
        for c in ("BillingAccountId", "InvoiceIssuerName", "ProviderName", "PublisherName", "ResourceId",
                  "ServiceName", "SkuId", "AllocatedMethodId", "AllocatedResourceId"):
            assert r[c], c
        for c in ("Tags", "AllocatedTags", "AllocatedMethodDetails"):
            assert isinstance(json.loads(r[c]), dict), c
        assert all(k.startswith("x_") for k in json.loads(r["AllocatedTags"]) if k not in ("team",))
        for c in ("CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountStatus"):
            assert r[c] == ""  # null: no commitment discounts
        assert r["x_CostKind"] in KINDS and r["x_Allocation"] in (ALLOCATED, IDLE, UNALLOCATED)
        details = json.loads(r["AllocatedMethodDetails"])
        el = details["Elements"]
        assert el and {"AllocatedRatio", "UsageUnit", "UsageQuantity"} <= set(el[0])
        key = (r["ResourceId"], r["x_CostKind"], r["BillingCurrency"])
        o = origin.setdefault(key, [0.0, 0.0])
        o[0] += float(r["BilledCost"])
        o[1] += el[0]["AllocatedRatio"]
    # the allocated charges of each node and cost kind add up to its charge: ratios to 1, costs to the meter
    for (node, kind, cur), (cost, ratio) in origin.items():
        assert ratio == pytest.approx(1.0, abs=1e-9), (node, kind)
        own = math.fsum(v for k, v in m.agent[node.split(":")[0]]["meter"].items() if k.split("|")[1:] == [kind, cur])
        assert cost == pytest.approx(own, abs=len(rows) * 1e-6), (node, kind, cost, own)


# -- per-job records ---------------------------------------------------------------------------


def test_records_hold_the_workload_counters_final_values_exactly(m):
    records, stats = read_records(m.out / "records")
    assert stats["unreadable"] == 0 and stats["duplicates"] == 0 and records
    written = sum(r["records_written"] for r in m.agent.values())
    assert len(records) == written
    # every record's cost equals the last value Prometheus holds of that workload's series, to the bit
    index: dict = {}
    for k, v in m.last_values.items():
        d = dict(k)
        index.setdefault((d["instance"], d["uuid"], d["workload"], d["cost_kind"], d["currency"]), []).append(v)
    compared = 0
    for rec in records:
        if not (bh.MONTH_START < rec["last_seen"] < bh.MONTH_END - 600) or not rec["workload"].startswith("slurm:"):
            continue  # a Slurm job's series has one life; unallocated and dan's session have many
        for kind, per in rec["cost"].items():
            for cur, value in per.items():
                (last,) = index[(f"{rec['host']}:9842", rec["uuid"], rec["workload"], kind, cur)]
                assert last == value, (rec["workload"], kind)
                compared += 1
    assert compared > 100
    print(f"\n{len(records)} records in {stats['files']} files; {compared} final values compared, all equal")


def test_records_give_the_same_per_job_bill_as_prometheus(m):
    from_prom = {(s.currency, r.group[0]): r for s in bill_of(m.fetched, ["slurm_job"]).sections
                 for r in s.rows if r.allocation == ALLOCATED}
    rec_bill = from_records(m.out / "records", m.period, ["slurm_job"])
    from_rec = {(s.currency, r.group[0]): r for s in rec_bill.sections for r in s.rows if r.allocation == ALLOCATED}
    # jobs that began and ended inside the month, and not across node-a's restart (which lost the
    # state, and with it the job's totals before it)
    restart = bh.NODES["node-a"]["restart"]
    inside = set()
    for job in bh.jobs_for("node-a") + bh.jobs_for("node-b"):
        if job.key.startswith("slurm:") and bh.MONTH_START < job.start and job.end < bh.MONTH_END - 600 \
                and not (job.start <= restart <= job.end):
            inside.add(job.labels["slurm_job"])
    both = [k for k in from_prom if k[1] in inside]
    assert len(both) > 200
    for k in both:
        a, b = from_prom[k], from_rec[k]
        for kind in KINDS:
            assert b.cost[kind] == pytest.approx(a.cost[kind], rel=1e-9, abs=1e-12), (k, kind)
        assert b.gpu_hours == pytest.approx(a.gpu_hours, rel=1e-9)
        assert b.it_kwh == pytest.approx(a.it_kwh, rel=1e-9)
    # a job across the month's start: records bill it whole in the month it ended
    crossing = from_rec[("EUR", bh.CROSSING_JOBS[0])]
    assert crossing.total > from_prom[("EUR", bh.CROSSING_JOBS[0])].total
    print(f"\nrecords vs Prometheus: {len(both)} jobs, per kind equal to 1e-9")


def test_report_records_cli(m, tmp_path):
    out = tmp_path / "rec.csv"
    proc = subprocess.run([sys.executable, "-m", "agent", "report", "--records", str(m.out / "records"), "--month",
                           bh.MONTH, "--timezone", bh.TZ, "--by", "user", "--csv", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert {r["user"] for r in rows} >= {"ann", "ben", "cat", "dan", "eve"}
    assert "records:" in proc.stderr


# -- the page ----------------------------------------------------------------------------------


def test_html_is_self_contained(m):
    html = (bills(m) / f"gpu-bill-{bh.MONTH}.html").read_text()
    for ref in ("<script", "<link", "<img", "<iframe", " src=", " href=", "url(", "@import"):
        assert ref not in html, ref  # nothing to load: it reads the same offline, from a mail attachment
    for chart in ("cost-by-group", "daily-cost", "idle-share", "cloud"):
        assert html.count(f'data-chart="{chart}"') == 2  # one per currency


#: Added to a copy of the page: after load, what each chart measures on screen, what was fetched,
#: and any error, written into the DOM for --dump-dom. The page itself has no script.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('svg.chart')].map(s => {
    const b = s.getBoundingClientRect();
    const marks = [...s.querySelectorAll('rect,circle')];
    return {chart: s.dataset.chart, width: b.width, height: b.height, marks: marks.length,
            painted: marks.filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length};
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({charts, errors: window.__errors,
    fetched: performance.getEntriesByType('resource').map(r => r.name)});
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    exe = need("chromium", "apt install chromium")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_page_renders_its_charts_in_a_real_browser(m, tmp_path):
    page = bills(m) / f"gpu-bill-{bh.MONTH}.html"
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert proc.returncode == 0 and found, proc.stderr[-3000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == [] and result["fetched"] == []  # nothing failed, nothing loaded from anywhere
    charts = result["charts"]
    assert sorted(c["chart"] for c in charts) == sorted(["cost-by-group", "daily-cost", "idle-share", "cloud"] * 2)
    for c in charts:
        assert c["width"] > 300 and c["height"] > 40 and c["painted"] > 0, c
    daily = [c for c in charts if c["chart"] == "daily-cost"]
    assert all(c["painted"] >= 31 for c in daily)  # a column (or more) for each of the month's 31 days
    # the page itself, as a person opens it: loads without a console error, and draws
    shot = tmp_path / "page.png"
    proc = chromium("--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line]
    assert console == []


def test_by_gpu_model_and_cluster(m):
    bill = bill_of(m.fetched, ["cluster", "gpu_model"])
    groups = {(s.currency, r.allocation, r.group) for s in bill.sections for r in s.rows}
    assert ("EUR", ALLOCATED, ("lab", "NVIDIA H100 80GB HBM3")) in groups
    assert ("USD", IDLE, ("lab", "NVIDIA H100 80GB HBM3")) in groups  # idle capacity keeps GPU-level labels
