#!/usr/bin/env python3
"""The Grafana dashboards of gpu-cost-agent, as code.

    python grafana/generate.py           # write grafana/dashboards/*.json and the panel list in grafana/README.md
    python grafana/generate.py --check   # exit 1 if the committed files differ from what this script writes

One helper per panel kind, one place for units, legends and the GPU-name join, so
every panel follows the same conventions:

- money is shown with a Grafana currency unit picked by the ``currency`` label (every
  money legend carries ``{{currency}}``; see :func:`money_overrides`), never summed
  across currencies;
- per-GPU series name the GPU by node, index, model and UUID (the index repeats across
  nodes), joined from ``gpucost_gpu_info``;
- rates use ``$__rate_interval``; node and fleet cost use the recording rules of
  ``deploy/prometheus/rules/gpucost.rules.yml``, per-GPU detail the raw metrics;
- cost is fully loaded (energy + hardware + running), and where the kinds are shown apart
  they are energy, hardware and running, in that order (:data:`COST_KINDS`).

:func:`dashboard_queries` lists every panel query with the template variables filled
in, for tests that run them against a real Prometheus
(``from grafana.generate import dashboard_queries``). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = HERE / "dashboards"
README = HERE / "README.md"

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["gpu-cost-agent"]

# -- conventions ------------------------------------------------------------

GPU_LEGEND = "{{instance}} GPU {{gpu}} {{name}} {{uuid}}"

#: Currencies Grafana 10 has a unit for. A money series whose legend names one of
#: them gets that unit; any other currency shows the generic sign ¤ and its code
#: in the legend (Grafana cannot take a unit from a variable or a label).
CURRENCY_UNITS = {
    code: f"currency{code}"
    for code in ("USD", "EUR", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK", "ISK", "PLN", "CZK", "BRL", "UAH", "RUB")
}
MONEY = "currency:¤"
WATT = "watt"
KWH = "kwatth"  # the value is in kWh
GRAMS = "massg"
INTENSITY = "suffix: g CO2e/kWh"
RATIO = "percentunit"  # 0..1
SECONDS = "s"
HOURS = "h"
BYTES = "bytes"
COUNT = "short"
PLAIN = "none"  # dimensionless (PUE), states and labels

J_PER_KWH = "3.6e6"

#: The kinds of cost (the `cost_kind` label of gpucost_workload_cost_total, the `kind` of
#: gpucost_cost_to_date), in the order every panel shows them.
COST_KINDS = ("energy", "hardware", "running")

#: How the README names each unit.
UNIT_WORDS = {
    MONEY: "currency", WATT: "W", KWH: "kWh", GRAMS: "g CO2e", INTENSITY: "g CO2e/kWh", RATIO: "%",
    SECONDS: "s", HOURS: "h", BYTES: "bytes", COUNT: "count", PLAIN: "no unit",
}


def money_overrides() -> list[dict]:
    return [
        {"matcher": {"id": "byRegexp", "options": f"/\\b{code}\\b/"}, "properties": [{"id": "unit", "value": unit}]}
        for code, unit in CURRENCY_UNITS.items()
    ]


def with_gpu_name(expr: str, sel: str) -> str:
    """``expr`` (per GPU: job, instance, gpu, uuid) with the GPU model as label ``name``.

    ``max by`` keeps the right side one series per GPU even while an info series
    changes labels (a driver update), so the join never fails as many-to-many.
    """
    return f"({expr}) * on ({GPU_KEY}) group_left (name) max by ({GPU_KEY}, name) (gpucost_gpu_info{{{sel}}})"


#: The labels that identify a GPU, and a node in a fleet.
GPU_KEY = "job, instance, gpu, uuid"
NODE_KEY = "cluster, job, instance"


def in_range(by: str, series: str) -> str:
    """How much a counter grew over the dashboard's time range, summed ``by`` these labels."""
    return f"sum by ({by}) (increase({series}[$__range]))"


def tagged(expr: str, label: str, value: str) -> str:
    """``expr`` with ``label`` set to ``value``: lets one query union series that may be absent."""
    return f'label_replace({expr}, "{label}", "{value}", "", "")'


# -- targets and panels ------------------------------------------------------


def target(expr: str, legend: str = "") -> dict:
    """A range query (stat, bar and pie panels make theirs instant)."""
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "instant": False,
        "legendFormat": legend or "__auto",
        "range": True,
        "refId": "",  # set by Board.add
    }


def gpu_target(expr: str, sel: str, prefix: str = "", suffix: str = "") -> dict:
    """A per-GPU query, joined with the GPU model, with the shared GPU legend."""
    legend = " ".join(part for part in (prefix, GPU_LEGEND, suffix) if part)
    return target(with_gpu_name(expr, sel), legend)


def _panel(kind: str, title: str, description: str, unit: str, targets: Sequence[dict], **extra: Any) -> dict:
    overrides = list(extra.pop("overrides", []))
    if unit == MONEY:
        overrides = money_overrides() + overrides
    defaults: dict[str, Any] = {"unit": unit, **extra.pop("defaults", {})}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "targets": list(targets),
        **extra,
    }


def timeseries(title: str, description: str, unit: str, targets: Sequence[dict], *,
               stack: bool = False, steps: bool = False, overrides: Sequence[dict] = ()) -> dict:
    custom = {
        "drawStyle": "line",
        "fillOpacity": 30 if stack else 10,
        "lineInterpolation": "stepAfter" if steps else "linear",
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    return _panel(
        "timeseries", title, description, unit, targets,
        defaults={"color": {"mode": "palette-classic"}, "custom": custom},
        overrides=overrides,
        options={
            "legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom",
                       "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    )


def stat(title: str, description: str, unit: str, targets: Sequence[dict], *,
         text: str = "auto", mappings: Sequence[dict] = (), thresholds: Sequence[dict] | None = None) -> dict:
    for t in targets:
        t.update(instant=True, range=False)
    return _panel(
        "stat", title, description, unit, targets,
        defaults={
            "color": {"mode": "thresholds"},
            "mappings": list(mappings),
            "thresholds": {"mode": "absolute", "steps": list(thresholds or [{"color": "blue", "value": None}])},
        },
        options={
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": text,
        },
    )


def bars(title: str, description: str, unit: str, targets: Sequence[dict], *, links: Sequence[dict] = ()) -> dict:
    """Horizontal bar gauge of instant values: rankings and totals over the time range."""
    for t in targets:
        t.update(instant=True, range=False)
    return _panel(
        "bargauge", title, description, unit, targets,
        defaults={
            "color": {"mode": "continuous-BlPu"},
            "links": list(links),
            "min": 0,
            "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]},
        },
        options={
            "displayMode": "gradient",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
        },
    )


def pie(title: str, description: str, unit: str, targets: Sequence[dict]) -> dict:
    for t in targets:
        t.update(instant=True, range=False)
    return _panel(
        "piechart", title, description, unit, targets,
        defaults={"color": {"mode": "palette-classic"}},
        options={
            "legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                       "values": ["value", "percent"]},
            "pieType": "donut",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    )


def table(title: str, description: str, unit: str, targets: Sequence[dict], *, columns: Sequence[str],
          sort: str | None = None) -> dict:
    """A table of instant values, one row per label set: the value of each target is a column
    named by ``columns`` (in target order), the rows of all targets merged on their labels
    (so every target must be summed by the same labels)."""
    assert len(columns) == len(targets)
    for t in targets:
        t.update(instant=True, range=False, format="table")
    return _panel(
        "table", title, description, unit, targets,
        defaults={"custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}},
        options={
            "cellHeight": "sm",
            "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
            "showHeader": True,
            "sortBy": [{"desc": True, "displayName": sort or columns[-1]}],
        },
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True},
                "indexByName": {},
                # Grafana names the value of query A "Value #A" when a panel has several
                "renameByName": {f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(columns)},
            }},
        ],
    )


def cost_kind_table(title: str, description: str, series: Any, by: str, *, top: int = 0,
                    blank: tuple[str, str] | None = None) -> dict:
    """Money by ``by`` (which includes currency) with the cost kinds side by side: columns energy,
    hardware, running and total. ``series(matcher)`` is the money per series (a rule, or an
    increase), its selector narrowed by ``matcher`` (``, cost_kind="energy"``, or ""). A kind a
    row lacks shows 0 (`or` 0 x every series), so every column has data; ``top`` keeps the rows
    of the dearest totals; ``blank`` = (label, text) shows an empty label as text."""
    total = f"sum by ({by}) ({series('')})"
    kept = f"topk({top}, {total})" if top else total
    exprs = []
    for kind in COST_KINDS:
        only = series(f', cost_kind="{kind}"')
        e = f"sum by ({by}) ({only} or 0 * {series('')})"
        exprs.append(f"{e} and on ({by}) {kept}" if top else e)
    exprs.append(kept)
    if blank:
        exprs = [blank_as(e, *blank) for e in exprs]
    return table(title, description, MONEY, [target(e, "{{currency}}") for e in exprs],
                 columns=[*COST_KINDS, "total"], sort="total")


UP_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "DOWN", "color": "red", "index": 0},
    "1": {"text": "UP", "color": "green", "index": 1},
}}]
RED_FROM_1 = [{"color": "green", "value": None}, {"color": "red", "value": 1}]


