"""The bill as one self-contained HTML page: tables and charts as inline SVG, no script, no fetch.

A FinOps person opens it from a mail attachment, offline: so nothing is loaded from anywhere
(no JavaScript, fonts, stylesheets or images outside the file). The charts are hand-written
SVG — bars, stacked columns and a ring are a few dozen lines each. matplotlib would draw them
too, but it is ~40 MB of dependencies (numpy, pillow, fonttools) for four simple charts, and
its SVG embeds glyph paths that make the page several times larger; the hand-written SVG is
text a browser lays out, readable and selectable.

Charts, per currency: cost by group (stacked by cost kind), daily cost stacked by group, the
share of idle capacity and unallocated cost, and own fully loaded cost against what renting the
busy GPU-hours at the configured cloud prices would have cost (when ``[[cloud_prices]]`` is set).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape
from typing import TextIO

from .bill import ALLOCATED, IDLE, UNALLOCATED, Bill, Row, Section

KIND_COLOURS = {"energy": "#e8a33d", "hardware": "#3d6fb6", "running": "#7f63b8"}
ALLOC_COLOURS = {ALLOCATED: "#3d8b5a", UNALLOCATED: "#b9a13a", IDLE: "#c8553d"}
PALETTE = ["#3d6fb6", "#e8a33d", "#3d8b5a", "#c8553d", "#7f63b8", "#2aa1a8", "#b86390", "#8c7a4a",
           "#5b8bd0", "#d0894a", "#6aa57a", "#a05a7a", "#999999"]
OTHERS = "others"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}.card b{display:block;font-size:18px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{border-bottom:2px solid #ccc}tr.total td{font-weight:bold;border-top:2px solid #ccc}
.ok{color:#3d8b5a}.bad{color:#c8553d;font-weight:bold}svg{display:block;margin:6px 0 14px}svg text{font:12px system-ui,sans-serif;fill:#333}
.legend{font-size:12px}.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px}
"""


def write_html(bill: Bill, out: TextIO, *, top: int = 12) -> None:
    out.write(render(bill, top=top))


def render(bill: Bill, *, top: int = 12) -> str:
    p = bill.period
    gen = datetime.fromtimestamp(bill.generated, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>GPU bill {escape(p.label)}</title><style>{CSS}</style></head><body>",
        f"<h1>GPU bill {escape(p.label)}</h1>",
        f'<p class="muted">{escape(p.local(p.start).strftime("%Y-%m-%d %H:%M %Z"))} to '
        f'{escape(p.local(p.end).strftime("%Y-%m-%d %H:%M %Z"))} ({escape(p.timezone)}, {p.hours:g} h) · '
        f'by {escape(", ".join(bill.by) or "all")} · fully loaded (energy, hardware, running costs) · '
        f"from {escape(bill.source)} · made {gen} by gpu-cost-agent report</p>",
    ]
    for note in bill.notes:
        parts.append(f'<p class="muted">Note: {escape(note)}</p>')
    for s in bill.sections:
        parts.append(_section(bill, s, top))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _m(x: float, cur: str) -> str:
    return f"{x:,.2f} {cur}".strip()


