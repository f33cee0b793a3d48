#!/bin/bash
# Issue 9 on a real GPU: `gpu-cost-agent run` with attribution while two real processes share
# the GPU (worker A: 8192² bf16 matmuls back to back; worker B: 4096² at 50 % duty, both from
# benchmarks/h100_live/load.py), with `record` alongside. Checks on the final /metrics that the
# workloads add up to the GPU's energy and cost, prints the figures per workload, keeps the
# trace (it carries processes and per-process utilisation) and the state file.
# Needs torch on the machine. Usage: OUT=/tmp/attrib bash benchmarks/h100_attrib/run.sh  (~90 s)
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attrib}; mkdir -p "$OUT"; PORT=9843
exec > >(tee -a "$OUT/attrib.log") 2>&1
rm -rf /tmp/attrib_st
TZ=UTC python3 -m agent run --tick 1 --listen 127.0.0.1:$PORT --config deploy/config.tou.toml \
  --state-dir /tmp/attrib_st > "$OUT/agent.log" 2>&1 &
APID=$!
python3 -m agent record -o "$OUT/attrib.jsonl.gz" --duration ${REC:-75} --note "issue 9: workers A and B" &
RPID=$!
sleep ${IDLE:-10}                                   # nobody on the GPU: unallocated
python3 benchmarks/h100_live/load.py "$OUT/load.jsonl" worker A ${SECS:-40} &
WA=$!
sleep 8
# Worker B runs as another user (uid 65534 unless B_UID says otherwise), so the two processes are
# two workloads (user:0 and user:65534) even where no container or Slurm cgroup tells them apart.
# (its log lives in /tmp: $OUT may sit under a directory the other user cannot enter)
LOGB=/tmp/attrib_loadB.jsonl; rm -f $LOGB; touch $LOGB; chmod 666 $LOGB
setpriv --reuid=${B_UID:-65534} --regid=${B_UID:-65534} --clear-groups env HOME=/tmp \
  python3 benchmarks/h100_live/load.py $LOGB worker B $(( ${SECS:-40} - 12 )) &
WB=$!
(sleep 15; echo "nvidia-smi compute apps:"; nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; ps -o pid,uid,cmd -p $WA,$WB) &
wait $WA $WB
sleep ${TAIL:-10}
python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics').read().decode())" \
  > "$OUT/metrics_before_stop.txt"
kill -TERM $APID; wait $APID; echo "agent rc=$?"
wait $RPID; echo "record rc=$?"
cp /tmp/attrib_st/state.json "$OUT/state.json"
python3 - "$OUT" <<'PY'
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
out = sys.argv[1]
fam = {f.name: f.samples for f in text_string_to_metric_families(open(f"{out}/metrics_before_stop.txt").read())}
gpu = sum(s.value for s in fam["gpucost_gpu_energy_joules"] if s.name.endswith("_total"))
gcost = sum(s.value for s in fam["gpucost_energy_cost"] if s.name.endswith("_total") and s.labels["component"] == "gpu")
w = [s for s in fam["gpucost_workload_gpu_energy_joules"] if s.name.endswith("_total")]
c = {s.labels["workload"]: s.value for s in fam["gpucost_workload_cost"] if s.name.endswith("_total")}
print(f"GPU (scrape before SIGTERM): {gpu:.3f} J, {gcost:.6f} EUR")
for s in sorted(w, key=lambda s: -s.value):
    L = s.labels
    print(f"  {L['workload']:<28} kind={L['kind']:<11} user={L['user']:<10} unit={L['unit']:<24} {s.value:12.3f} J {c.get(L['workload'], 0):.6f} EUR")
ws = math.fsum(s.value for s in w); cs = math.fsum(c.values())
print(f"sum of workloads {ws:.3f} J ({(ws - gpu) / gpu:+.2e} rel), {cs:.6f} EUR ({(cs - gcost) / gcost:+.2e} rel)")
st = json.load(open(f"{out}/state.json"))
sj = sum(r[2] for r in st["workloads"]["rows"]); gj = sum(r[2] for r in st["gpu_energy_joules"])
print(f"state.json after SIGTERM: GPU {gj:.3f} J, workloads {sj:.3f} J ({(sj - gj) / gj:+.2e} rel)")
PY
cp $LOGB "$OUT/loadB.jsonl"
grep -hE '"event"' "$OUT/load.jsonl" "$OUT/loadB.jsonl" | head
