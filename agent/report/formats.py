"""The bill as CSV, JSON and FOCUS (FinOps Open Cost and Usage Specification) files.

Written with the standard library's ``csv`` and ``json``: the rows are a few hundred lines,
so pandas or pyarrow (what FOCUS tools often use) would add tens of MB of dependencies for
nothing. FOCUS is delivered as CSV (what ``focus-validator`` reads); Parquet would need pyarrow.

CSV: one row per group and currency, with the period, currency and every figure; the
reconciliation is in the JSON and on stderr, not in the CSV, so that a spreadsheet's SUM of a
column is the total.

FOCUS: the columns of FOCUS 1.0 (validated by the FinOps Foundation's ``focus-validator`` 1.0
in the tests) plus the split cost allocation columns of FOCUS 1.3 (``AllocatedMethodId``,
``AllocatedMethodDetails``, ``AllocatedResourceId``, ``AllocatedResourceName``,
``AllocatedTags``). A node's charge of one cost kind for the period is the *origin charge*
(``ResourceId`` = the node); each group's share of it is one *allocated charge* row — one row
per node, group and cost kind — and the allocated rows of a node and kind add up to that charge
(their ``AllocatedRatio`` to 1). Project figures are ``x_`` columns (``x_CostKind``,
``x_Allocation``, ``x_GpuHours``…), as the spec asks of custom columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, TextIO

from .bill import ALLOCATED, COST_KINDS, IDLE, Bill, Row, Section

#: Our documented split method (docs/cost.md, "Whose cost it is: fully loaded").
ALLOCATION_METHOD = "gpu-cost-agent/fully-loaded-v1"


def _num(x: float | None, digits: int = 6) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}f}".rstrip("0").rstrip(".") if x else "0"


def _money(x: float) -> str:
    return f"{x:.6f}"


# -- CSV -------------------------------------------------------------------------

CSV_FIGURES = ["gpu_hours", "busy_gpu_hours", "it_energy_kwh", "facility_energy_kwh", "energy_cost",
               "hardware_cost", "running_cost", "total_cost", "emissions_kg"]


def write_csv(bill: Bill, out: TextIO) -> None:
    offerings = sorted({k for s in bill.sections for r in s.rows for k in r.cloud})
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["period", "period_start", "period_end", "timezone", "currency", *bill.by, "allocation",
                *CSV_FIGURES, *(f"cloud_cost_{p}_{o}" for p, o in offerings)])
    p = bill.period
    for s in bill.sections:
        for r in s.rows:
            w.writerow([p.label, p.utc_iso(p.start), p.utc_iso(p.end), p.timezone, s.currency, *r.group,
                        r.allocation, *_figures(r), *(_money(r.cloud[k]) if k in r.cloud else "" for k in offerings)])


def _figures(r: Row) -> list[str]:
    return [_num(r.gpu_hours), _num(r.busy_gpu_hours), _num(r.it_kwh), _num(r.facility_kwh),
            _money(r.cost.get("energy", 0.0)), _money(r.cost.get("hardware", 0.0)),
            _money(r.cost.get("running", 0.0)), _money(r.total),
            _num(None if r.emissions_g is None else r.emissions_g / 1000)]


# -- JSON ------------------------------------------------------------------------


def bill_dict(bill: Bill) -> dict[str, Any]:
    p = bill.period

    def row(r: Row, s: Section) -> dict[str, Any]:
        return {
            "label": bill.label(r), "allocation": r.allocation, "group": dict(zip(bill.by, r.group)),
            **({"node": r.node} if r.node else {}),
            "gpu_hours": r.gpu_hours, "busy_gpu_hours": r.busy_gpu_hours, "it_energy_kwh": r.it_kwh,
            "facility_energy_kwh": r.facility_kwh,
            "emissions_kg": None if r.emissions_g is None else r.emissions_g / 1000,
            "cost": dict(r.cost), "total_cost": r.total,
            "cloud_cost": [{"provider": k[0], "offering": k[1], "cost": v} for k, v in sorted(r.cloud.items())],
            "workload_series": r.workloads,
        }

    return {
        "format": "gpu-cost-agent bill v1",
        "period": {"label": p.label, "start": p.utc_iso(p.start), "end": p.utc_iso(p.end),
                   "timezone": p.timezone, "hours": p.hours,
                   "local_start": p.local(p.start).isoformat(), "local_end": p.local(p.end).isoformat()},
        "generated": datetime.fromtimestamp(bill.generated, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": bill.source,
        "by": bill.by,
        "notes": bill.notes,
        "stats": bill.stats,
        "sections": [{
            "currency": s.currency,
            "rows": [row(r, s) for r in s.rows],
            "total": row(s.total(), s) | {"label": "total"},
            "reconciliation": [{"what": c.what, "unit": c.unit, "report": c.report, "metered": c.metered,
                                "difference": c.difference, "relative": c.relative, "info": c.info}
                               for c in s.checks],
            "daily_cost": s.daily,
            "cloud_prices": [{"provider": k[0], "offering": k[1], "price_per_gpu_hour": v}
                             for k, v in sorted(s.cloud_prices.items())],
        } for s in bill.sections],
    }


def write_json(bill: Bill, out: TextIO) -> None:
    json.dump(bill_dict(bill), out, indent=1, allow_nan=False)
    out.write("\n")


# -- FOCUS -----------------------------------------------------------------------

#: FOCUS 1.0 columns, then the split cost allocation columns of 1.3, then ours.
FOCUS_COLUMNS = [
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription",
    "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart", "CommitmentDiscountCategory",
    "CommitmentDiscountId", "CommitmentDiscountName", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice", "EffectiveCost",
    "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "SkuId", "SkuPriceId", "SubAccountId", "SubAccountName", "Tags",
]
ALLOCATED_COLUMNS = ["AllocatedMethodId", "AllocatedMethodDetails", "AllocatedResourceId",
                     "AllocatedResourceName", "AllocatedTags"]
X_COLUMNS = ["x_CostKind", "x_Allocation", "x_GpuHours", "x_BusyGpuHours", "x_EnergyKwh",
             "x_FacilityEnergyKwh", "x_EmissionsKg", "x_PeriodTimezone"]

_KIND_TEXT = {"energy": "energy (GPU and its share of the host, at the tariff, PUE included)",
              "hardware": "hardware amortisation", "running": "running costs"}


def _focus_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def focus_rows(bill: Bill, *, account: str = "gpu-cost-agent", provider: str = "On-premises") -> list[dict[str, str]]:
    p = bill.period
    out = []
    for s in bill.sections:
        if not s.currency:
            continue  # no money, no charge
        # the origin charges: per node and kind, the sum of its allocated rows
        origin: dict[tuple[str, str], float] = defaultdict(float)
        for r in s.detail:
            for kind in COST_KINDS:
                origin[(r.node, kind)] += r.cost.get(kind, 0.0)
        for r in s.detail:
            label = bill.label(r)
            tags = {b: v for b, v in zip(bill.by, r.group) if v}
            group_id = ";".join(f"{b}={v}" for b, v in zip(bill.by, r.group)) or "all"
            alloc_id = {ALLOCATED: group_id, IDLE: f"idle;{group_id}"}.get(r.allocation, f"unallocated;{group_id}")
            for kind in COST_KINDS:
                amount = r.cost.get(kind, 0.0)
                whole = origin[(r.node, kind)]
                if not whole and not amount:
                    continue
                ratio = amount / whole if whole else 0.0
                quantity, unit = (r.it_kwh, "kWh") if kind == "energy" else (r.gpu_hours, "GPU-Hours")
                details = {"Elements": [{"AllocatedRatio": ratio, "UsageUnit": "GPU-Hours",
                                         "UsageQuantity": r.gpu_hours}],
                           "x_Rule": "energy by measured GPU energy (host share by GPU time held); hardware and "
                                     "running by GPU time held, several workloads by GPU memory share"}
                amt = _money(amount)
                out.append({
                    "AvailabilityZone": "",
                    "BilledCost": amt, "EffectiveCost": amt, "ListCost": amt, "ContractedCost": amt,
                    "BillingAccountId": account, "BillingAccountName": account,
                    "BillingCurrency": s.currency,
                    "BillingPeriodStart": _focus_time(p.start), "BillingPeriodEnd": _focus_time(p.end),
                    "ChargePeriodStart": _focus_time(p.start), "ChargePeriodEnd": _focus_time(p.end),
                    "ChargeCategory": "Usage", "ChargeClass": "",
                    "ChargeDescription": f"GPU node {r.node}: {_KIND_TEXT[kind]}, {label}",
                    "ChargeFrequency": "Usage-Based" if kind == "energy" else "Recurring",
                    "CommitmentDiscountCategory": "", "CommitmentDiscountId": "", "CommitmentDiscountName": "",
                    "CommitmentDiscountStatus": "", "CommitmentDiscountType": "",
                    "ConsumedQuantity": _num(quantity), "ConsumedUnit": unit,
                    "ContractedUnitPrice": "", "ListUnitPrice": "",
                    "InvoiceIssuerName": account, "ProviderName": provider, "PublisherName": provider,
                    "PricingCategory": "Standard", "PricingQuantity": _num(quantity), "PricingUnit": unit,
                    "RegionId": "", "RegionName": "",
                    "ResourceId": r.node, "ResourceName": r.node, "ResourceType": "GPU node",
                    "ServiceCategory": "Compute", "ServiceName": "GPU compute",
                    "SkuId": f"gpucost-{kind}", "SkuPriceId": "",
                    "SubAccountId": group_id, "SubAccountName": label,
                    "Tags": json.dumps(tags, sort_keys=True),
                    "AllocatedMethodId": ALLOCATION_METHOD,
                    "AllocatedMethodDetails": json.dumps(details, sort_keys=True),
                    "AllocatedResourceId": alloc_id, "AllocatedResourceName": label,
                    "AllocatedTags": json.dumps(tags | {"x_Allocation": r.allocation}, sort_keys=True),
                    "x_CostKind": kind, "x_Allocation": r.allocation,
                    "x_GpuHours": _num(r.gpu_hours), "x_BusyGpuHours": _num(r.busy_gpu_hours),
                    "x_EnergyKwh": _num(r.it_kwh), "x_FacilityEnergyKwh": _num(r.facility_kwh),
                    "x_EmissionsKg": _num(None if r.emissions_g is None else r.emissions_g / 1000),
                    "x_PeriodTimezone": p.timezone,
                })
    return out


def write_focus(bill: Bill, out: TextIO, **kw: Any) -> None:
    w = csv.DictWriter(out, fieldnames=FOCUS_COLUMNS + ALLOCATED_COLUMNS + X_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in focus_rows(bill, **kw):
        w.writerow(r)


def focus_text(bill: Bill, **kw: Any) -> str:
    buf = io.StringIO()
    write_focus(bill, buf, **kw)
    return buf.getvalue()


def summary_lines(bill: Bill) -> list[str]:
    """What goes to stderr: per currency the rows' total and the reconciliation to the meter."""
    p = bill.period
    lines = [f"bill {p.label} ({p.timezone}: {p.local(p.start).isoformat()} to {p.local(p.end).isoformat()}, "
             f"{p.hours:g} h) from {bill.source}"]
    for s in bill.sections:
        t = s.total()
        idle = math.fsum(r.total for r in s.rows if r.allocation == IDLE)
        lines.append(f"  {s.currency or '(no currency)'}: {len(s.rows)} rows, total {t.total:.2f}, idle capacity "
                     f"{idle:.2f} ({idle / t.total:.1%})" if t.total else
                     f"  {s.currency or '(no currency)'}: {len(s.rows)} rows, no cost")
        for c in s.checks:
            if c.info:
                lines.append(f"    {c.what}: {c.metered:.6f} {c.unit}")
                continue
            rel = c.relative
            verdict = "" if rel is None or abs(rel) <= 1e-3 else "  <-- DIFFERS"
            lines.append(f"    reconciliation {c.what}: report {c.report:.6f} vs metered {c.metered:.6f} {c.unit}, "
                         f"difference {c.difference:+.6f}" + ("" if rel is None else f" ({rel:+.4%})") + verdict)
    lines.extend(f"  note: {n}" for n in bill.notes)
    return lines
