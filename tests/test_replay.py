"""The replay source answers like NVML would, and trace files fail loudly and precisely."""

from __future__ import annotations

import json

import pytest

from agent.sources.gpu import GpuNotSupported
from agent.sources.replay import ReplaySource
from agent.trace import FORMAT, TraceError, load, write

from helpers import H100_TRACE


def small_trace(tmp_path, rows, gpus=None):
    header = {"gpus": gpus or [{"index": 0, "uuid": "GPU-x", "name": "Test GPU"}]}
    path = tmp_path / "t.jsonl"
    write(path, header, rows)
    return load(path)


def test_fixture_is_the_real_h100_readings(h100_trace):
    g = h100_trace.gpus[0]
    assert g["name"] == "NVIDIA H100 80GB HBM3"
    assert g["uuid"] == "GPU-d9a96f9e-f458-7f0a-44e5-804222e7f75f"
    assert len(h100_trace.rows) == 1985
    assert h100_trace.end - h100_trace.start == pytest.approx(99.2, abs=0.01)


def test_answers_with_latest_row_not_after_now(h100_trace):
    src = ReplaySource(h100_trace)
    row = h100_trace.rows[400]
    src.seek(float(row["t"]) + 1e-6)
    r = src.read(0)
    assert r.power_watts == row["gpus"]["0"]["power_mw"] / 1000
    assert r.utilization_gpu_ratio == row["gpus"]["0"]["util_gpu_pct"] / 100
    assert r.sm_clock_hertz == row["gpus"]["0"]["sm_clock_mhz"] * 1e6
    assert src.energy_mj(0) == row["gpus"]["0"]["energy_mj"]


def test_unrecorded_field_is_unsupported_and_null_is_a_failure(tmp_path):
    rows = [
        {"t": 100.0, "gpus": {"0": {"power_mw": 100000, "temp_c": 40}}},
        {"t": 101.0, "gpus": {"0": {"power_mw": 100000, "temp_c": None}}},
    ]
    src = ReplaySource(small_trace(tmp_path, rows))
    r = src.read(0)
    assert r.temperature_celsius == 40 and r.utilization_gpu_ratio is None and r.failed == ()
    with pytest.raises(GpuNotSupported):
        src.energy_mj(0)
    with pytest.raises(GpuNotSupported):
        src.power_samples(0, 0)
    src.seek(101.0)
    r = src.read(0)
    assert r.temperature_celsius is None and r.failed == ("temp_c",)


def test_hidden_counter_is_unsupported(h100_trace):
    src = ReplaySource(h100_trace, hide=["energy_mj"])
    with pytest.raises(GpuNotSupported):
        src.energy_mj(0)
    assert src.power_samples(0, 0)  # the buffer is still there


def test_ring_buffer_only_holds_its_depth(h100_trace):
    src = ReplaySource(h100_trace, buffer_seconds=2.4)
    src.seek(h100_trace.start + 30.0)
    samples = src.power_samples(0, 0)
    span = (samples[-1][0] - samples[0][0]) / 1e6
    assert 2.0 < span <= 2.4
    newer = src.power_samples(0, samples[-5][0])
    assert newer == samples[-4:]


def test_loop_keeps_time_and_counter_going_forward(h100_trace):
    src = ReplaySource(h100_trace, loop=True)
    e_end_first = None
    prev = src.energy_mj(0)
    t = src.t
    while src.loops < 2:
        t += 0.5
        src.seek(t)
        e = src.energy_mj(0)
        assert e >= prev, "a loop must not look like a counter reset"
        prev = e
        if src.loops == 1 and e_end_first is None:
            e_end_first = e
    assert src.position_seconds < 1.0
    assert not src.finished


