"""Issue 15, item 8: traces are read with bounded memory. Before, `replay` and `check-config
--trace` held the whole file: a 1 MB gzip of 1 GB of zeros took 2.1 GB RSS, a 2 GiB line 4.3 GB.
Now each is refused with one line, and the process's peak RSS stays under 100 MB."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from agentproc import ROOT

from agent.trace import MAX_LINE_BYTES, TraceError, load


def zeros_bomb(path, gib: float = 1.0) -> None:
    """A gzip of ``gib`` GiB of zeros (one endless line), written a chunk at a time."""
    chunk = b"\0" * (1 << 24)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        for _ in range(int(gib * 64)):
            fh.write(chunk)


def long_line(path, size: int) -> None:
    header = {"format": "gpu-cost-agent-trace", "version": 1, "gpus": [{"index": 0, "uuid": "GPU-x"}]}
    with open(path, "wb") as fh:
        fh.write(json.dumps(header).encode() + b"\n")
        fh.write(b'{"t": 1, "pad": "')
        block = b"x" * (1 << 24)
        for _ in range(size // len(block)):
            fh.write(block)
        fh.write(b'"}\n')


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the agent's CLI in a child."""
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.jsonl.gz"
    zeros_bomb(path)
    return path


@pytest.fixture(scope="module")
def huge_line(tmp_path_factory):
    path = tmp_path_factory.mktemp("line") / "line.jsonl"
    long_line(path, 2 << 30)  # 2 GiB of one line (sparse writes are not possible: it is written)
    yield path
    path.unlink()


@pytest.mark.parametrize("command", [["check-config", "deploy/config.flat.toml", "--trace"], ["replay"]])
@pytest.mark.parametrize("which", ["bomb", "huge_line"])
def test_a_gzip_bomb_and_a_2_gib_line_are_refused_in_one_line_under_100_mb(request, command, which):
    path = request.getfixturevalue(which)
    args = [*command, str(path)] + (["--listen", "127.0.0.1:0"] if command == ["replay"] else [])
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"longer than {MAX_LINE_BYTES} bytes" in lines[0], lines[0]


def test_peak_memory_of_a_refusal_stays_under_100_mb(bomb, huge_line):
    """Measured in a fresh interpreter each: its VmHWM, the peak of its own address space (not
    ru_maxrss, which keeps the peak of the forked copy of this test process across exec)."""
    code = ("import re, sys\nfrom agent.trace import load, TraceError\n"
            "try:\n    load(sys.argv[1])\nexcept TraceError as e:\n    print(e)\n"
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    for path in (bomb, huge_line):
        out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        message, peak_kib = out.stdout.strip().splitlines()
        print(f"\n{path.name}: {message} (peak RSS {int(peak_kib) / 1024:.1f} MiB)")
        assert int(peak_kib) / 1024 < 100, (path, peak_kib)


def test_rows_only_for_the_headers_gpus(tmp_path):
    header = {"format": "gpu-cost-agent-trace", "version": 1, "gpus": [{"index": 0, "uuid": "GPU-x"}]}
    path = tmp_path / "t.jsonl"
    rows = [{"t": 0, "gpus": {"0": {}}}, {"t": 1, "gpus": {"7": {}}}]
    path.write_text("\n".join(json.dumps(x) for x in [header, *rows]) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:3: GPU '7' is not in the header"):
        load(path)
