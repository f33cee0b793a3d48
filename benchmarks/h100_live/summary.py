"""Summarise a device run. summary.py OUTDIR STATEFILE  -> OUTDIR/summary.json (and prints it)."""
import bisect, calendar, gzip, json, os, re, statistics, sys

out_dir, state_path = sys.argv[1], sys.argv[2]
S = {}

def jl(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as fh:
        return [json.loads(l) for l in fh if l.strip()]

events = jl(os.path.join(out_dir, "load.jsonl"))
probes = jl(os.path.join(out_dir, "probe.jsonl"))
trace = jl(os.path.join(out_dir, "h100_live.jsonl.gz"))
header, rows = trace[0], trace[1:]
S["trace"] = {"rows": len(rows), "seconds": rows[-1]["t"] - rows[0]["t"], "bytes": os.path.getsize(os.path.join(out_dir, "h100_live.jsonl.gz")),
              "header_note": header.get("note"), "driver": header.get("driver_version"), "gpus": header.get("gpus")}

# counter series from the trace (10 Hz): (t, mJ)
cs = [(r["t"], r["gpus"]["0"]["energy_mj"]) for r in rows if r["gpus"].get("0", {}).get("energy_mj") is not None]
ct = [c[0] for c in cs]
def counter_at(t):
    """Linear interpolation of the counter at t (mJ) and the bracket of the reads around it."""
    i = bisect.bisect_left(ct, t)
    if i <= 0: return cs[0][1], (cs[0][1], cs[0][1]), "before_trace"
    if i >= len(cs): return cs[-1][1], (cs[-1][1], cs[-1][1]), "after_trace"
    (t0, e0), (t1, e1) = cs[i - 1], cs[i]
    return e0 + (e1 - e0) * (t - t0) / (t1 - t0), (e0, e1), None
S["trace"]["counter_delta_J"] = (cs[-1][1] - cs[0][1]) / 1000
# samples path integration over the trace
samples = sorted({tuple(s) for r in rows for s in r["gpus"]["0"].get("samples") or [] if ct[0] <= s[0] / 1e6 <= ct[-1]})
if len(samples) > 1:
    e = sum(a[1] * (b[0] - a[0]) for a, b in zip(samples, samples[1:])) / 1e9  # mW*us -> J
    lo, hi = samples[0][0] / 1e6, samples[-1][0] / 1e6
    truth = (counter_at(hi)[0] - counter_at(lo)[0]) / 1000
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    S["trace"]["samples"] = {"n": len(samples), "left_riemann_J": e, "counter_same_span_J": truth,
                              "err_pct": 100 * (e - truth) / truth, "max_gap_ms": max(gaps) / 1000,
                              "median_gap_ms": statistics.median(gaps) / 1000}
# how often does the counter advance (10 Hz reads)
steps = [b[1] - a[1] for a, b in zip(cs, cs[1:])]
S["trace"]["counter_reads_unchanged_frac"] = sum(1 for s in steps if s == 0) / max(1, len(steps))

# agent log times (agent ran with TZ=UTC)
log = open(os.path.join(out_dir, "agent.log")).read().splitlines()
def ltime(line):
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
    return calendar.timegm(tuple(map(int, re.split(r"[- :]", m.group(1)))) + (0, 0, 0)) + int(m.group(2)) / 1000 if m else None
def find(pat):
    for l in log:
        if pat in l: return ltime(l), l
    return None, None
t_method, _ = find("energy from")
t_serving, _ = find("serving on")
t_sig, _ = find("received SIG")
t_stopped, l_stopped = find("stopped in")
S["agent_log"] = {"lines": len(log), "warnings_errors": [l for l in log if " WARNING " in l or " ERROR " in l][:30],
                  "t_method_logged": t_method, "t_serving": t_serving, "t_sigterm": t_sig, "t_stopped": t_stopped,
                  "stopped_line": l_stopped, "first_lines": log[:12]}
ev = {e.get("event"): e for e in events if e.get("event") in ("agent_launch", "agent_exit", "sigterm_sent")}
S["events"] = ev
S["phases"] = [(e["phase"], e["t"]) for e in events if e.get("event") == "phase"]
S["phase_stats"] = [e for e in events if e.get("event") in ("phase_stats", "worker_ready", "worker_done")]

# persisted state
try:
    st = json.load(open(state_path))
    gpu_e = {f"{u}|{src}": v for u, src, v in st["gpu_energy_joules"]}
    S["state"] = {"gpu_energy_joules": gpu_e, "gpu_total_J": sum(gpu_e.values()), "saved_at": st.get("saved_at"),
                  "energy_cost": st.get("energy_cost"), "it_energy_joules": st.get("it_energy_joules")}
except Exception as e:
    S["state"] = {"error": repr(e)}

# agent energy vs counter over its life. The counter is a step function (~100 ms steps): the
# agent's baseline read falls between "energy from" and "serving on", its final read between
# "received SIGTERM" and "stopped in"; the recorder's reads just outside those windows bracket it.
def before(t): return cs[max(0, bisect.bisect_left(ct, t) - 1)][1]
def after(t): return cs[min(len(cs) - 1, bisect.bisect_right(ct, t))][1]
if t_method and t_stopped and "gpu_total_J" in S["state"]:
    agent = S["state"]["gpu_total_J"]
    lo = (before(t_sig) - after(t_serving)) / 1000
    hi = (after(t_stopped) - before(t_method)) / 1000
    S["energy_life"] = {"agent_persisted_J": agent, "counter_delta_J_bracket": [lo, hi],
                        "inside_bracket": lo - 0.0005 <= agent <= hi + 0.0005,
                        "agent_life_s": t_stopped - t_serving,
                        "start_window_s": t_serving - t_method, "stop_window_s": t_stopped - t_sig}

# per probe: agent total vs counter delta since baseline, lag; power vs nvidia-smi
def metric(vals, name, **labels):
    out = [v for n, l, v in vals if n == name and all(l.get(k) == x for k, x in labels.items())]
    return out
lag, powr, cpu, rss, util, scr, dur, reads = [], [], [], [], [], [], [], []
base_mj = counter_at(t_serving)[0] if t_serving else None
for p in probes:
    a = p.get("agent")
    if a: cpu.append((p["t"], a["cpu_s"])); rss.append(a["rss_kb"])
    if p.get("final") or not p.get("metrics"):
        continue
    vals = p["metrics"]
    tot = sum(metric(vals, "gpucost_gpu_energy_joules_total"))
    if base_mj is not None:
        truth = (counter_at(p["t"])[0] - base_mj) / 1000
        lag.append({"t": round(p["t"] - t_serving, 1), "agent_J": round(tot, 1), "counter_J": round(truth, 1), "behind_J": round(truth - tot, 1)})
    pw = metric(vals, "gpucost_gpu_power_watts")
    smi = p.get("smi") if isinstance(p.get("smi"), dict) else {}
    def f(x):
        try: return float(x)
        except (TypeError, ValueError): return None
    powr.append({"t": round(p["t"] - (t_serving or 0), 1), "agent_W": pw[0] if pw else None, "smi_draw_W": f(smi.get("power.draw")),
                 "smi_avg_W": f(smi.get("power.draw.average")), "smi_instant_W": f(smi.get("power.draw.instant")),
                 "nvml_power_W": p.get("nvml_power_mw", 0) / 1000 if p.get("nvml_power_mw") else None})
    u = metric(vals, "gpucost_gpu_utilization_ratio"); util.append(u[0] if u else None)
    scr.append(p.get("scrape_s")); d = metric(vals, "gpucost_agent_sample_duration_seconds"); dur.append(d[0] if d else None)
S["energy_lag"] = lag
if lag:
    S["energy_lag_summary"] = {"max_behind_J": max(x["behind_J"] for x in lag), "min_behind_J": min(x["behind_J"] for x in lag)}
S["power"] = powr
d = [x["agent_W"] - x["smi_draw_W"] for x in powr if x["agent_W"] is not None and x["smi_draw_W"] is not None]
if d:
    S["power_summary"] = {"n": len(d), "mean_diff_W": statistics.mean(d), "mean_abs_diff_W": statistics.mean(map(abs, d)),
                          "max_abs_diff_W": max(map(abs, d))}
S["utilization_seen"] = util
S["scrape_s"] = {"median": statistics.median([s for s in scr if s]) if any(scr) else None, "max": max([s for s in scr if s], default=None)}
S["tick_duration_s"] = {"median": statistics.median([x for x in dur if x]) if any(dur) else None, "max": max([x for x in dur if x], default=None)}
if len(cpu) >= 3:
    (t0, c0), (t1, c1) = cpu[1], cpu[-1]
    S["agent_cpu"] = {"cpu_s_first_probe": cpu[0][1], "cpu_s_last": cpu[-1][1], "steady_cpu_s_per_s": (c1 - c0) / (t1 - t0),
                      "window_s": t1 - t0, "total_cpu_s": cpu[-1][1],
                      "life_s": (t_stopped - ev["agent_launch"]["t"]) if t_stopped and "agent_launch" in ev else None}
S["agent_rss_kb"] = {"last": rss[-1] if rss else None, "max": max(rss) if rss else None,
                     "hwm_last": next((p["agent"]["hwm_kb"] for p in reversed(probes) if p.get("agent")), None)}
last = next((p for p in reversed(probes) if p.get("metrics_text")), None)
if last:
    fams = sorted({l.split("{")[0].split(" ")[0] for l in last["metrics_text"].splitlines() if l and not l.startswith("#")})
    S["metric_names_last_scrape"] = fams
    S["errors_last_scrape"] = [[n, l, v] for n, l, v in last["metrics"] if n == "gpucost_agent_errors_total"]
S["direct_counter_reads"] = [(round(p["t"] - (t_serving or 0), 1), p.get("energy_mj"), round(p.get("energy_read_s", 0) * 1000, 2)) for p in probes if "energy_mj" in p]
_smi = [p["smi_s"] for p in probes if "smi_s" in p]
S["smi_call_s_median"] = statistics.median(_smi) if _smi else None
json.dump(S, open(os.path.join(out_dir, "summary.json"), "w"), indent=1, default=str)
brief = {k: S[k] for k in ("energy_life", "energy_lag_summary", "power_summary", "agent_cpu", "agent_rss_kb", "tick_duration_s", "scrape_s", "events", "smi_call_s_median") if k in S}
brief["trace"] = {k: v for k, v in S["trace"].items() if k != "gpus"}
brief["warnings_errors"] = S["agent_log"]["warnings_errors"]
brief["errors_last_scrape"] = S.get("errors_last_scrape")
print(json.dumps(brief, indent=1, default=str))