def test_single_replay_finishes_at_the_end(h100_trace):
    src = ReplaySource(h100_trace)
    src.seek(h100_trace.end + 50)
    assert src.finished and src.t == h100_trace.end
    with pytest.raises(ValueError):
        src.seek(h100_trace.start)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"format": "something-else", "version": 1, "gpus": []}'], "not a gpu-cost-agent-trace file"),
        ([json.dumps({"format": FORMAT, "version": 99, "gpus": []})], "version 99 is not supported"),
        ([json.dumps({"format": FORMAT, "version": 1, "gpus": []}), '{"t": 1, "gpus": {}}', "{not json"],
         ":3: not valid JSON"),
        ([json.dumps({"format": FORMAT, "version": 1, "gpus": []}), '{"t": 5, "gpus": {}}', '{"t": 4, "gpus": {}}'],
         ":3: 't' goes backwards"),
        ([json.dumps({"format": FORMAT, "version": 1, "gpus": []}), '{"gpus": {}}'], ":2: row has no numeric 't'"),
        ([], "empty trace"),
    ],
)
def test_corrupt_trace_names_the_line(tmp_path, lines, message):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as exc:
        load(p)
    assert message in str(exc.value)
    assert str(p) in str(exc.value)


def test_gzip_trace_roundtrip(tmp_path, h100_trace):
    p = tmp_path / "t.jsonl.gz"
    write(p, {k: v for k, v in h100_trace.header.items() if k not in ("format", "version")}, h100_trace.rows[:50])
    again = load(p)
    assert again.rows == h100_trace.rows[:50]
    assert H100_TRACE.stat().st_size > p.stat().st_size * 5


def test_trace_c_is_the_real_two_process_recording(h100_trace_c):
    rows = h100_trace_c.rows
    assert len(rows) == 291
    assert h100_trace_c.end - h100_trace_c.start == pytest.approx(29.0, abs=0.01)
    samples = sorted(s for r in rows for s in r["gpus"]["0"].get("samples", ()))
    assert len(samples) == 1449  # the driver's own buffer, 20 ms apart, read about once a second
    spacing = [(b[0] - a[0]) / 1e6 for a, b in zip(samples, samples[1:])]
    assert max(spacing) < 0.05
    # No process listed until 8.5 s, then A (PID 402), then A and B (PID 428).
    pids = [sorted(p[0] for p in r["gpus"]["0"]["processes"]) for r in rows]
    assert pids[0] == [] and pids[100] == [402] and pids[-1] == [402, 428]
    assert rows[-1]["gpus"]["0"]["processes"] == [[402, 916455424], [428, 715128832]]
    util = [u for r in rows for u in r["gpus"]["0"]["process_utilization"]]
    assert {u[0] for u in util} == {402, 428} and all(len(u) == 4 for u in util)


def test_advance_stops_on_the_way_and_never_past_the_end(h100_trace_c):
    src = ReplaySource(h100_trace_c)
    stops = []
    src.advance(5.0, every=1.0, on_step=lambda: stops.append(round(src.t - src.start, 6)))
    assert stops == [1.0, 2.0, 3.0, 4.0] and src.t - src.start == pytest.approx(5.0)
    src.seek(src.end - 2.5)
    stops.clear()
    src.advance(5.0, every=1.0, on_step=lambda: stops.append(round(src.end - src.t, 6)))
    assert stops == [1.5, 0.5] and src.finished
    src2 = ReplaySource(h100_trace_c)
    src2.advance(5.0)
    assert src2.t - src2.start == pytest.approx(5.0)


def test_process_reads_replay_as_recorded_honouring_last_seen(h100_trace_c, h100_trace):
    src = ReplaySource(h100_trace_c)
    assert src.processes(0) == [] and src.process_utilization(0, 0) == []
    got, seen = [], 0
    while not src.finished:
        src.seek(src.t + 0.5)
        new = src.process_utilization(0, seen)
        assert all(u[1] > seen for u in new)
        if new:
            seen = new[-1][1]
        got.extend(new)
        if src.t - src.start < 8.4:
            assert src.processes(0) == []
    recorded = [tuple(u) for r in h100_trace_c.rows for u in r["gpus"]["0"]["process_utilization"]]
    assert got == sorted(recorded, key=lambda u: u[1])  # every sample once, none before it was read
    assert src.processes(0) == [(402, 916455424), (428, 715128832)]
    bare = ReplaySource(h100_trace)  # trace_a recorded no process reads
    with pytest.raises(GpuNotSupported):
        bare.process_utilization(0, 0)
    with pytest.raises(GpuNotSupported):
        bare.processes(0)
