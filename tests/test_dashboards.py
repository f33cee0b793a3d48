"""The Grafana dashboards: committed JSON = generator output, and the conventions every panel keeps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from dashboards import DASHBOARD_DIR, ROOT, dashboard_queries, substitute, variable_queries

GENERATE = ROOT / "grafana" / "generate.py"
REQUIRED_VARIABLES = {
    "gpucost-node": ["datasource", "job", "instance", "gpu"],
    "gpucost-fleet": ["datasource", "job", "cluster", "instance", "gpu", "currency"],
    "gpucost-workloads": ["datasource", "job", "cluster", "instance", "gpu", "currency"],
}
DATASOURCE = "${datasource}"


def load_dashboards() -> dict[str, dict]:
    """The committed files, as Grafana reads them, by uid."""
    out = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dash = json.loads(path.read_text(encoding="utf-8"))
        assert dash["uid"] not in out, f"uid {dash['uid']} used twice"
        out[dash["uid"]] = dash
    return out


DASHBOARDS = load_dashboards()


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def all_targets():
    for uid, dash in DASHBOARDS.items():
        for p in panels(dash):
            for t in p["targets"]:
                yield uid, p, t


def run_generate(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=30)


# -- (a) the committed files are the generator's output ----------------------------


def test_committed_files_are_what_the_generator_writes():
    result = run_generate(str(GENERATE), "--check")
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_stale_file_and_generate_repairs_it(tmp_path):
    copy = tmp_path / "grafana"
    shutil.copytree(ROOT / "grafana", copy, ignore=shutil.ignore_patterns("__pycache__"))
    node = copy / "dashboards" / "gpu-cost-node.json"
    node.write_text(node.read_text(encoding="utf-8").replace('"GPU cost: node"', '"edited by hand"'), encoding="utf-8")

    stale = run_generate(str(copy / "generate.py"), "--check")
    assert stale.returncode == 1
    assert "grafana/dashboards/gpu-cost-node.json is not what grafana/generate.py writes" in stale.stderr

    assert run_generate(str(copy / "generate.py")).returncode == 0
    assert run_generate(str(copy / "generate.py"), "--check").returncode == 0
    assert node.read_text(encoding="utf-8") == (DASHBOARD_DIR / "gpu-cost-node.json").read_text(encoding="utf-8")


# -- (b) structure -------------------------------------------------------------------


def test_both_dashboards_exist_for_grafana_10():
    assert set(DASHBOARDS) == set(REQUIRED_VARIABLES)
    for dash in DASHBOARDS.values():
        assert dash["schemaVersion"] >= 39 and dash["id"] is None
        assert not dash.get("__inputs"), "a provisioned dashboard cannot resolve __inputs; use $datasource"


@pytest.mark.parametrize("uid", sorted(REQUIRED_VARIABLES))
def test_variables_are_present_and_chained(uid):
    variables = DASHBOARDS[uid]["templating"]["list"]
    names = [v["name"] for v in variables]
    assert names == REQUIRED_VARIABLES[uid]
    ds = variables[0]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for i, var in enumerate(variables[1:], start=1):
        assert var["type"] == "query" and var["datasource"]["uid"] == DATASOURCE
        query = var["query"]["query"]
        assert query == var["definition"] and query.startswith("label_values(")
        for parent in (n for n in names[1:i] if n in ("job", "cluster", "instance")):
            # each lists only the values under the node filters above it
            assert f"${parent}" in query, f"{uid}: ${var['name']} ignores ${parent}"
    gpu = variables[names.index("gpu")]
    assert gpu["multi"] and gpu["includeAll"] and gpu["allValue"] == ".*"


def test_every_panel_has_a_unit_the_datasource_variable_and_queries():
    for uid, dash in DASHBOARDS.items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), uid
        for p in panels(dash):
            where = f"{uid} / {p['title']}"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, where
            assert p["targets"], f"{where}: no query"
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), where
            for t in p["targets"]:
                assert t["expr"].strip(), where
                assert t["datasource"]["uid"] == DATASOURCE, where


def test_panels_fit_the_grid_without_overlapping():
    for uid, dash in DASHBOARDS.items():
        cells: dict[tuple[int, int], str] = {}
        for p in dash["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{uid} / {p['title']}"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{uid}: {p['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = p["title"]


# An aggregation at the top of a query whose `by` drops the gpu label: one series per node or fleet.
AGGREGATED = re.compile(r"^(topk\(\d+,\s*)?(sum|count|max|min|avg)\s*(by\s*\((?P<by>[^)]*)\))?\s*\(")


def per_gpu(expr: str) -> bool:
    if '"$gpu"' not in expr:
        return False
    m = AGGREGATED.match(expr)
    return not m or "gpu" in re.split(r"[\s,]+", m.group("by") or "")


def test_per_gpu_series_are_named_by_model_and_uuid():
    checked = 0
    for uid, p, t in all_targets():
        if per_gpu(t["expr"]):
            checked += 1
            for field in ("{{instance}}", "{{gpu}}", "{{name}}", "{{uuid}}"):
                assert field in t["legendFormat"], f"{uid} / {p['title']}: legend lacks {field}"
            assert "group_left (name)" in t["expr"] and "gpucost_gpu_info" in t["expr"], p["title"]
    assert checked >= 15


def test_the_per_gpu_rule_recognises_aggregations():
    assert per_gpu('(gpucost_gpu_power_watts{gpu=~"$gpu"}) * on (job) group_left (name) x')
    assert per_gpu('topk(10, instance_gpu_currency:gpucost_idle_cost_per_hour:rate5m{gpu=~"$gpu"})')
    assert not per_gpu('sum(1 - gpucost_gpu_up{gpu=~"$gpu"})')
    assert not per_gpu('count by (name) (gpucost_gpu_info{gpu=~"$gpu"})')
    assert not per_gpu('topk(10, sum by (cluster, instance) (increase(x{gpu=~"$gpu"}[$__range])))')
    assert not per_gpu('sum by (job) (gpucost_gpu_power_watts{job="$job"})')


def test_money_legends_name_their_currency():
    """The currency unit is picked from the legend, so every money series must name its currency."""
    money = 0
    for uid, p, t in all_targets():
        if p["fieldConfig"]["defaults"]["unit"].startswith("currency"):
            money += 1
            assert "{{currency}}" in t["legendFormat"], f"{uid} / {p['title']}"
            overrides = p["fieldConfig"]["overrides"]
            units = {prop["value"] for o in overrides for prop in o["properties"] if prop["id"] == "unit"}
            assert {"currencyEUR", "currencyUSD"} <= units, p["title"]
    assert money >= 20


def test_rates_use_grafana_intervals():
    """Rate windows adapt to the scrape interval ($__rate_interval) or the time range ($__range)."""
    for uid, p, t in all_targets():
        for window in re.findall(r"\[([^\]]+)\]", t["expr"]):
            assert window in ("$__rate_interval", "$__range"), f"{uid} / {p['title']}: [{window}]"


def test_optional_series_only_appear_beside_series_that_always_exist():
    """The BMC, demand and budget series may be absent: a query naming them must union them with `or`."""
    for uid, p, t in all_targets():
        for optional in ("gpucost_node_wall_power_watts", "gpucost_demand_", "gpucost:monthly_budget",
                         "gpucost_state_last_save_timestamp_seconds"):
            if optional in t["expr"]:
                assert " or " in t["expr"], f"{uid} / {p['title']} needs {optional}"


def test_recording_rules_used_are_recorded():
    rules_dir = ROOT / "deploy" / "prometheus" / "rules"
    if not rules_dir.is_dir():
        pytest.skip("deploy/prometheus/rules/ not present")
    recorded = set()
    for path in rules_dir.glob("*.yml"):
        recorded |= set(re.findall(r"^\s*-?\s*record:\s*['\"]?([\w:]+)", path.read_text(encoding="utf-8"), re.M))
    used = {name for _, _, t in all_targets() for name in re.findall(r"\b([a-z_]+:[\w:]+)\{", t["expr"])}
    assert used
    missing = used - recorded - {"gpucost:monthly_budget"}  # the budget is the user's own rule
    assert not missing, f"no recording rule for {sorted(missing)}"


# -- (c) the queries with the variables filled in ---------------------------------------


def test_dashboard_queries_fill_every_variable():
    queries = dashboard_queries({"instance": "node-7:9842", "gpu": ["0", "1"]})
    assert len(queries) == sum(len(p["targets"]) for d in DASHBOARDS.values() for p in panels(d))
    for q in queries:
        assert "$" not in q.expr, q
    node = [q for q in queries if q.dashboard == "gpucost-node"]
    power = next(q for q in node if q.panel == "GPU power vs. limit")
    assert 'gpucost_gpu_power_watts{job="gpu-cost-agent", instance="node-7:9842", gpu=~"(0|1)"}' in power.expr
    assert all("[1m]" in q.expr for q in queries if "rate(" in q.expr)


def test_substitute_formats_like_grafana():
    assert substitute('x{i=~"$i"}[$__rate_interval]', {"i": ["a.b:1", "c"], "__rate_interval": "2m"}) == \
        'x{i=~"(a\\\\.b:1|c)"}[2m]'
    assert substitute("${job} ${job:raw}", {"job": "j"}) == "j j"
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute("x{a=\"$nope\"}", {})


def test_variable_queries_are_series_selectors():
    vars_ = variable_queries({"instance": "n:1"})
    assert ("gpucost-node", "gpu", 'gpucost_gpu_info{job="gpu-cost-agent", instance="n:1"}', "gpu") in vars_
    assert {v[1] for v in vars_ if v[0] == "gpucost-fleet"} == {"job", "cluster", "instance", "gpu", "currency"}


def test_every_query_parses_as_promql(tmp_path):
    """Prometheus' own parser on every panel and variable query, variables filled in."""
    from tools import need

    promtool = need("promtool", "apt install prometheus")
    exprs = [q.expr for q in dashboard_queries()]
    exprs += [f"count by ({label}) ({selector})" for _, _, selector, label in variable_queries()]
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules), encoding="utf-8")  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# -- (d) fully loaded cost (issue 14) ---------------------------------------------------


