"""Where the running agent's resident memory comes from, import by import.

    .venv/bin/python benchmarks/memory_breakdown.py [--shed]

Each row starts a fresh interpreter that imports what the rows above it imported plus its
own modules (so a module shared by two rows counts in the first), and reads ``VmRSS``,
``RssAnon`` (the heap: Python objects, code) and ``RssFile`` (shared libraries and the
interpreter's own pages, shared with other processes but counted in RSS) from
``/proc/self/status``. The fake NVML (``tests/fakenvml``, which loads the real nvidia-ml-py)
is first on the path, as in ``benchmarks/process_overhead.py``. The last row validates
``deploy/config.tou.toml`` and builds the ledger, as ``run`` does before its first tick.

``--shed`` measures what dropping pydantic after validation would give back: it validates
the configuration, drops every module imported from pydantic on (the ``sys.modules``
entries, then also their namespaces, as interpreter shutdown does), collects garbage and
calls glibc's ``malloc_trim(0)``, reading RSS and the traced Python heap at each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_DIR = ROOT / "tests" / "fakenvml"
CONFIG = ROOT / "deploy" / "config.tou.toml"

#: (row, what it imports); cumulative.
STEPS: list[tuple[str, list[str]]] = [
    ("interpreter (python, site)", []),
    ("asyncio, ssl (libssl, libcrypto)", ["asyncio", "ssl"]),
    ("prometheus_client", ["prometheus_client"]),
    ("apscheduler (BackgroundScheduler)", ["apscheduler.schedulers.background"]),
    ("pynvml (nvidia-ml-py)", ["pynvml"]),
    ("pydantic (BaseModel, fields, validators)", ["pydantic", "pydantic.main", "pydantic.fields",
                                                   "pydantic.functional_validators"]),
    ("pydantic_settings", ["pydantic_settings"]),
    ("the agent's modules for `run`", ["agent.cli", "agent.gpucalls", "agent.sources.nvml", "agent.sources.host",
                                       "agent.attribution.split", "agent.attribution.identity"]),
]

PROBE = r"""
import gc, importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
if sys.argv[2] == "1":
    from agent.accounting import Ledger
    from agent.config import load
    settings = load(sys.argv[3])
    ledger = Ledger.from_settings(settings)
gc.collect()
out = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in ("VmRSS", "RssAnon", "RssFile"):
        out[key] = int(value.split()[0]) / 1024
out["modules"] = len(sys.modules)
print(json.dumps(out))
"""

SHED = r"""
import ctypes, gc, json, sys, tracemalloc
if sys.argv[2] == "1":
    tracemalloc.start()

def status(label):
    gc.collect()
    out = {"step": label, "heap": tracemalloc.get_traced_memory()[0] / 2**20}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    print(json.dumps(out), flush=True)

import asyncio, ssl, prometheus_client, apscheduler.schedulers.background, pynvml  # what stays
before = set(sys.modules)
status("without pydantic")
import agent.config
settings = agent.config.load(sys.argv[1])
status("configuration validated (pydantic, pydantic-settings, the config models)")
del settings
dropped = [sys.modules.pop(name) for name in list(sys.modules) if name not in before]
status(f"{len(dropped)} modules dropped from sys.modules")
for module in dropped:
    module.__dict__.clear()
status("and their namespaces cleared")
ctypes.CDLL("libc.so.6").malloc_trim(0)
status("and malloc_trim(0)")
"""


def env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GPUCOST_"))},
            "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), str(ROOT)]), "FAKE_NVML_GPUS": "8"}


def probe(modules: list[str], validate: bool) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(modules), "1" if validate else "0", str(CONFIG)],
                       env=env(), capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def breakdown() -> None:
    print("| step (cumulative) | + RSS (MiB) | + anon | + file | RSS (MiB) | modules |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    modules: list[str] = []
    prev = None
    rows = [(name, mods, False) for name, mods in STEPS] + [("configuration validated, ledger built", [], True)]
    for name, mods, validate in rows:
        modules += mods
        m = probe(modules, validate)
        if prev is None:
            print(f"| {name} | | | | {m['VmRSS']:.1f} (anon {m['RssAnon']:.1f}, file {m['RssFile']:.1f}) "
                  f"| {m['modules']} |")
        else:
            print(f"| {name} | +{m['VmRSS'] - prev['VmRSS']:.1f} | +{m['RssAnon'] - prev['RssAnon']:.1f} "
                  f"| +{m['RssFile'] - prev['RssFile']:.1f} | {m['VmRSS']:.1f} | {m['modules']} |")
        prev = m


def shed() -> None:
    """RSS from a run without tracemalloc (it costs memory of its own), the heap from a run with it."""
    runs = [subprocess.run([sys.executable, "-c", SHED, str(CONFIG), flag], env=env(), capture_output=True,
                           text=True, check=True).stdout.splitlines() for flag in ("0", "1")]
    print("| step | RSS (MiB) | anon | file | traced Python heap (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for plain, traced in zip(*runs):
        m, t = json.loads(plain), json.loads(traced)
        print(f"| {m['step']} | {m['VmRSS']:.1f} | {m['RssAnon']:.1f} | {m['RssFile']:.1f} | {t['heap']:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shed", action="store_true", help="also measure dropping pydantic after validation")
    args = ap.parse_args()
    print(f"Python {sys.version.split()[0]}, fake NVML from {FAKE_DIR.relative_to(ROOT)}")
    print()
    breakdown()
    if args.shed:
        print()
        shed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