def dashed(pattern: str, color: str | None = None) -> dict:
    """An override drawing the series whose legend matches ``pattern`` as a dashed line (limits, budgets)."""
    props: list[dict] = [
        {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
        {"id": "custom.fillOpacity", "value": 0},
    ]
    if color:
        props.append({"id": "color", "value": {"fixedColor": color, "mode": "fixed"}})
    return {"matcher": {"id": "byRegexp", "options": pattern}, "properties": props}


class Board:
    """Lays panels out left to right in Grafana's 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = self.line_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "type": "row", "title": title, "collapsed": False, "panels": [],
            "id": len(self.panels) + 1, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
        })
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        for i, t in enumerate(panel["targets"]):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(panel)
        self.x += w
        self.line_h = max(self.line_h, h)

    def _newline(self) -> None:
        self.y += self.line_h
        self.x = self.line_h = 0


# -- template variables -------------------------------------------------------


def datasource_variable() -> dict:
    return {
        "type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
    }


def query_variable(name: str, label: str, query: str, *, multi: bool = False, numeric: bool = False,
                   all_value: str | None = ".*") -> dict:
    """A ``label_values`` variable. ``multi`` ones offer All: ``.*`` matches every value and a
    missing label; ``all_value=None`` makes All the listed values only (Grafana's default)."""
    var = {
        "type": "query", "name": name, "label": label, "datasource": DS,
        # The object form is what Grafana 10's Prometheus variable editor saves and reads.
        "definition": query, "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {}, "hide": 0, "options": [], "refresh": 2, "regex": "",
        "includeAll": multi, "multi": multi, "sort": 3 if numeric else 1,
    }
    if multi:
        if all_value is not None:
            var["allValue"] = all_value
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


def dashboard(uid: str, title: str, description: str, variables: list[dict], board: Board) -> dict:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{
            "asDropdown": False, "icon": "external link", "includeVars": True, "keepTime": True,
            "tags": TAGS, "targetBlank": False, "title": "gpu-cost-agent", "type": "dashboards",
        }],
        "panels": board.panels,
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": TAGS,
        "templating": {"list": variables},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# -- the node dashboard ---------------------------------------------------------

NODE = 'job="$job", instance="$instance"'
NODE_GPUS = NODE + ', gpu=~"$gpu"'

#: Per-GPU records of the own-vs-cloud rules (deploy/prometheus/rules/gpucost.rules.yml).
GPU_COST = "instance_gpu_currency:gpucost_cost_per_hour:rate5m"
GPU_HOURS = "instance_gpu_currency:gpucost_gpu_hours:rate5m"
BUSY_HOURS = "instance_gpu_currency:gpucost_busy_gpu_hours:rate5m"
CLOUD_PRICE = "instance_gpu_offering_currency:gpucost_cloud_price_per_gpu_hour:max"
IDLE_CAPACITY = "instance_gpu_currency:gpucost_idle_capacity_cost_per_hour:rate5m"
SAVINGS_NOTE = ("Saved = what renting the GPU-hours workloads held at the cloud price would have cost − the own "
                "fully loaded cost (idle hours included); below 0, renting would have been cheaper.")


def node_dashboard() -> dict:
    n, g = NODE, NODE_GPUS
    b = Board()

    b.row("Cost")
    b.add(stat("Cost per hour", "Fully loaded: energy + hardware amortisation + running costs, 5-minute average "
               "(recording rule).", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_cost_per_hour:rate5m{{{n}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Today", "Cost since midnight in the tariff's time zone: energy + hardware + running.", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_cost_today:sum{{{n}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Month to date", "Cost since the 1st of the month in the tariff's time zone: energy + hardware + "
               "running.", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_cost_month_to_date:sum{{{n}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Month projected", "Month to date + the current cost per hour until the tariff's month ends.", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_cost_month_projected:sum{{{n}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Price in force", "Energy price per kWh of facility energy now, and its tariff band.", MONEY, [
        target(f"gpucost_energy_price_per_kwh{{{n}}}", "{{band}} {{currency}}/kWh"),
    ]), 4, 4)
    b.add(stat("Effective price, last hour", "Energy cost ÷ facility kWh over the last hour: what a kWh really cost, "
               "across bands.", MONEY, [
        target(f"instance_currency:gpucost_effective_price_per_kwh:rate1h{{{n}}}", "{{currency}}/kWh"),
    ]), 4, 4)

    b.add(timeseries("Cost per hour: energy, hardware, running", "Stacked: the node's energy cost, hardware "
                     "amortisation and running costs (colocation, network, support...) per hour, 5-minute averages "
                     "(recording rules).", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_{kind}_cost_per_hour:rate5m{{{n}}})",
               f"{kind} {{{{currency}}}}")
        for kind in COST_KINDS
    ], stack=True), 12, 8)
    b.add(timeseries("Energy cost per hour by GPU and host", "Per GPU from the recording rule; the host's share "
                     "(CPU, memory, platform) from its cost counter.", MONEY, [
        gpu_target(f"instance_gpu_currency:gpucost_energy_cost_per_hour:rate5m{{{g}}}", n, suffix="{{currency}}"),
        target(f'sum by (currency) (rate(gpucost_energy_cost_total{{{n}, component="host"}}[$__rate_interval])) * 3600',
               "host {{currency}}"),
    ], stack=True), 12, 8)

    b.add(pie("This month by kind", "Month to date by kind: energy, hardware, running (and this month's demand "
              "charge where the tariff has one).", MONEY, [
        target(f'sum by (kind, currency) (gpucost_cost_to_date{{{n}, period="month"}})'
               f' or sum by (kind, currency) ({tagged(f"gpucost_demand_charge{{{n}}}", "kind", "demand charge")})',
               "{{kind}} {{currency}}"),
    ]), 8, 8)
    b.add(bars("Cost in the time range by GPU", "Each GPU's own energy cost, hardware amortisation and running "
               "costs over the dashboard's time range (the node's own costs, host and server, not included).", MONEY, [
        gpu_target(in_range(f"{GPU_KEY}, currency", f'gpucost_{kind}_cost_total{{{g}, component="gpu"}}'),
                   n, kind, "{{currency}}")
        for kind in COST_KINDS
    ]), 16, 8)

    b.row("Own cost vs. the cloud")
    own = f"sum by (currency) ({GPU_COST}{{{g}}})"
    b.add(stat("Own cost per GPU-hour", "Fully loaded cost of the selected GPUs (their share of the node's too) per "
               "hour each was owned, busy or not, 5-minute average (recording rules).", MONEY, [
        target(f"{own} / sum by (currency) ({GPU_HOURS}{{{g}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Own cost per busy GPU-hour", "The same cost over the hours workloads held the GPUs: what a GPU-hour "
               "of work really cost. Owning is cheaper than the cloud while this is below the cloud price.", MONEY, [
        target(f"{own} / (sum by (currency) ({BUSY_HOURS}{{{g}}}) > 0)", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Cloud price per GPU-hour", "What renting a GPU of the same model costs per hour in each configured "
               "cloud offering ([[cloud_prices]], never fetched).", MONEY, [
        target(f"avg by (provider, offering, currency) ({CLOUD_PRICE}{{{g}}})", "{{provider}} {{offering}} {{currency}}"),
    ]), 4, 4)
    b.add(stat("Busy", "Share of the GPU-hours that workloads held the GPUs (not unallocated, not unknown "
               "processes), 5-minute average.", RATIO, [
        target(f"max(sum by (currency) ({BUSY_HOURS}{{{g}}}) / sum by (currency) ({GPU_HOURS}{{{g}}}))", "busy"),
    ]), 4, 4)
    b.add(stat("Break-even utilisation", "The busy share above which owning the node's GPUs is cheaper than renting "
               "the busy hours: own cost per GPU-hour ÷ cloud price (recording rule). Above 100 %: renting is "
               "cheaper however busy.", RATIO, [
        target(f"instance_offering_currency:gpucost_break_even_utilization:ratio{{{n}}}", "{{provider}} {{offering}}"),
    ]), 4, 4)
    b.add(stat("Saved vs. the cloud, month to date", SAVINGS_NOTE, MONEY, [
        target(f"instance_offering_currency:gpucost_cloud_savings_month_to_date:sum{{{n}}}",
               "{{provider}} {{offering}} {{currency}}"),
    ], thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}]), 4, 4)
    b.add(timeseries("Own cost per GPU-hour vs. cloud price", "Own fully loaded cost per GPU-hour owned and per "
                     "busy GPU-hour, against each cloud price (dashed).", MONEY, [
        target(f"{own} / sum by (currency) ({GPU_HOURS}{{{g}}})", "own per GPU-hour {{currency}}"),
        target(f"{own} / (sum by (currency) ({BUSY_HOURS}{{{g}}}) > 0)", "own per busy GPU-hour {{currency}}"),
        target(f"avg by (provider, offering, currency) ({CLOUD_PRICE}{{{g}}})",
               "cloud {{provider}} {{offering}} {{currency}}"),
    ], overrides=[dashed("/^cloud/")]), 8, 8)
    b.add(timeseries("Busy vs. break-even", "Busy share of the GPU-hours against the break-even utilisation of each "
                     "cloud price (dashed): above it, owning is cheaper.", RATIO, [
        target(f"max(sum by (currency) ({BUSY_HOURS}{{{g}}}) / sum by (currency) ({GPU_HOURS}{{{g}}}))", "busy"),
        target(f"instance_offering_currency:gpucost_break_even_utilization:ratio{{{n}}}",
               "break-even {{provider}} {{offering}}"),
    ], overrides=[dashed("/^break-even/")]), 8, 8)
    b.add(bars("This month: own vs. cloud", "Own fully loaded cost month to date, and what renting the GPU-hours "
               "workloads held would have cost at each cloud price (recording rules).", MONEY, [
        target(f"sum by (currency) (instance_currency:gpucost_cost_month_to_date:sum{{{n}}})", "own {{currency}}"),
        target(f"instance_offering_currency:gpucost_cloud_cost_month_to_date:sum{{{n}}}",
               "cloud {{provider}} {{offering}} {{currency}}"),
    ]), 8, 8)

    b.row("Price, PUE, carbon")
    b.add(timeseries("Energy price and band", "Price per facility kWh in force; a new colour is a new band.", MONEY, [
        target(f"gpucost_energy_price_per_kwh{{{n}}}", "{{band}} {{currency}}/kWh"),
    ], steps=True), 8, 7)
    b.add(stat("PUE", "Power usage effectiveness in force: facility energy ÷ IT energy.", PLAIN, [
        target(f"gpucost_pue_ratio{{{n}}}", "PUE"),
    ]), 4, 7)
    b.add(stat("Grid carbon intensity", "Grams of CO2e per kWh of grid energy in force now.", INTENSITY, [
        target(f"gpucost_grid_carbon_intensity_grams_per_kwh{{{n}}}", "intensity"),
    ]), 4, 7)
    b.add(timeseries("Emissions per hour", "Grams of CO2e per hour of the node's facility energy.", GRAMS, [
        target(f"sum(rate(gpucost_emissions_grams_total{{{n}}}[$__rate_interval])) * 3600", "g CO2e per hour"),
    ]), 8, 7)

    b.row("Energy and power")
    b.add(timeseries("Power: GPUs and host", "Stacked: each GPU as the driver reports it, and the host by "
                     "component (source rapl = measured, model = estimated).", WATT, [
        gpu_target(f"gpucost_gpu_power_watts{{{g}}}", n),
        target(f"sum by (component, source) (gpucost_host_power_watts{{{n}}})", "host {{component}} ({{source}})"),
    ], stack=True), 12, 8)
    b.add(timeseries("Node power", "IT power (GPUs + host), facility power (× PUE), the BMC's wall reading and the "
                     "month's demand peak where present, and the 5-minute averages from the energy counters.", WATT, [
        target(" or ".join([
            tagged(f"gpucost_node_it_power_watts{{{n}}}", "power", "IT now"),
            tagged(f"gpucost_node_facility_power_watts{{{n}}}", "power", "facility now"),
            tagged(f"gpucost_node_wall_power_watts{{{n}}}", "power", "wall (BMC)"),
            tagged(f"gpucost_demand_peak_watts{{{n}}}", "power", "demand peak this month"),
        ]), "{{power}}"),
        target(f"instance:gpucost_it_power_watts:rate5m{{{n}}}", "IT, 5 min average"),
        target(f"instance:gpucost_facility_power_watts:rate5m{{{n}}}", "facility, 5 min average"),
    ], overrides=[dashed("/demand peak/")]), 12, 8)
    b.add(timeseries("GPU power vs. limit", "Reported power against the enforced power limit (dashed).", WATT, [
        gpu_target(f"gpucost_gpu_power_watts{{{g}}}", n),
        gpu_target(f"gpucost_gpu_power_limit_watts{{{g}}}", n, "limit"),
    ], overrides=[dashed("/^limit/")]), 12, 8)
    b.add(timeseries("Time at the power cap", "Share of time each GPU's clocks were held back by its software "
                     "power cap (sw_power_cap): it wants more power than it may draw.", RATIO, [
        gpu_target(f'avg_over_time(gpucost_gpu_clock_event_active{{{g}, reason="sw_power_cap"}}[$__rate_interval])', n),
    ]), 12, 8)
    b.add(bars("Energy in the time range: GPUs and host", "IT energy over the dashboard's time range: per GPU "
               "(all measurement sources) and per host component.", KWH, [
        gpu_target(f"{in_range(GPU_KEY, f'gpucost_gpu_energy_joules_total{{{g}}}')} / {J_PER_KWH}", n),
        target(f"{in_range('component', f'gpucost_host_energy_joules_total{{{n}}}')} / {J_PER_KWH}",
               "host {{component}}"),
    ]), 12, 8)
    b.add(bars("GPU energy by measurement source", "How each GPU's energy in the time range was measured: counter "
               "(hardware energy counter), samples (driver power samples) or polled (estimate, fallback).", KWH, [
        gpu_target(f"{in_range(f'{GPU_KEY}, source', f'gpucost_gpu_energy_joules_total{{{g}}}')} / {J_PER_KWH}",
                   n, suffix="{{source}}"),
    ]), 12, 8)

    b.row("Idle GPUs")
    b.add(timeseries("Idle capacity cost per hour by GPU", "Fully loaded cost (energy, hardware, running) of the "
                     "time nobody held the GPU (workload unallocated): money burnt by an unused GPU (recording "
                     "rule).", MONEY, [
        gpu_target(f"{IDLE_CAPACITY}{{{g}}}", n, suffix="{{currency}}"),
    ]), 6, 8)
    b.add(timeseries("Idle energy cost per hour by GPU", "Energy cost per hour spent while the GPU's utilisation "
                     "was below the idle threshold, held or not (recording rule).", MONEY, [
        gpu_target(f"instance_gpu_currency:gpucost_idle_cost_per_hour:rate5m{{{g}}}", n, suffix="{{currency}}"),
    ]), 6, 8)
    b.add(bars("Idle cost in the time range", "Per GPU over the dashboard's time range: the idle capacity cost "
               "(fully loaded, nobody held it) and the energy cost while idle.", MONEY, [
        gpu_target(in_range(f"{GPU_KEY}, currency", f'gpucost_workload_cost_total{{{g}, workload="unallocated"}}'),
                   n, "capacity", "{{currency}}"),
        gpu_target(in_range(f"{GPU_KEY}, currency", f"gpucost_gpu_idle_cost_total{{{g}}}"), n, "energy",
                   "{{currency}}"),
    ]), 6, 8)
    b.add(timeseries("GPU utilisation", "Fraction of time a kernel ran on the GPU.", RATIO, [
        gpu_target(f"gpucost_gpu_utilization_ratio{{{g}}}", n),
    ]), 6, 8)

    b.row("Agent health")
    b.add(stat("Agent", "Is Prometheus scraping the agent (up), and can the agent read its GPUs (GPU source)?",
               PLAIN, [
        target(f"up{{{n}}}", "scrape"),
        target(f"gpucost_gpu_source_up{{{n}}}", "GPU source {{source}}"),
    ], mappings=UP_MAPPINGS), 4, 5)
    b.add(stat("Data", "Where the GPU data comes from: nvml = live GPUs, replay = a recorded trace (never "
               "production data).", PLAIN, [
        target(f"gpucost_agent_info{{{n}}}", "{{source}} (v{{version}})"),
    ], text="name"), 4, 5)
    b.add(stat("GPUs", "1 if the GPU answered on the last tick; a lost GPU keeps its totals.", PLAIN, [
        gpu_target(f"gpucost_gpu_up{{{g}}}", n),
    ], mappings=UP_MAPPINGS), 6, 5)
    b.add(stat("Age of the last sample and save", "Seconds since the last completed sampling tick, and since the "
               "totals were last written to disk (only when the agent persists them).", SECONDS, [
        target(tagged(f"time() - gpucost_agent_last_sample_timestamp_seconds{{{n}}}", "age_of", "last sample")
               + " or "
               + tagged(f"time() - gpucost_state_last_save_timestamp_seconds{{{n}}}", "age_of", "last save"),
               "{{age_of}}"),
    ], thresholds=[
        {"color": "green", "value": None}, {"color": "orange", "value": 120}, {"color": "red", "value": 600},
    ]), 6, 5)
    b.add(stat("Errors in the time range", "Agent errors by kind over the dashboard's time range.", COUNT, [
        target(f"sum(increase(gpucost_agent_errors_total{{{n}}}[$__range]))", "errors"),
    ], thresholds=RED_FROM_1), 4, 5)
    b.add(timeseries("Errors by kind", "Agent errors per rate interval, by kind (see the runbook in docs/).", COUNT, [
        target(f"sum by (kind) (increase(gpucost_agent_errors_total{{{n}}}[$__rate_interval]))", "{{kind}}"),
    ]), 6, 7)
    b.add(timeseries("Tick duration", "Wall time of the slowest sampling tick (all GPUs and the host) per rate "
                     "interval.", SECONDS, [
        target(f"max_over_time(gpucost_agent_sample_duration_seconds{{{n}}}[$__rate_interval])", "slowest tick"),
    ]), 6, 7)
    b.add(timeseries("Agent CPU", "CPU the agent process uses, as a fraction of one core.", RATIO, [
        target(f"rate(process_cpu_seconds_total{{{n}}}[$__rate_interval])", "CPU"),
    ]), 6, 7)
    b.add(timeseries("Agent memory", "Resident memory of the agent process.", BYTES, [
        target(f"process_resident_memory_bytes{{{n}}}", "RSS"),
    ]), 6, 7)

    variables = [
        datasource_variable(),
        query_variable("job", "Job", "label_values(gpucost_agent_info, job)"),
        query_variable("instance", "Node", 'label_values(gpucost_agent_info{job="$job"}, instance)'),
        query_variable("gpu", "GPU", f"label_values(gpucost_gpu_info{{{n}}}, gpu)", multi=True, numeric=True),
    ]
    return dashboard(
        "gpucost-node", "GPU cost: node",
        "One node: what it costs now, today and this month (fully loaded: energy, hardware, running), against "
        "renting its GPUs in a cloud, where the energy goes, idle GPUs, and whether the agent is healthy.",
        variables, b,
    )


# -- the fleet dashboard ----------------------------------------------------------

FLEET = 'job=~"$job", cluster=~"$cluster", instance=~"$instance"'
FLEET_GPUS = FLEET + ', gpu=~"$gpu"'
CUR = 'currency="$currency"'
CLUSTER = f'cluster=~"$cluster", {CUR}'
ROLLUP = " Cluster roll-up: the Job, Node and GPU filters do not apply."


def no_cluster(expr: str, label: str = "cluster") -> str:
    """Names series without a ``cluster``/``team`` label (no scrape label set) "(none)" instead of a blank."""
    return f'label_replace({expr}, "{label}", "(none)", "{label}", "")'


def fleet_variables(f: str) -> list[dict]:
    """Job, cluster, node, GPU and currency pickers of the dashboards that span nodes (``f``: their filter)."""
    return [
        datasource_variable(),
        # All = the jobs that run the agent, not every job (".*" would count node_exporter's `up` too)
        query_variable("job", "Job", "label_values(gpucost_agent_info, job)", multi=True, all_value=None),
        query_variable("cluster", "Cluster", 'label_values(gpucost_agent_info{job=~"$job"}, cluster)', multi=True),
        query_variable("instance", "Node",
                       'label_values(gpucost_agent_info{job=~"$job", cluster=~"$cluster"}, instance)', multi=True),
        query_variable("gpu", "GPU", f"label_values(gpucost_gpu_info{{{f}}}, gpu)", multi=True, numeric=True),
        query_variable("currency", "Currency", f"label_values(gpucost_node_cost_rate_per_hour{{{f}}}, currency)"),
    ]


def fleet_dashboard() -> dict:
    f, fg = FLEET, FLEET_GPUS
    node_cost = f"sum by ({NODE_KEY}, currency) (instance_currency:gpucost_cost_per_hour:rate5m{{{f}, {CUR}}})"
    node_link = {
        "title": "Node cost",
        "url": "/d/gpucost-node/gpu-cost-node?var-datasource=${datasource}&var-job=${__field.labels.job}"
               "&var-instance=${__field.labels.instance}&${__url_time_range}",
    }
    b = Board()

    b.row("Fleet")
    b.add(stat("Cost per hour", "Fully loaded (energy + hardware + running) cost of the selected clusters, 5-minute "
               "average." + ROLLUP, MONEY, [
        target(f"sum by (currency) (cluster_currency:gpucost_cost_per_hour:sum{{{CLUSTER}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Month to date", "Energy + hardware + running since the 1st of the month." + ROLLUP, MONEY, [
        target(f"sum by (currency) (cluster_currency:gpucost_cost_month_to_date:sum{{{CLUSTER}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Month projected", "Month to date + the current cost per hour until the month ends." + ROLLUP, MONEY, [
        target(f"sum by (currency) (cluster_currency:gpucost_cost_month_projected:sum{{{CLUSTER}}})", "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Idle capacity per hour", "Fully loaded cost (energy, hardware, running) of GPUs nobody held: money "
               "burnt by unused GPUs, 5-minute average." + ROLLUP, MONEY, [
        target(f"sum by (currency) (cluster_currency:gpucost_idle_capacity_cost_per_hour:sum{{{CLUSTER}}})",
               "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Agents down", "Scrape targets of the selected jobs that Prometheus cannot scrape.", COUNT, [
        target(f"sum(1 - up{{{f}}})", "down"),
    ], thresholds=RED_FROM_1), 4, 4)
    b.add(stat("GPUs lost", "GPUs that stopped answering (their totals are kept).", COUNT, [
        target(f"sum(1 - gpucost_gpu_up{{{fg}}})", "lost"),
    ], thresholds=RED_FROM_1), 4, 4)

    b.add(timeseries("Budget burn", "Month to date and its projection per cluster, against the monthly budget "
                     "(dashed) where gpucost:monthly_budget is defined (deploy/prometheus/rules/"
                     "gpucost-budget.rules.yml)." + ROLLUP, MONEY, [
        target(" or ".join([
            tagged(no_cluster(f"cluster_currency:gpucost_cost_month_to_date:sum{{{CLUSTER}}}"), "series", "to date"),
            tagged(no_cluster(f"cluster_currency:gpucost_cost_month_projected:sum{{{CLUSTER}}}"),
                   "series", "projected"),
            tagged(no_cluster(f"gpucost:monthly_budget{{{CLUSTER}}}"), "series", "budget"),
        ]), "{{cluster}} {{series}} {{currency}}"),
    ], overrides=[dashed("/budget/", "red")]), 8, 8)
    b.add(timeseries("Cost per hour by cluster", "Energy + hardware + running per hour, 5-minute average." + ROLLUP,
                     MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_cost_per_hour:sum{{{CLUSTER}}}"), "{{cluster}} {{currency}}"),
    ], stack=True), 8, 8)
    b.add(timeseries("Cost per hour: energy, hardware, running", "Stacked: the selected clusters' energy cost, "
                     "hardware amortisation and running costs per hour, 5-minute averages." + ROLLUP, MONEY, [
        target(f"sum by (currency) (cluster_currency:gpucost_{kind}_cost_per_hour:sum{{{CLUSTER}}})",
               f"{kind} {{{{currency}}}}")
        for kind in COST_KINDS
    ], stack=True), 8, 8)

    b.row("Own cost vs. the cloud")
    b.add(stat("Own cost per GPU-hour", "Fully loaded cost per hour each GPU was owned, busy or not, by cluster, "
               "5-minute average." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_cost_per_gpu_hour:ratio{{{CLUSTER}}}"), "{{cluster}} {{currency}}"),
    ]), 4, 5)
    b.add(stat("Own cost per busy GPU-hour", "The same cost over the hours workloads held the GPUs: what a GPU-hour "
               "of work really cost; compare it with the cloud price." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_cost_per_busy_gpu_hour:ratio{{{CLUSTER}}}"),
               "{{cluster}} {{currency}}"),
    ]), 4, 5)
    b.add(stat("Busy", "Share of the GPU-hours that workloads held the GPUs, by cluster." + ROLLUP, RATIO, [
        target(no_cluster(f"max by (cluster) (cluster_currency:gpucost_gpu_busy:ratio{{{CLUSTER}}})"), "{{cluster}}"),
    ]), 4, 5)
    b.add(stat("Break-even utilisation", "The busy share above which owning is cheaper than renting the busy hours "
               "at each cloud price: own cost per GPU-hour ÷ cloud price, models mixed by their price. Above 100 %: "
               "renting is cheaper however busy." + ROLLUP, RATIO, [
        target(no_cluster(f"cluster_offering_currency:gpucost_break_even_utilization:ratio{{{CLUSTER}}}"),
               "{{cluster}} {{provider}} {{offering}}"),
    ]), 4, 5)
    b.add(stat("Saved vs. the cloud, month to date", SAVINGS_NOTE + ROLLUP, MONEY, [
        target(f"sum by (provider, offering, currency) (cluster_offering_currency:gpucost_cloud_savings_month_to_date:sum"
               f"{{{CLUSTER}}})", "{{provider}} {{offering}} {{currency}}"),
    ], thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 0}]), 8, 5)
    b.add(timeseries("Own cost per GPU-hour vs. cloud price, by model", "Own fully loaded cost per GPU-hour owned and "
                     "per busy GPU-hour of each GPU model, against its cloud prices (dashed)." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_model_currency:gpucost_cost_per_gpu_hour:ratio{{{CLUSTER}}}"),
               "own {{name}} {{cluster}} {{currency}}"),
        target(no_cluster(f"cluster_model_currency:gpucost_cost_per_busy_gpu_hour:ratio{{{CLUSTER}}}"),
               "own per busy hour {{name}} {{cluster}} {{currency}}"),
        target(no_cluster(f"cluster_model_offering_currency:gpucost_cloud_price_per_gpu_hour:avg{{{CLUSTER}}}"),
               "cloud {{provider}} {{offering}} {{name}} {{cluster}} {{currency}}"),
    ], overrides=[dashed("/^cloud/")]), 12, 8)
    b.add(timeseries("Busy vs. break-even, by model", "Busy share of each GPU model's GPU-hours against its "
                     "break-even utilisation at each cloud price (dashed): above it, owning is cheaper." + ROLLUP,
                     RATIO, [
        target(no_cluster(f"max by (cluster, name) (cluster_model_currency:gpucost_gpu_busy:ratio{{{CLUSTER}}})"),
               "busy {{name}} {{cluster}}"),
        target(no_cluster(f"cluster_model_offering_currency:gpucost_break_even_utilization:ratio{{{CLUSTER}}}"),
               "break-even {{provider}} {{offering}} {{name}} {{cluster}}"),
    ], overrides=[dashed("/^break-even/")]), 12, 8)
    b.add(timeseries("Saved vs. the cloud by cluster, month to date", SAVINGS_NOTE + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_offering_currency:gpucost_cloud_savings_month_to_date:sum{{{CLUSTER}}}"),
               "{{cluster}} {{provider}} {{offering}} {{currency}}"),
    ]), 12, 8)
    b.add(bars("This month: own vs. cloud by cluster", "Own fully loaded cost month to date, and what renting the "
               "GPU-hours workloads held would have cost at each cloud price." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_cost_month_to_date:sum{{{CLUSTER}}}"), "own {{cluster}} {{currency}}"),
        target(no_cluster(f"cluster_offering_currency:gpucost_cloud_cost_month_to_date:sum{{{CLUSTER}}}"),
               "cloud {{provider}} {{offering}} {{cluster}} {{currency}}"),
    ]), 12, 8)

    b.row("Who spends")
    b.add(bars("Top 10 nodes", "Nodes by cost per hour (energy + hardware + running), 5-minute average. Click a bar for the "
               "node's dashboard.", MONEY, [
        target(f"topk(10, {node_cost})",
               "{{instance}} {{cluster}} {{currency}}"),
    ], links=[node_link]), 12, 9)
    b.add(bars("Top 10 GPUs", "GPUs by energy cost per hour, 5-minute average.", MONEY, [
        gpu_target(f"topk(10, instance_gpu_currency:gpucost_energy_cost_per_hour:rate5m{{{fg}, {CUR}}})", f,
                   suffix="{{currency}}"),
    ], links=[node_link]), 12, 9)
    b.add(timeseries("Cost per hour by node, top 20", "Energy + hardware + running per hour of the 20 dearest nodes at each "
                     "moment, 5-minute average.", MONEY, [
        target(f"topk(20, {node_cost})",
               "{{instance}} {{cluster}} {{currency}}"),
    ]), 12, 8)
    b.add(timeseries("Energy cost per hour by GPU model", "Energy cost per hour by GPU model and cluster." + ROLLUP,
                     MONEY, [
        target(no_cluster(f"cluster_model_currency:gpucost_energy_cost_per_hour:sum{{{CLUSTER}}}"),
               "{{name}} {{cluster}} {{currency}}"),
    ], stack=True), 12, 8)
    b.add(timeseries("Cost per hour by team", "Energy + hardware + running per hour by the team label the scrape config "
                     "attaches. Team roll-up: only the currency filter applies.", MONEY, [
        target(no_cluster(f"team_currency:gpucost_cost_per_hour:sum{{{CUR}}}", "team"), "{{team}} {{currency}}"),
    ], stack=True), 12, 8)
    b.add(bars("GPUs by model", "How many GPUs of each model the selected nodes have.", COUNT, [
        target(f"count by (name) (gpucost_gpu_info{{{fg}}})", "{{name}}"),
    ]), 12, 8)

    b.row("Idle money")
    unallocated = f'{WORKLOAD_COST}{{{fg}, {CUR}, workload="unallocated"}}'
    b.add(timeseries("Idle capacity per hour by cluster", "Fully loaded cost (energy, hardware, running) of GPUs "
                     "nobody held, 5-minute average." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_idle_capacity_cost_per_hour:sum{{{CLUSTER}}}"),
               "{{cluster}} {{currency}}"),
    ], stack=True), 8, 8)
    b.add(timeseries("Idle energy per hour by cluster", "Energy cost per hour of GPUs below the idle threshold, held "
                     "or not." + ROLLUP, MONEY, [
        target(no_cluster(f"cluster_currency:gpucost_idle_cost_per_hour:sum{{{CLUSTER}}}"), "{{cluster}} {{currency}}"),
    ], stack=True), 8, 8)
    b.add(bars("Idle money in the time range", "By node over the dashboard's time range: the idle capacity cost "
               "(fully loaded, GPUs nobody held) and the energy cost of idle GPUs.", MONEY, [
        target(f"topk(10, {in_range(f'{NODE_KEY}, currency', unallocated)})",
               "capacity {{instance}} {{cluster}} {{currency}}"),
        target(f"topk(10, {in_range(f'{NODE_KEY}, currency', f'gpucost_gpu_idle_cost_total{{{fg}, {CUR}}}')})",
               "energy {{instance}} {{cluster}} {{currency}}"),
    ], links=[node_link]), 8, 8)
    b.add(bars("Top 10 unused GPUs", "GPUs by idle capacity cost per hour (fully loaded cost of the time nobody held "
               "them), 5-minute average.", MONEY, [
        gpu_target(f"topk(10, {IDLE_CAPACITY}{{{fg}, {CUR}}})", f, suffix="{{currency}}"),
    ], links=[node_link]), 12, 8)
    b.add(bars("Top 10 idle GPUs", "GPUs by idle energy cost per hour, 5-minute average.", MONEY, [
        gpu_target(f"topk(10, instance_gpu_currency:gpucost_idle_cost_per_hour:rate5m{{{fg}, {CUR}}})", f,
                   suffix="{{currency}}"),
    ], links=[node_link]), 12, 8)

    b.row("Energy and carbon")
    b.add(timeseries("Facility power by cluster", "Facility power (IT × PUE) from the energy counters, 5-minute "
                     "average.", WATT, [
        target(no_cluster(f"sum by (cluster) (instance:gpucost_facility_power_watts:rate5m{{{f}}})"), "{{cluster}}"),
    ], stack=True), 8, 8)
    b.add(timeseries("Effective price by node", "Energy cost ÷ facility kWh over the last hour, per node.", MONEY, [
        target(f"instance_currency:gpucost_effective_price_per_kwh:rate1h{{{f}, {CUR}}}",
               "{{instance}} {{currency}}/kWh"),
    ]), 8, 8)
    b.add(timeseries("Emissions per hour by cluster", "Grams of CO2e per hour of facility energy.", GRAMS, [
        target(no_cluster(f"sum by (cluster) (rate(gpucost_emissions_grams_total{{{f}}}[$__rate_interval])) * 3600"),
               "{{cluster}}"),
    ], stack=True), 8, 8)

    variables = fleet_variables(f)
    return dashboard(
        "gpucost-fleet", "GPU cost: fleet",
        "Every node: fully loaded cost (energy, hardware, running) by cluster, team, node and GPU model, own cost "
        "per GPU-hour against the cloud price, break-even and savings, the top spenders, idle money and the month's "
        "budget burn. One currency at a time: costs in different currencies are never added.",
        variables, b,
    )