def _section(bill: Bill, s: Section, top: int) -> str:
    cur = s.currency or ""
    t = s.total()
    idle = math.fsum(r.total for r in s.rows if r.allocation == IDLE)
    unalloc = math.fsum(r.total for r in s.rows if r.allocation == UNALLOCATED)
    out = [f"<section><h2>{escape(cur or 'No currency')}</h2>", '<div class="cards">',
           f"<div class=card>Total<b>{_m(t.total, cur)}</b></div>",
           f"<div class=card>Idle capacity<b>{_m(idle, cur)}</b>{(idle / t.total if t.total else 0):.1%} of the total</div>",
           f"<div class=card>GPU-hours<b>{t.gpu_hours:,.1f}</b>{t.busy_gpu_hours:,.1f} busy</div>",
           f"<div class=card>GPU energy<b>{t.it_kwh:,.1f} kWh</b>"
           + (f"{t.facility_kwh:,.1f} kWh at the facility" if t.facility_kwh is not None else "") + "</div>"]
    if t.emissions_g is not None:
        out.append(f"<div class=card>Emissions<b>{t.emissions_g / 1000:,.1f} kg</b>CO2e of the GPU energy</div>")
    out.append("</div>")
    if cur:
        out.append("<h3>Cost by group</h3>" + bar_chart(bill, s, top))
        if s.daily:
            out.append("<h3>Daily cost by group</h3>" + daily_chart(bill, s, top))
        out.append("<h3>Idle capacity and unallocated cost</h3>" + share_chart(t.total - idle - unalloc, unalloc, idle, cur))
        if s.cloud_prices:
            out.append("<h3>Own cost against the cloud price</h3>" + cloud_chart(bill, s, top))
    out.append("<h3>Rows</h3>" + _table(bill, s))
    if s.checks:
        out.append("<h3>Reconciliation to the meter</h3>" + _checks(s))
    out.append("</section>")
    return "\n".join(out)


def _top_rows(rows: list[Row], top: int) -> list[Row]:
    alloc = [r for r in rows if r.allocation == ALLOCATED]
    rest = [r for r in rows if r.allocation != ALLOCATED]
    alloc.sort(key=lambda r: -r.total)
    if len(alloc) > top:
        other = Row(rows[0].currency, ALLOCATED, (OTHERS,))
        for r in alloc[top:]:
            other.add(r)
        alloc = alloc[:top] + [other]
    return alloc + rest


def _label(bill: Bill, r: Row) -> str:
    return OTHERS if r.group == (OTHERS,) else bill.label(r)


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{escape(n)}</span>'
                                            for n, c in items) + "</div>"


def bar_chart(bill: Bill, s: Section, top: int) -> str:
    rows = _top_rows(s.rows, top)
    width, left, bar, gap = 960, 300, 18, 6
    plot = width - left - 90
    peak = max((r.total for r in rows), default=0.0) or 1.0
    height = len(rows) * (bar + gap) + 10
    svg = [f'<svg class="chart" data-chart="cost-by-group" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" xmlns="http://www.w3.org/2000/svg">'
           f"<title>Cost by group, {escape(s.currency)}</title>"]
    for n, r in enumerate(rows):
        y = 5 + n * (bar + gap)
        svg.append(f'<text x="{left - 8}" y="{y + bar - 5}" text-anchor="end">{escape(_clip(_label(bill, r), 44))}</text>')
        x = float(left)
        for kind, colour in KIND_COLOURS.items():
            w = r.cost.get(kind, 0.0) / peak * plot
            if w > 0:
                svg.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}">'
                           f"<title>{escape(_label(bill, r))}: {kind} {_m(r.cost.get(kind, 0.0), s.currency)}</title></rect>")
                x += w
        svg.append(f'<text x="{x + 6:.1f}" y="{y + bar - 5}">{_m(r.total, "")}</text>')
    svg.append("</svg>")
    return _legend([(k, c) for k, c in KIND_COLOURS.items()]) + "".join(svg)