def test_tables_merge_their_queries_into_named_columns():
    tables = [(uid, p) for uid, d in DASHBOARDS.items() for p in panels(d) if p["type"] == "table"]
    assert len(tables) >= 5
    for uid, p in tables:
        where = f"{uid} / {p['title']}"
        assert all(t["format"] == "table" and t["instant"] and not t["range"] for t in p["targets"]), where
        ids = [t["id"] for t in p["transformations"]]
        assert ids == ["merge", "organize"], where
        rename = p["transformations"][1]["options"]["renameByName"]
        assert rename == {f"Value #{t['refId']}": name for t, name in zip(p["targets"], rename.values())}, where
        assert list(rename.values()) == ["energy", "hardware", "running", "total"], where
        assert p["options"]["sortBy"] == [{"desc": True, "displayName": "total"}], where


def test_the_cost_kinds_and_the_cloud_are_shown():
    """The workload dashboard shows energy, hardware and running side by side, per workload and in
    totals; node and fleet show running costs, idle capacity, own cost per GPU-hour against the
    cloud price, break-even utilisation and savings month to date."""
    def exprs(uid: str) -> str:
        return "\n".join(t["expr"] for p in panels(DASHBOARDS[uid]) for t in p["targets"])

    needles = {
        "gpucost-node": ["instance_currency:gpucost_running_cost_per_hour:rate5m",
                         "instance_gpu_currency:gpucost_idle_capacity_cost_per_hour:rate5m",
                         "instance_gpu_currency:gpucost_gpu_hours:rate5m",
                         "instance_gpu_currency:gpucost_busy_gpu_hours:rate5m",
                         "instance_gpu_offering_currency:gpucost_cloud_price_per_gpu_hour:max",
                         "instance_offering_currency:gpucost_break_even_utilization:ratio",
                         "instance_offering_currency:gpucost_cloud_savings_month_to_date:sum"],
        "gpucost-fleet": ["cluster_currency:gpucost_running_cost_per_hour:sum",
                          "cluster_currency:gpucost_idle_capacity_cost_per_hour:sum",
                          "cluster_currency:gpucost_cost_per_gpu_hour:ratio",
                          "cluster_currency:gpucost_cost_per_busy_gpu_hour:ratio",
                          "cluster_model_currency:gpucost_cost_per_gpu_hour:ratio",
                          "cluster_model_offering_currency:gpucost_cloud_price_per_gpu_hour:avg",
                          "cluster_offering_currency:gpucost_break_even_utilization:ratio",
                          "cluster_model_offering_currency:gpucost_break_even_utilization:ratio",
                          "cluster_offering_currency:gpucost_cloud_savings_month_to_date:sum"],
        "gpucost-workloads": ["instance_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m",
                              "team_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m",
                              "namespace_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m",
                              "user_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m",
                              'cost_kind="energy"', 'cost_kind="hardware"', 'cost_kind="running"',
                              "gpucost_workload_gpu_seconds_total"],
    }
    for uid, wanted in needles.items():
        text = exprs(uid)
        missing = [n for n in wanted if n not in text]
        assert not missing, f"{uid} lacks {missing}"
    per_workload = [p for p in panels(DASHBOARDS["gpucost-workloads"])
                    if p["type"] == "table" and "workload" in p["targets"][0]["expr"]]
    assert per_workload, "no per-workload table of the cost kinds"
