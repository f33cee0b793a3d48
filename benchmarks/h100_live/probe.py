"""Every INTERVAL s: scrape the agent, read the GPU energy counter directly, nvidia-smi power, agent CPU/RSS.

probe.py PID PORT OUTFILE STOPFILE [INTERVAL]
Writes one JSON line per probe; after STOPFILE appears, one last probe (agent may be gone) and exit.
"""
import json, os, subprocess, sys, time, urllib.request

pid, port, outfile, stopfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
interval = float(sys.argv[5]) if len(sys.argv) > 5 else 5.0
TCK = os.sysconf("SC_CLK_TCK")
try:
    smi_fields = open("/tmp/smi_fields").read().strip() or "power.draw"
except OSError:
    smi_fields = "power.draw"

nv = None
try:
    import pynvml as nv
    nv.nvmlInit(); h = nv.nvmlDeviceGetHandleByIndex(0)
except Exception as e:  # dry run without a GPU
    nv = None; nvml_error = str(e)

KEEP = ("gpucost_gpu_energy_joules_total", "gpucost_gpu_power_watts", "gpucost_gpu_utilization_ratio",
        "gpucost_gpu_memory_utilization_ratio", "gpucost_gpu_memory_used_bytes", "gpucost_agent_sample_duration_seconds",
        "gpucost_agent_ticks_total", "gpucost_agent_gpu_energy_reads_total", "gpucost_agent_errors_total",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "gpucost_gpu_up", "gpucost_gpu_temperature_celsius",
        "gpucost_gpu_sm_clock_hertz", "gpucost_gpu_clock_event_active", "gpucost_gpu_performance_state",
        "gpucost_energy_cost_total", "gpucost_host_power_watts", "gpucost_node_it_power_watts")

def proc_stats():
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / TCK  # utime, stime (fields 14, 15)
        st = {l.split(":")[0]: l.split(":")[1].strip() for l in open(f"/proc/{pid}/status") if ":" in l}
        return {"cpu_s": cpu, "rss_kb": int(st["VmRSS"].split()[0]), "hwm_kb": int(st["VmHWM"].split()[0]),
                "threads": int(st["Threads"])}
    except (OSError, KeyError, IndexError):
        return None

def scrape():
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except Exception as e:
        return None, None, f"{type(e).__name__}: {e}", None
    dt = time.perf_counter() - t0
    from prometheus_client.parser import text_string_to_metric_families
    vals = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(KEEP):
                vals.append([s.name, s.labels, s.value])
    return vals, text, None, dt

def probe(final=False):
    row = {"t": time.time(), "final": final}
    row["agent"] = proc_stats()
    if not final:
        vals, text, err, dt = scrape()
        row.update(metrics=vals, scrape_error=err, scrape_s=dt)
        row["metrics_text"] = text
    if nv is not None:
        t0 = time.perf_counter()
        row["energy_mj"] = nv.nvmlDeviceGetTotalEnergyConsumption(h)
        row["energy_read_s"] = time.perf_counter() - t0
        row["t_energy"] = time.time()
        row["nvml_power_mw"] = nv.nvmlDeviceGetPowerUsage(h)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={smi_fields}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        row["smi_s"] = time.perf_counter() - t0
        row["smi"] = dict(zip(smi_fields.split(","), [x.strip() for x in r.stdout.strip().split(",")])) if r.returncode == 0 else (r.stdout + r.stderr)[:300]
    except (OSError, subprocess.SubprocessError) as e:
        row["smi"] = repr(e)
    with open(outfile, "a") as fh:
        fh.write(json.dumps(row) + "\n")

nxt = time.monotonic()
while not os.path.exists(stopfile):
    probe()
    nxt += interval
    while time.monotonic() < nxt and not os.path.exists(stopfile):
        time.sleep(0.05)
probe(final=True)
