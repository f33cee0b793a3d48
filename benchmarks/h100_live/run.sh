#!/bin/bash
# The live H100 run of docs/accuracy.md ("On a real H100, live"): `gpu-cost-agent run` + `record` + a probe
# (scrape, direct counter read, nvidia-smi, the agent's CPU and RSS every 5 s) under a known
# PyTorch load (load.py), then SIGTERM, summary.py and the test suite. Needs an NVIDIA GPU,
# torch and the agent's dependencies (wheels in .whl/ are installed to /tmp/site if present).
# Usage, from anywhere: OUT=/tmp/gpuout bash benchmarks/h100_live/run.sh   (~4 min)
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpuout}; mkdir -p "$OUT"
PORT=9842
exec > >(tee -a "$OUT/misc.log") 2>&1
if [ -z "${DRYRUN:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
ev() { echo "{\"event\":\"$1\",\"t\":$(date +%s.%N)$2}" >> "$OUT/load.jsonl"; }
{ nvidia-smi -q | head -70; nvidia-smi; python3 --version; python3 benchmarks/h100_live/facts.py; } > "$OUT/facts.txt" 2>&1
echo "facts done"; grep -E '"(driver|nvml_version|torch|nvidia_ml_py|name)"' "$OUT/facts.txt"; grep -A12 '"bench"' "$OUT/facts.txt"
rm -rf /tmp/st /tmp/probe.stop
ev agent_launch ""
TZ=UTC python3 -m agent run --tick 1 --listen 127.0.0.1:$PORT --config deploy/config.tou.toml --state-dir /tmp/st > "$OUT/agent.log" 2>&1 &
APID=$!
python3 -c "import signal,sys; signal.signal(signal.SIGTERM, signal.default_int_handler); from agent.cli import main; sys.exit(main(sys.argv[1:]))" \
  record -o "$OUT/h100_live.jsonl.gz" --duration 0 --note "${NOTE:-device run}" &
RPID=$!
python3 - <<PY
import time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen("http://127.0.0.1:$PORT/healthz", timeout=0.5); print("agent ready"); break
    except Exception: time.sleep(0.1)
else: print("agent NOT ready")
PY
python3 benchmarks/h100_live/probe.py $APID $PORT "$OUT/probe.jsonl" /tmp/probe.stop ${PROBE_INTERVAL:-5} &
PRPID=$!
${LOAD:-python3 benchmarks/h100_live/load.py "$OUT/load.jsonl"}
ev load_done ""
sleep ${TAIL:-5}
ev sigterm_sent ""
kill -TERM $APID; wait $APID; rc=$?
ev agent_exit ",\"rc\":$rc"
echo "agent exit rc=$rc"
touch /tmp/probe.stop; wait $PRPID
sleep 2
kill -TERM $RPID; wait $RPID; echo "record rc=$?"
ls -la /tmp/st "$OUT"
python3 benchmarks/h100_live/summary.py "$OUT" /tmp/st/state.json
if [ -z "${NOPYTEST:-}" ]; then
  timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider --timeout 60 > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/pytest.log" | tail -25
fi