# -- the workload dashboard ---------------------------------------------------------

WORKLOAD_COST = "gpucost_workload_cost_total"
KIND_RULE = "instance_kind_currency:gpucost_workload_cost_per_hour:rate5m"
PER_NODE = " Per node: the GPU filter does not apply."
#: A workload's identity, as the legends show it (labels it lacks are empty).
WHO = "{{namespace}} {{pod}} {{slurm_job}} {{unit}} {{user}}"


def blank_as(expr: str, label: str, text: str) -> str:
    """``expr`` with an empty ``label`` shown as ``text`` (e.g. the cost that is not a pod's)."""
    return f'label_replace({expr}, "{label}", "{text}", "{label}", "")'


def or_zero(expr: str, total: str) -> str:
    """``expr`` (summed by currency), or 0 in each currency of ``total`` where it has no series:
    a node with no idle GPU shows 0, not "No data"."""
    return f"{expr} or {total} * 0"


COST_KIND_RULE = "instance_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m"
#: The labels that name a workload on a node, as the per-workload panels sum by them.
WHO_LABELS = "job, instance, workload, kind, namespace, pod, slurm_job, unit, user"


def workloads_dashboard() -> dict:
    f, fg = FLEET, FLEET_GPUS
    kinds = f"{KIND_RULE}{{{f}, {CUR}}}"
    total = f"sum by (currency) ({kinds})"

    def kind_only(kind: str) -> str:
        return f'sum by (currency) ({KIND_RULE}{{{f}, {CUR}, kind="{kind}"}})'

    def rollup(level: str, label: str, text: str) -> str:
        """A cluster roll-up of the workload rules, an empty ``label`` shown as ``text``."""
        return blank_as(f"{level}_currency:gpucost_workload_cost_per_hour:rate5m{{{CLUSTER}}}", label, text)

    def per_kind_rule(level: str, where: str) -> Any:
        """A *_cost_kind_currency workload rule's series, for :func:`cost_kind_table`."""
        return lambda m: f"{level}_cost_kind_currency:gpucost_workload_cost_per_hour:rate5m{{{where}{m}}}"

    def per_kind_range(m: str) -> str:
        """The workloads' cost over the dashboard's time range, per series."""
        return f"increase({WORKLOAD_COST}{{{fg}, {CUR}{m}}}[$__range])"

    by_namespace = rollup("namespace", "namespace", "(not a pod)")
    by_user = rollup("user", "user", "(none)")

    b = Board()
    b.row("Workloads")
    b.add(stat("Workload cost per hour", "Fully loaded cost of the selected nodes (energy, hardware amortisation, "
               "running costs), charged to the workloads that held their GPUs, 5-minute average: pods, jobs, users, "
               "and the pseudo-workloads unallocated and other." + PER_NODE, MONEY, [target(total, "{{currency}}")]),
          4, 4)
    b.add(stat("Idle capacity per hour", "Fully loaded cost of GPUs nobody held (kind unallocated): energy, "
               "amortisation and running costs nobody can be charged for." + PER_NODE, MONEY, [
        target(or_zero(kind_only("unallocated"), total), "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Idle GPU money per hour", "Energy cost of GPUs while their utilisation was below the idle "
               "threshold, with or without a process on them (recording rule).", MONEY, [
        target(or_zero(f"sum by (currency) (instance_gpu_currency:gpucost_idle_cost_per_hour:rate5m{{{fg}, {CUR}}})",
                       total), "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Unseen processes per hour", "Fully loaded cost of GPU processes the agent could not identify (kind "
               "unknown): PID namespaces or permissions hide them; in Kubernetes, run the agent with hostPID."
               + PER_NODE, MONEY, [
        target(or_zero(kind_only("unknown"), total), "{{currency}}"),
    ], thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.000001}]), 4, 4)
    b.add(stat("Merged into other", "Cost per hour of small workloads merged into workload other because the "
               "node had more than [attribution] max_workloads." + PER_NODE, MONEY, [
        target(or_zero(kind_only("other"), total), "{{currency}}"),
    ]), 4, 4)
    b.add(stat("Workloads on GPUs", "Workloads with a series now on the selected GPUs (finished ones stay "
               "[attribution] retention_seconds), not counting unallocated and other.", COUNT, [
        target(f'count(count by (job, instance, workload) ({WORKLOAD_COST}{{{fg}, {CUR}, '
               f'kind!~"unallocated|other"}})) or vector(0)', "workloads"),
    ]), 4, 4)

    b.add(timeseries("Cost per hour by kind", "Stacked: pods (kubernetes), containers, Slurm jobs, systemd units, "
                     "users, unknown processes, unallocated GPUs and other, fully loaded, 5-minute averages "
                     "(recording rule)." + PER_NODE, MONEY, [
        target(f"sum by (kind, currency) ({kinds})", "{{kind}} {{currency}}"),
    ], stack=True), 12, 8)
    b.add(timeseries("Cost per hour by cost kind", "Stacked: what the workloads are charged for: energy (their GPU "
                     "energy and share of the host's), hardware amortisation and running costs (their share by GPU "
                     "time held), 5-minute averages (recording rule)." + PER_NODE, MONEY, [
        target(f"sum by (cost_kind, currency) ({COST_KIND_RULE}{{{f}, {CUR}}})", "{{cost_kind}} {{currency}}"),
    ], stack=True), 12, 8)
    b.add(pie("Money by kind in the time range", "Fully loaded cost over the dashboard's time range by kind of "
              "workload.", MONEY, [
        target(in_range("kind, currency", f"{WORKLOAD_COST}{{{fg}, {CUR}}}"), "{{kind}} {{currency}}"),
    ]), 8, 8)
    b.add(cost_kind_table("Money by kind and cost kind in the time range", "Each kind of workload's cost over the "
                          "dashboard's time range: energy, hardware and running side by side, and their total.",
                          per_kind_range, "kind, currency"), 16, 8)

    b.row("By cost kind")
    b.add(cost_kind_table("Teams", "Cost per hour of each team's nodes (the team target label) by cost kind, "
                          "5-minute average. Team roll-up: only the currency filter applies.",
                          per_kind_rule("team", CUR), "team, currency",
                          blank=("team", "(none)")), 8, 8)
    b.add(cost_kind_table("Top 20 namespaces", "Cost per hour of each Kubernetes namespace by cost kind, 5-minute "
                          "average; (not a pod): everything else." + ROLLUP,
                          per_kind_rule("namespace", CLUSTER),
                          "cluster, namespace, currency", top=20, blank=("namespace", "(not a pod)")), 8, 8)
    b.add(cost_kind_table("Top 20 users", "Cost per hour of each user by cost kind, 5-minute average; (none): "
                          "unallocated, other and unknown." + ROLLUP,
                          per_kind_rule("user", CLUSTER),
                          "cluster, user, currency", top=20, blank=("user", "(none)")), 8, 8)

    b.row("Who spends")
    b.add(bars("Top 10 namespaces", "Kubernetes namespaces by fully loaded cost per hour, 5-minute average; (not a "
               "pod): everything else." + ROLLUP, MONEY, [
        target(f"topk(10, {by_namespace})",
               "{{namespace}} {{cluster}} {{currency}}"),
    ]), 6, 9)
    b.add(bars("Top 10 pods", "Pods by fully loaded cost per hour, 5-minute average; (not a pod): everything else."
               + ROLLUP, MONEY, [
        target(f"topk(10, {rollup('pod', 'pod', '(not a pod)')})",
               "{{namespace}} {{pod}} {{cluster}} {{currency}}"),
    ]), 6, 9)
    b.add(bars("Top 10 users", "Users (name, or uid where the name is not known) by fully loaded cost per hour, "
               "5-minute average; (none): unallocated, other and unknown." + ROLLUP, MONEY, [
        target(f"topk(10, {by_user})",
               "{{user}} {{cluster}} {{currency}}"),
    ]), 6, 9)
    b.add(bars("Top 10 Slurm jobs", "Slurm jobs by fully loaded cost per hour across their nodes, 5-minute "
               "average; (not a job): everything else." + ROLLUP, MONEY, [
        target(f"topk(10, {rollup('slurm_job', 'slurm_job', '(not a job)')})",
               "{{slurm_job}} {{cluster}} {{currency}}"),
    ]), 6, 9)
    b.add(timeseries("Cost per hour by namespace", "Stacked: the 10 dearest namespaces at each moment, 5-minute "
                     "average." + ROLLUP, MONEY, [
        target(f"topk(10, {by_namespace})",
               "{{namespace}} {{cluster}} {{currency}}"),
    ], stack=True), 12, 8)
    b.add(timeseries("Cost per hour by user", "Stacked: the 10 dearest users at each moment, 5-minute average."
                     + ROLLUP, MONEY, [
        target(f"topk(10, {by_user})",
               "{{user}} {{cluster}} {{currency}}"),
    ], stack=True), 12, 8)

    b.row("Top workloads in the time range")
    who = WHO_LABELS
    b.add(bars("Top 20 workloads by cost", "Fully loaded cost of each workload on the selected nodes and GPUs over "
               "the dashboard's time range.", MONEY, [
        target(f"topk(20, {in_range(f'{who}, currency', f'{WORKLOAD_COST}{{{fg}, {CUR}}}')})",
               f"{{{{kind}}}}: {WHO} on {{{{instance}}}} {{{{currency}}}}"),
    ]), 12, 10)
    b.add(cost_kind_table("Top 20 workloads by cost kind", "The same workloads' cost over the dashboard's time "
                          "range: energy, hardware and running side by side, and their total.",
                          per_kind_range, f"{who}, currency", top=20), 12, 10)
    b.add(bars("Top 20 workloads by GPU energy", "GPU energy of each workload over the dashboard's time range "
               "(the split that its energy cost follows).", KWH, [
        target(f"topk(20, {in_range(who, f'gpucost_workload_gpu_energy_joules_total{{{fg}}}')} / {J_PER_KWH})",
               f"{{{{kind}}}}: {WHO} on {{{{instance}}}}"),
    ]), 12, 10)
    b.add(bars("Top 20 workloads by GPU time", "GPU-hours each workload held over the dashboard's time range (the "
               "split that its hardware and running costs follow; GPUs held at once share by GPU memory).", HOURS, [
        target(f"topk(20, {in_range(who, f'gpucost_workload_gpu_seconds_total{{{fg}}}')} / 3600)",
               f"{{{{kind}}}}: {WHO} on {{{{instance}}}}"),
    ]), 12, 10)

    b.row("Idle and unallocated money")
    b.add(timeseries("Idle capacity per hour by node", "Fully loaded cost per hour of GPUs nobody held (kind "
                     "unallocated), 5-minute average." + PER_NODE, MONEY, [
        target(f'sum by (cluster, instance, currency) ({KIND_RULE}{{{f}, {CUR}, kind="unallocated"}})',
               "{{instance}} {{cluster}} {{currency}}"),
    ], stack=True), 8, 8)
    b.add(timeseries("Idle GPU money per hour by node", "Energy cost per hour of GPUs below the idle threshold, "
                     "5-minute average (recording rule).", MONEY, [
        target(f"sum by (cluster, instance, currency) (instance_gpu_currency:gpucost_idle_cost_per_hour:rate5m"
               f"{{{fg}, {CUR}}})", "{{instance}} {{cluster}} {{currency}}"),
    ], stack=True), 8, 8)
    b.add(bars("Idle capacity in the time range by GPU", "Fully loaded cost of each GPU while nobody held it, "
               "over the dashboard's time range.", MONEY, [
        gpu_target(in_range(f"{GPU_KEY}, currency", f'{WORKLOAD_COST}{{{fg}, {CUR}, kind="unallocated"}}'), f,
                   suffix="{{currency}}"),
    ]), 8, 8)

    variables = fleet_variables(f)
    return dashboard(
        "gpucost-workloads", "GPU cost: workloads",
        "Whose money it is: each GPU's fully loaded cost (energy, hardware amortisation, running costs) split among "
        "the workloads that held it, by kind, namespace, pod, user, team and Slurm job, the cost kinds side by side, "
        "the top workloads, and the money nobody used (unallocated and idle GPUs). One currency at a time.",
        variables, b,
    )


DASHBOARDS = {
    "gpu-cost-node.json": node_dashboard,
    "gpu-cost-fleet.json": fleet_dashboard,
    "gpu-cost-workloads.json": workloads_dashboard,
}


# -- files --------------------------------------------------------------------------


def render(dash: dict) -> str:
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


PANELS_BEGIN = "<!-- panels: generated by grafana/generate.py, do not edit by hand -->"
PANELS_END = "<!-- end of panels -->"


def panel_list(dashboards: Iterable[dict]) -> str:
    """The README's panel-by-panel description, from the panels' own titles and descriptions."""
    out: list[str] = []
    for dash in dashboards:
        out += [f"### {dash['title']} (`{dash['uid']}`)", "", dash["description"], ""]
        for p in dash["panels"]:
            if p["type"] == "row":
                if out[-1]:
                    out.append("")
                out += [f"**{p['title']}**", ""]
            else:
                unit = UNIT_WORDS[p["fieldConfig"]["defaults"]["unit"]]
                out.append(f"- *{p['title']}* ({unit}): {p['description']}")
        out.append("")
    return "\n".join(out).strip() + "\n"


def readme_with_panels(readme: str, dashboards: Iterable[dict]) -> str:
    before, sep, rest = readme.partition(PANELS_BEGIN)
    _, sep2, after = rest.partition(PANELS_END)
    if not sep or not sep2:
        raise SystemExit(f"{README}: the markers {PANELS_BEGIN!r} and {PANELS_END!r} are missing")
    return f"{before}{PANELS_BEGIN}\n\n{panel_list(dashboards)}\n{PANELS_END}{after}"


def expected_files() -> dict[Path, str]:
    dashboards = {name: build() for name, build in DASHBOARDS.items()}
    files = {DASHBOARD_DIR / name: render(d) for name, d in dashboards.items()}
    files[README] = readme_with_panels(README.read_text(encoding="utf-8"), dashboards.values())
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a committed file differs")
    args = p.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    for path in stale:
        print(f"{path.relative_to(HERE.parent)} is not what grafana/generate.py writes: "
              "run python grafana/generate.py and commit the result", file=sys.stderr)
    return 1 if stale else 0


# -- queries with the variables filled in, for tests ----------------------------------


class Query(NamedTuple):
    dashboard: str  # uid
    panel: str  # title
    expr: str


#: Values for a demo scraped by Prometheus as job "gpu-cost-agent" (no cluster label).
DEFAULT_VALUES: dict[str, str | list[str]] = {
    "job": "gpu-cost-agent",
    "instance": "127.0.0.1:9842",
    "gpu": ".*",
    "cluster": ".*",
    "currency": "EUR",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str | Sequence[str]]) -> str:
    """Fills in ``$var`` and ``${var}`` as Grafana does for Prometheus: a list becomes ``(a|b)``
    with regex characters escaped (a multi-value variable); a string is used as given, so
    pass ``.*`` for All. An unknown variable raises ``KeyError`` naming it."""

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        v = values[name]
        if isinstance(v, str):
            return v
        return "(" + "|".join(re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", s) for s in v) + ")"

    return _VARIABLE.sub(value, expr)


def dashboard_queries(values: Mapping[str, str | Sequence[str]] | None = None) -> list[Query]:
    """Every panel query of every dashboard, variables filled in from ``values``
    (merged over :data:`DEFAULT_VALUES`)."""
    merged = {**DEFAULT_VALUES, **(values or {})}
    return [
        Query(dash["uid"], p["title"], substitute(t["expr"], merged))
        for dash in (build() for build in DASHBOARDS.values())
        for p in dash["panels"] if p["type"] != "row"
        for t in p["targets"]
    ]


_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def variable_queries(values: Mapping[str, str | Sequence[str]] | None = None) -> list[tuple[str, str, str, str]]:
    """(dashboard uid, variable, series selector, label) of every ``label_values`` variable, filled in:
    the selector must match series that carry the label for the variable to offer values."""
    merged = {**DEFAULT_VALUES, **(values or {})}
    out = []
    for dash in (build() for build in DASHBOARDS.values()):
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                m = _LABEL_VALUES.match(var["definition"])
                assert m, var["definition"]
                out.append((dash["uid"], var["name"], substitute(m.group(1), merged), m.group(2)))
    return out


if __name__ == "__main__":
    sys.exit(main())