def daily_chart(bill: Bill, s: Section, top: int) -> str:
    rows = _top_rows(s.rows, top)
    named = [_label(bill, r) for r in rows if r.group != (OTHERS,)]
    colours = {name: (ALLOC_COLOURS[IDLE] if r.allocation == IDLE else
                      ALLOC_COLOURS[UNALLOCATED] if r.allocation == UNALLOCATED else PALETTE[i % (len(PALETTE) - 1)])
               for i, (name, r) in enumerate(zip(named, [r for r in rows if r.group != (OTHERS,)]))}
    colours[OTHERS] = PALETTE[-1]
    days = list(s.daily)
    stacks = []
    for d in days:
        per = {}
        for label, v in s.daily[d].items():
            key = label if label in colours else OTHERS
            per[key] = per.get(key, 0.0) + v
        stacks.append(per)
    width, height, left, bottom = 960, 260, 60, 40
    plot_w, plot_h = width - left - 10, height - bottom - 10
    peak = max((sum(p.values()) for p in stacks), default=0.0) or 1.0
    col = plot_w / max(len(days), 1)
    svg = [f'<svg class="chart" data-chart="daily-cost" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" xmlns="http://www.w3.org/2000/svg">'
           f"<title>Daily cost by group, {escape(s.currency)}</title>"]
    for frac in (0.0, 0.5, 1.0):
        y = 10 + plot_h * (1 - frac)
        svg.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{peak * frac:,.0f}</text>')
    order = list(colours)
    for n, (d, per) in enumerate(zip(days, stacks)):
        x = left + n * col
        y = 10.0 + plot_h
        for name in order:
            v = per.get(name, 0.0)
            if v <= 0:
                continue
            h = v / peak * plot_h
            y -= h
            svg.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(col - 2, 1):.1f}" height="{h:.1f}" '
                       f'fill="{colours[name]}"><title>{escape(d)} {escape(name)}: {_m(v, s.currency)}</title></rect>')
        if len(days) <= 12 or n % max(1, len(days) // 10) == 0:
            svg.append(f'<text x="{x + col / 2:.1f}" y="{height - bottom + 16}" text-anchor="middle">{escape(d[5:])}</text>')
    svg.append("</svg>")
    return _legend([(n, c) for n, c in colours.items() if any(n in p for p in stacks)]) + "".join(svg)


def share_chart(allocated: float, unallocated: float, idle: float, cur: str) -> str:
    parts = [("allocated", allocated, ALLOC_COLOURS[ALLOCATED]), ("unallocated", unallocated, ALLOC_COLOURS[UNALLOCATED]),
             ("idle capacity", idle, ALLOC_COLOURS[IDLE])]
    total = sum(max(v, 0.0) for _, v, _ in parts) or 1.0
    cx, cy, r, w = 90, 90, 70, 26
    svg = [f'<svg class="chart" data-chart="idle-share" width="520" height="180" viewBox="0 0 520 180" role="img" '
           f'xmlns="http://www.w3.org/2000/svg"><title>Idle capacity share, {escape(cur)}</title>']
    start = -math.pi / 2
    circ = 2 * math.pi * r
    for n, (name, v, colour) in enumerate(parts):
        frac = max(v, 0.0) / total
        if frac > 0:
            # one ring segment: a circle's stroke dashed to the fraction, rotated to where the last ended
            svg.append(f'<circle cx="{cx}" cy="{cy}" r="{r}" fill="none" stroke="{colour}" stroke-width="{w}" '
                       f'stroke-dasharray="{frac * circ:.2f} {circ:.2f}" '
                       f'transform="rotate({math.degrees(start):.2f} {cx} {cy})"><title>{name}: {_m(v, cur)} '
                       f"({frac:.1%})</title></circle>")
            start += frac * 2 * math.pi
        svg.append(f'<rect x="200" y="{40 + n * 30}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="220" y="{51 + n * 30}">{name}: {_m(v, cur)} ({frac:.1%})</text>')
    svg.append("</svg>")
    return "".join(svg)


def cloud_chart(bill: Bill, s: Section, top: int) -> str:
    rows = [r for r in _top_rows(s.rows, top) if r.allocation == ALLOCATED and r.busy_gpu_hours > 0]
    offers = sorted(s.cloud_prices)
    colours = ["#2aa1a8", "#b86390", "#8c7a4a", "#5b8bd0"]
    width, left, bar = 960, 300, 12
    group_h = bar * (1 + len(offers)) + 10
    height = len(rows) * group_h + 10
    peak = max([r.total for r in rows] + [v for r in rows for v in r.cloud.values()] + [1e-9])
    plot = width - left - 90
    svg = [f'<svg class="chart" data-chart="cloud" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" xmlns="http://www.w3.org/2000/svg"><title>Own cost against the cloud price, {escape(s.currency)}'
           "</title>"]
    for n, r in enumerate(rows):
        y = 5 + n * group_h
        svg.append(f'<text x="{left - 8}" y="{y + bar}" text-anchor="end">{escape(_clip(_label(bill, r), 44))}</text>')
        bars = [("own, fully loaded", r.total, "#3d6fb6")] + [
            (f"{o[0]} {o[1]} ({s.cloud_prices[o]:g}/GPU-h × {r.busy_gpu_hours:,.0f} busy h)", r.cloud.get(o, 0.0),
             colours[i % len(colours)]) for i, o in enumerate(offers)]
        for k, (name, v, colour) in enumerate(bars):
            w = v / peak * plot
            svg.append(f'<rect x="{left}" y="{y + k * bar}" width="{w:.1f}" height="{bar - 2}" fill="{colour}">'
                       f"<title>{escape(name)}: {_m(v, s.currency)}</title></rect>"
                       f'<text x="{left + w + 6:.1f}" y="{y + k * bar + bar - 3}">{_m(v, "")}</text>')
    svg.append("</svg>")
    legend = [("own, fully loaded", "#3d6fb6")] + [(f"renting the busy GPU-hours: {o[0]} {o[1]} at {s.cloud_prices[o]:g} "
                                                    f"{s.currency}/GPU-hour", colours[i % len(colours)])
                                                   for i, o in enumerate(offers)]
    return _legend(legend) + "".join(svg)


def _table(bill: Bill, s: Section) -> str:
    cur = s.currency
    head = ("<table><thead><tr><th>group</th><th>GPU-h held</th><th>GPU-h busy</th><th>GPU kWh</th>"
            "<th>facility kWh</th><th>energy</th><th>hardware</th><th>running</th><th>total</th><th>kg CO2e</th>"
            "</tr></thead><tbody>")
    body = []

    def tr(r: Row, label: str, cls: str = "") -> str:
        return (f'<tr class="{cls}"><td>{escape(label)}</td><td>{r.gpu_hours:,.2f}</td><td>{r.busy_gpu_hours:,.2f}</td>'
                f"<td>{r.it_kwh:,.2f}</td><td>{'' if r.facility_kwh is None else f'{r.facility_kwh:,.2f}'}</td>"
                f"<td>{r.cost.get('energy', 0.0):,.2f}</td><td>{r.cost.get('hardware', 0.0):,.2f}</td>"
                f"<td>{r.cost.get('running', 0.0):,.2f}</td><td>{r.total:,.2f} {escape(cur)}</td>"
                f"<td>{'' if r.emissions_g is None else f'{r.emissions_g / 1000:,.2f}'}</td></tr>")

    for r in s.rows:
        body.append(tr(r, bill.label(r)))
    body.append(tr(s.total(), "total", "total"))
    return head + "".join(body) + "</tbody></table>"


def _checks(s: Section) -> str:
    rows = []
    for c in s.checks:
        if c.info:
            rows.append(f"<tr><td>{escape(c.what)}</td><td></td><td>{c.metered:,.6f} {escape(c.unit)}</td><td></td><td></td></tr>")
            continue
        rel = c.relative
        ok = rel is not None and abs(rel) <= 1e-3
        rows.append(f"<tr><td>{escape(c.what)}</td><td>{c.report:,.6f}</td><td>{c.metered:,.6f} {escape(c.unit)}</td>"
                    f"<td>{c.difference:+,.6f}</td><td class=\"{'ok' if ok else 'bad'}\">"
                    f"{'' if rel is None else f'{rel:+.4%}'}</td></tr>")
    return ("<table><thead><tr><th>what</th><th>the rows</th><th>the node counters</th><th>difference</th>"
            "<th>relative</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
