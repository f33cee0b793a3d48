"""Facts about the device and the latency/CPU cost of the agent's own NVML source on real hardware."""
import json, os, subprocess, sys, time

out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
except Exception as e:
    out["torch"] = f"error: {e}"
import pynvml as nv
try:
    from importlib.metadata import version
    out["nvidia_ml_py"] = version("nvidia-ml-py")
except Exception as e:
    out["nvidia_ml_py"] = str(e)
nv.nvmlInit()
out["driver"] = nv.nvmlSystemGetDriverVersion()
out["nvml_version"] = nv.nvmlSystemGetNVMLVersion()
try:
    out["cuda_driver_version"] = nv.nvmlSystemGetCudaDriverVersion()
except Exception as e:
    out["cuda_driver_version"] = str(e)
h = nv.nvmlDeviceGetHandleByIndex(0)
out["name"] = nv.nvmlDeviceGetName(h)
out["count"] = nv.nvmlDeviceGetCount()
nv.nvmlShutdown()

# nvidia-smi power fields: which exist
fields = {}
for f in ["power.draw", "power.draw.average", "power.draw.instant", "power.limit", "enforced.power.limit"]:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={f}", "--format=csv,noheader,nounits"], capture_output=True, text=True)
        fields[f] = {"rc": r.returncode, "out": (r.stdout + r.stderr).strip()[:200]}
    except OSError as e:
        fields[f] = {"rc": -1, "out": repr(e)}
out["nvidia_smi_fields"] = fields
ok = [f for f in ["power.draw", "power.draw.average", "power.draw.instant"] if fields[f]["rc"] == 0 and "not a valid" not in fields[f]["out"].lower()]
with open("/tmp/smi_fields", "w") as fh:
    fh.write(",".join(ok))

# The agent's own NvmlGpuSource: inventory, one read, per-call wall and CPU time.
sys.path.insert(0, os.getcwd())
from agent.sources.nvml import NvmlGpuSource
from agent.sources.gpu import GpuError
t0 = time.perf_counter(); src = NvmlGpuSource(); out["source_init_s"] = time.perf_counter() - t0
out["devices"] = [d.__dict__ if hasattr(d, "__dict__") else repr(d) for d in src.devices()]
try:
    from dataclasses import asdict
    out["devices"] = [asdict(d) for d in src.devices()]
except Exception:
    out["devices"] = [repr(d) for d in src.devices()]
r = src.read(0)
try:
    out["reading"] = asdict(r)
except Exception:
    out["reading"] = repr(r)

def bench(name, fn, n):
    res = []
    w0 = time.perf_counter(); c0 = time.process_time(); err = None
    for _ in range(n):
        try:
            res.append(fn())
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
    w = (time.perf_counter() - w0) / n; c = (time.process_time() - c0) / n
    out.setdefault("bench", {})[name] = {"n": n, "wall_us": round(w * 1e6, 1), "cpu_us": round(c * 1e6, 1), "error": err}
    return res

bench("read", lambda: src.read(0), 200)
e = bench("energy_mj", lambda: src.energy_mj(0), 30)
out["energy_mj_first_last"] = [e[0], e[-1]] if e else None
s = bench("power_samples_since0", lambda: src.power_samples(0, 0), 20)
if s and s[-1]:
    ss = s[-1]
    out["power_samples"] = {"n": len(ss), "span_ms": (ss[-1][0] - ss[0][0]) / 1000, "first": ss[:3], "last": ss[-3:]}
    gaps = [b[0] - a[0] for a, b in zip(ss, ss[1:])]
    out["power_samples"]["gap_us_min_max"] = [min(gaps), max(gaps)] if gaps else None
bench("processes", lambda: src.processes(0), 50)
out["unsupported"] = sorted(map(list, src._unsupported))
src.close()
print(json.dumps(out, indent=1, default=str))
