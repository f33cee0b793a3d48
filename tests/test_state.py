"""Bad state files, failed persists and poisoned slices: the agent starts, serves and never
serves or saves a non-finite or negative total."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import time

import pytest
from agentproc import AgentProcess, value
from fakes import FakeGpu, FakeSource, make_sampler

from agent.accounting import Ledger
from agent.cost import CostModel, DemandTracker, PueConfig, TariffConfig
from agent.energy import EnergySlice
from agent.exporter import make_registry
from agent.state import StateStore

T = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
UUID = "GPU-d9a96f9e-f458-7f0a-44e5-804222e7f75f"  # the bundled trace's GPU
TARIFF = TariffConfig(currency="EUR", flat_price_per_kwh=0.30, demand_charge_per_kw_month=10.0)


def ledger() -> Ledger:
    return Ledger(cost=CostModel(TARIFF, PueConfig(value=1.2)), demand=DemandTracker.from_tariff(TARIFF),
                  gpu_uuids={0: UUID})


def good_state() -> dict:
    """What a ledger that counted 3.6 MJ (1 kWh) on the GPU and 0.36 MJ on the host persists."""
    led = ledger()
    led.add([EnergySlice(0, T, T + 3600, 3.6e6, "counter", 0.9)])
    led.add_host("cpu", "model", T, T + 3600, 3.6e5)
    return {**led.state(), "saved_at": T + 3600}


def test_a_good_state_round_trips():
    led = ledger()
    led.load_state(json.loads(json.dumps(good_state())))
    assert led.gpu_energy[(UUID, "counter")] == 3.6e6
    assert led.energy_cost[(f"gpu:{UUID}", "EUR")] == pytest.approx(1.2 * 0.30)
    assert led.demand.peak_w == pytest.approx((3.6e6 + 3.6e5) * 1.2 / 3600)
    assert led.periods == {"day": "2027-01-15", "month": "2027-01"}
    assert led.state() == {k: v for k, v in good_state().items() if k != "saved_at"}
    older = {k: v for k, v in good_state().items() if k != "periods"}  # saved before periods existed
    led = ledger()
    led.load_state(older)
    assert led.gpu_energy[(UUID, "counter")] == 3.6e6 and led.periods == {}


def _set(path: str, v):
    """A copy of good_state() with the value at ``path`` (keys and indices, dotted) replaced."""
    state = json.loads(json.dumps(good_state()))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = state
    for p in parents:
        node = node[p]
    node[last] = v
    return state


BAD_CONTENT = [
    (_set("gpu_energy_joules", {"a": 1}), "gpu_energy_joules: expected a list, got an object"),
    (_set("it_energy_joules", []), "it_energy_joules: expected an object, got a list"),
    (_set("demand", "x"), "demand: expected an object or null, got a string"),
    (_set("gpu_energy_joules.0.2", math.nan), "gpu_energy_joules[0][2]: nan is not a finite number"),
    (_set("gpu_energy_joules.0.2", math.inf), "gpu_energy_joules[0][2]: inf is not a finite number"),
    (_set("gpu_energy_joules.0.2", 10**400), "gpu_energy_joules[0][2]: inf is not a finite number"),
    (_set("gpu_energy_joules.0.2", -5.0), "gpu_energy_joules[0][2]: -5 is negative"),
    (_set("gpu_energy_joules.0.2", 1e300), "gpu_energy_joules[0][2]: 1e+300 is beyond the sanity bound 1e+15"),
    (_set("gpu_energy_joules.0.2", "12"), "gpu_energy_joules[0][2]: expected a number, got a string"),
    (_set("gpu_energy_joules.0.2", True), "gpu_energy_joules[0][2]: expected a number, got a boolean"),
    (_set("gpu_energy_joules.0", [UUID, "counter"]), "gpu_energy_joules[0]: expected [name, name, number]"),
    (_set("gpu_energy_joules.0.0", 7), "gpu_energy_joules[0][0]: expected a name"),
    (_set("energy_cost.0.2", -0.1), "energy_cost[0][2]: -0.1 is negative"),
    (_set("emissions_grams", {"host": math.nan}), "emissions_grams['host']: nan is not a finite number"),
    (_set("demand.peak_w", math.nan), "demand.peak_w: nan is not a finite number"),
    (_set("demand.windows.0", [T]), "demand.windows[0]: expected [start, joules]"),
    (_set("demand.month", 202701), "demand.month: expected 'YYYY-MM' or null"),
    (_set("periods.cost.0.3", math.nan), "periods.cost[0][3]: nan is not a finite number"),
    (_set("periods.keys.day", 20270115), "periods.keys['day']: expected a day, got 20270115"),
    (_set("periods", []), "periods: expected an object with 'keys' and 'cost'"),
    (_set("version", True), "state version True is not 1"),
    (_set("saved_at", -1), "saved_at: -1 is negative"),
    ({k: v for k, v in good_state().items() if k != "idle_cost"}, "idle_cost: missing"),
    ([1, 2], "expected a JSON object, got a list"),
]


@pytest.mark.parametrize("state, message", BAD_CONTENT, ids=[m.split(":")[0] for _, m in BAD_CONTENT])
def test_a_bad_value_anywhere_rejects_the_whole_state_and_leaves_the_ledger_as_it_was(state, message):
    led = ledger()
    led.add([EnergySlice(0, T, T + 10, 1000.0, "counter", 0.5)])
    before = led.state()
    peak = led.demand.peak_w
    with pytest.raises(ValueError) as exc:
        led.load_state(state)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
    assert led.state() == before and led.demand.peak_w == peak  # nothing half-loaded


def test_half_valid_state_loads_nothing():
    """Good energy, malformed cost: neither is taken (the half that parsed is not kept)."""
    led = ledger()
    with pytest.raises(ValueError, match=r"^energy_cost\[0\]\[2\]"):
        led.load_state(_set("energy_cost.0.2", "0.36 EUR"))
    assert sum(led.gpu_energy.values()) == 0 and sum(led.it_energy.values()) == 0 and led.demand.peak_w == 0


def test_unreadable_files_are_set_aside_under_unique_names(tmp_path, caplog):
    store = StateStore(tmp_path)
    contents = [b'\xff\xfe{"version": 1}', b"[" * 100_000 + b"]" * 100_000, b'{"version": 1, "gpu_energy']
    reasons = ["not UTF-8: byte 0xff at offset 0", "JSON nested too deep", "line 1: Unterminated string"]
    with caplog.at_level(logging.ERROR, logger="agent.state"):
        for content in contents:
            store.path.write_bytes(content)
            assert store.load() is None
    assert not store.path.exists()
    aside = sorted(tmp_path.glob("state.json.corrupt-*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(aside) == 3 and {p.read_bytes() for p in aside} == set(contents)  # none overwritten
    assert len(caplog.records) == 3
    for record, reason in zip(caplog.records, reasons):
        assert reason in record.getMessage() and "totals start from zero" in record.getMessage()


def test_leftover_temp_files_are_removed_but_not_a_live_writers(tmp_path):
    store = StateStore(tmp_path)
    dead = tmp_path / ".state.json.999999999.tmp"  # above pid_max: its writer is gone
    dead.write_text('{"version": 1, "gpu_')
    old = tmp_path / ".state.json.1.tmp"  # pid 1 lives, but an hour-old temp file is a leftover all the same
    old.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / f".state.json.{os.getppid()}.tmp"  # fresh, and its writer (our parent) is alive
    live.write_text("{")
    other = tmp_path / "state.json.tmp"  # not a name the store writes
    other.write_text("{")
    assert sorted(p.name for p in store.remove_stale_temp_files()) == sorted([dead.name, old.name])
    assert live.exists() and other.exists()


def test_a_nan_or_negative_slice_never_reaches_the_totals():
    """Defence in depth: a source gone wrong (NaN power) is counted, not added."""
    watts = {"w": 300.0}
    src = FakeSource([FakeGpu(lambda t: watts["w"], counter=False, samples=False)], t0=T)
    s = make_sampler(src, energy_method="polled")
    src.t += 1
    s.tick()
    good = s.ledger.gpu_energy[("GPU-fake-0", "polled")]
    assert good == pytest.approx(300.0)
    for w in (math.nan, -300.0, math.inf):
        watts["w"] = w
        src.t += 1
        s.tick()
    s.ledger.add_host("cpu", "model", T, T + 1, math.nan)
    s.ledger.add_other(T, T + 1, -1.0)
    s.ledger.add([EnergySlice(0, T, math.nan, 5.0, "counter", 0.5)])
    assert s.ledger.gpu_energy[("GPU-fake-0", "polled")] == good
    assert all(math.isfinite(v) and v >= 0 for v in s.ledger.it_energy.values())
    assert s.errors["invalid_energy"] >= 6
    s.tick()
    reg = make_registry(lambda: s.snapshot, process_metrics=False)
    assert reg.get_sample_value("gpucost_agent_errors_total", {"kind": "invalid_energy"}) == s.errors["invalid_energy"]
    json.dumps(s.state(), allow_nan=False)  # what would be persisted is clean


# -- the real process ------------------------------------------------------------------------

CORRUPT_FILES = {
    "non-utf8": (b'\xff\xfe{"version": 1}', "not UTF-8"),
    "list": (b"[]", "not a JSON object"),
    "list-for-map": (json.dumps(_set("facility_energy_joules", [])).encode(), "facility_energy_joules: expected"),
    "demand-x": (json.dumps(_set("demand", "x")).encode(), "demand: expected an object or null"),
    "deep": (b'{"version": 1, "demand": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep"),
    "nan": (json.dumps(_set("gpu_energy_joules.0.2", math.nan)).encode(), "nan is not a finite number"),
    "1e999": (json.dumps(_set("energy_cost.0.2", 12345.5)).replace("12345.5", "1e999").encode(),
              "energy_cost[0][2]: inf is not a finite number"),
    "negative": (json.dumps(_set("it_energy_joules.host", -4.0e5)).encode(), "-400000 is negative"),
    "half-valid": (json.dumps(_set("energy_cost.0.2", "0.36 EUR")).encode(), "energy_cost[0][2]: expected a number"),
}


def test_corrupt_state_files_against_the_real_process(tmp_path):
    """Each file: one log line naming the problem, the file kept aside byte for byte, the agent
    serves from zero (never NaN, +Inf or negative), and its own good state is written on stop."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\npersist_interval_seconds = 3600\n[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n')
    agents = {}
    for name, (content, _) in CORRUPT_FILES.items():
        d = tmp_path / name
        d.mkdir()
        (d / "state.json").write_bytes(content)
        (d / ".state.json.999999999.tmp").write_text("{")  # an interrupted write
        agents[name] = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "20", "--config", str(cfg),
                                    "--state-dir", str(d))
    try:
        for name, agent in agents.items():
            agent.wait_ready()
            time.sleep(0.2)
        for name, agent in agents.items():
            m = agent.metrics()
            energy = value(m, "gpucost_gpu_energy_joules_total", gpu="0", source="counter") or 0.0
            cost = value(m, "gpucost_energy_cost_total", component="gpu", gpu="0", uuid=UUID, currency="EUR") or 0.0
            assert 0 <= energy < 3.6e6 and 0 <= cost < 0.36, name  # from zero, not from the file
            for family in m.values():
                for sample in family:
                    assert math.isfinite(sample.value) and sample.value >= 0, (name, sample)
    finally:
        rcs = {name: agent.stop() for name, agent in agents.items()}
    for name, (content, reason) in CORRUPT_FILES.items():
        d, out = tmp_path / name, agents[name].output
        assert rcs[name] == 0, (name, out)
        lines = [line for line in out.splitlines() if "state file" in line]
        assert len(lines) == 1 and "is unusable" in lines[0] and reason in lines[0], (name, lines)
        assert "Traceback" not in out, name
        aside = list(d.glob("state.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == content, name
        assert not (d / ".state.json.999999999.tmp").exists(), name
        saved = json.loads((d / "state.json").read_text())  # a fresh, valid state
        ledger().load_state(saved)
        assert sum(v for u, _, v in saved["gpu_energy_joules"] if u == UUID) > 0, name


def test_failed_persist_shows_in_healthz_and_a_failed_final_save_exits_1(tmp_path):
    """A directory where the temp file goes makes every write fail (root or not)."""
    state_dir = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\npersist_interval_seconds = 0.5\n")
    agent = AgentProcess("demo", "--speed", "5", "--config", str(cfg), "--state-dir", str(state_dir))
    try:
        agent.wait_ready()
        blocker = state_dir / f".state.json.{agent.proc.pid}.tmp"
        deadline = time.monotonic() + 10
        while not (state_dir / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.health()["status"] == "ok"
        good = json.loads((state_dir / "state.json").read_text())
        blocker.mkdir()
        health = _wait_for(agent, lambda h: h["status"] == "degraded")
        assert "could not write state file" in health["state_error"] and "Is a directory" in health["state_error"]
        assert agent.get("/healthz")[0] == 200  # degraded, still serving
        time.sleep(0.5)  # the next tick's snapshot carries the count
        assert value(agent.metrics(), "gpucost_agent_errors_total", kind="state_write") >= 1
        blocker.rmdir()
        health = _wait_for(agent, lambda h: h["status"] == "ok")
        assert "state_error" not in health
        blocker.mkdir()
        _wait_for(agent, lambda h: h["status"] == "degraded")
        last_good = json.loads((state_dir / "state.json").read_text())
    finally:
        rc = agent.stop(signal.SIGTERM)
    assert rc == 1
    last = agent.output.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu-cost-agent: the final save failed, totals since the last good save are lost: "
                        r"could not write state file .*state\.json: .*Is a directory.*", last), last
    # What was persisted before is still there, untouched by the failed saves.
    assert json.loads((state_dir / "state.json").read_text()) == last_good
    assert last_good["saved_at"] > good["saved_at"]


def _wait_for(agent: AgentProcess, ok, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = agent.health()
        if ok(health):
            return health
        time.sleep(0.1)
    raise AssertionError(f"/healthz never got there: {agent.health()}")


def test_counter_marks_only_from_this_boot_and_malformed_ones_refused(monkeypatch):
    """``gpu_counters`` (the counter readings the totals end at) bridge a restart only on the boot
    that wrote them; a malformed entry is refused like any bad value (the whole state set aside)."""
    from agent import sampler

    monkeypatch.setattr(sampler, "boot_id", lambda: "boot-a")
    good = {"gpu_counters": {"boot_id": "boot-a", "readings": [["GPU-1", 50_000_000, 1234.5]]}}
    assert sampler.counter_marks(good) == {"GPU-1": (50_000_000, 1234.5, 0.0)}  # saved before the 4th field
    counted = {"gpu_counters": {"boot_id": "boot-a", "readings": [["GPU-1", 50_000_000, 1234.5, 900.0]]}}
    assert sampler.counter_marks(counted) == {"GPU-1": (50_000_000, 1234.5, 900.0)}
    assert sampler.counter_marks({**good, "gpu_counters": {**good["gpu_counters"], "boot_id": "boot-b"}}) == {}
    assert sampler.counter_marks({}) == {}  # states saved before this existed
    for bad in ([["GPU-1", -1, 1.0]], [["GPU-1", 1.5, 1.0]], [["GPU-1", 1, float("nan")]], [["", 1, 1.0]], "x",
                [["GPU-1", 1, 1.0, -3.0]], [["GPU-1", 1, 1.0, 0.0, 0.0]]):
        with pytest.raises(ValueError, match="gpu_counters"):
            sampler.counter_marks({"gpu_counters": {"boot_id": "boot-a", "readings": bad}})
    assert sampler.resume_mono({"gpu_counters": {"boot_id": "boot-a", "readings": [], "mono": 99.5}}) == 99.5
    assert sampler.resume_mono({"gpu_counters": {"boot_id": "boot-b", "readings": [], "mono": 99.5}}) is None
    with pytest.raises(ValueError, match="gpu_counters.mono"):
        sampler.resume_mono({"gpu_counters": {"boot_id": "boot-a", "readings": [], "mono": -1}})


def test_host_counters_are_saved_for_rapl_only_and_resumed_from_this_boot(monkeypatch, tmp_path):
    """The state holds the host's RAPL counters (``host_counters``) beside the GPUs'; a modelled
    host writes none (nothing to bridge with); a malformed entry is refused like any bad value."""
    import shutil
    from pathlib import Path

    from agent import sampler
    from agent.sources.host import HostConfig, HostPowerSource, RaplMark

    monkeypatch.setattr(sampler, "boot_id", lambda: "boot-a")
    root = tmp_path / "powercap"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "powercap" / "one_socket", root)
    host = {"rapl": HostPowerSource(HostConfig(mode="rapl", powercap_root=root)),
            "model": HostPowerSource(HostConfig(mode="model"))}
    saved = {}
    for mode, source in host.items():
        src = FakeSource([FakeGpu(lambda t: 300.0)], t0=T)
        s = make_sampler(src, host=source)
        saved[mode] = s.state()
    assert "host_counters" not in saved["model"]
    mark = saved["rapl"]["host_counters"]
    assert mark["boot_id"] == "boot-a" and mark["zones"] == [["intel-rapl:0", 48_213_177_625, 262_143_328_850]]
    assert sampler.resume_point(saved["rapl"])[2] == RaplMark({"intel-rapl:0": (48_213_177_625, 262_143_328_850)},
                                                              mark["mono"])
    assert sampler.resume_point(saved["model"])[2] is None
    monkeypatch.setattr(sampler, "boot_id", lambda: "boot-b")  # rebooted: the counters restarted
    assert sampler.resume_point(saved["rapl"]) == ({}, None, None)
    with pytest.raises(ValueError, match=r"host_counters.zones\[0\]"):
        sampler.resume_point({**saved["rapl"], "host_counters": {**mark, "zones": [["intel-rapl:0", -5, 1]]}})


# -- the state directory's entries are untrusted (issue 15, item 9) ---------------------------


def test_a_link_planted_as_the_temporary_file_is_removed_never_followed(tmp_path):
    """Before: the root agent wrote its state through a planted `.state.json.<pid>.tmp` link into
    the link's target, and state.json became that link."""
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    store = StateStore(tmp_path / "state")
    store.check_writable()
    planted = store.path.with_name(f".state.json.{os.getpid()}.tmp")
    os.symlink(target, planted)
    store.save({"version": 1})
    assert target.read_text() == "precious"
    assert store.path.is_file() and not store.path.is_symlink()
    assert json.loads(store.path.read_text())["version"] == 1


@pytest.mark.parametrize("kind", ["symlink", "fifo", "large"])
def test_a_state_file_that_is_no_regular_file_of_ours_is_set_aside_without_blocking(tmp_path, caplog, kind):
    store = StateStore(tmp_path)
    if kind == "symlink":
        real = tmp_path / "real.json"
        real.write_text('{"version": 1}')
        os.symlink(real, store.path)
        why = "a symbolic link"
    elif kind == "fifo":
        os.mkfifo(store.path)  # before: the start blocked on it for good, with no log line
        why = "not a regular file"
    else:
        from agent.state import MAX_STATE_BYTES

        with open(store.path, "w") as fh:  # a 40 MB state of made-up rows took 386 MiB to load
            fh.write('{"version": 1, "pad": "' + "x" * (MAX_STATE_BYTES + 10) + '"}')
        why = "beyond the"
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="agent.state"):
        assert store.load() is None
    assert time.monotonic() - started < 2.0
    assert why in caplog.text and len(caplog.records) == 1
    assert not os.path.lexists(store.path) and list(tmp_path.glob("state.json.corrupt-*"))
    if kind == "symlink":
        assert (tmp_path / "real.json").read_text() == '{"version": 1}'  # the target is untouched


def test_a_fifo_as_the_state_file_does_not_hang_the_real_process(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.mkfifo(state_dir / "state.json")
    agent = AgentProcess("replay", "fixtures/h100_trace_a.jsonl", "--speed", "50", "--state-dir", str(state_dir))
    try:
        agent.wait_ready(timeout=15)
        assert value(agent.metrics(), "gpucost_agent_ticks_total") is not None
    finally:
        assert agent.stop() == 0
    assert "not a regular file" in agent.output
    assert (state_dir / "state.json").is_file()  # a good state written in its place


# -- scrape-time saves: unsynced, in a file of their own -----------------------------------


def test_unsynced_saves_go_to_the_recent_file_and_a_synced_save_removes_it(tmp_path):
    store = StateStore(tmp_path)
    store.check_writable()
    store.save({"version": 1, "n": 1})
    store.save({"version": 1, "n": 2}, sync=False)
    assert json.loads((tmp_path / "state.json").read_text())["n"] == 1  # the synced file untouched
    assert json.loads((tmp_path / "state-recent.json").read_text())["n"] == 2
    assert store.load()["n"] == 2 and store.loaded_path == tmp_path / "state-recent.json"
    store.save({"version": 1, "n": 3})
    assert not (tmp_path / "state-recent.json").exists()
    assert store.load()["n"] == 3 and store.loaded_path == tmp_path / "state.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left


@pytest.mark.parametrize("torn", [b"", b'{"version": 1, "gpu_energy', b"\0" * 4096],
                         ids=["empty", "truncated", "zeros"])
def test_a_recent_file_torn_by_a_power_cut_falls_back_to_the_synced_state(tmp_path, caplog, torn):
    """What a power cut can leave of a file written without fsync: the synced state is used."""
    store = StateStore(tmp_path)
    store.check_writable()
    store.save({"version": 1, "n": 1})
    (tmp_path / "state-recent.json").write_bytes(torn)
    with caplog.at_level(logging.ERROR):
        assert store.load() == {"version": 1, "n": 1, "saved_at": pytest.approx(time.time(), abs=60)}
    assert store.loaded_path == tmp_path / "state.json"
    assert "state-recent.json is unusable" in caplog.text and "the last synced state is used" in caplog.text
    assert list(tmp_path.glob("state-recent.json.corrupt-*")) and not (tmp_path / "state-recent.json").exists()


def test_a_recent_file_the_ledger_refuses_falls_back_to_the_synced_totals_in_the_real_process(tmp_path):
    """kill -9 after a scrape-time save, then the recent file damaged in a way only the ledger
    sees (a negative total): the next start takes the synced state's totals, not zero."""
    state_dir = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\npersist_interval_seconds = 2\n[tariff]\ncurrency = "EUR"\nflat_price_per_kwh = 0.30\n')
    args = ("replay", "fixtures/h100_trace_a.jsonl", "--speed", "5", "--config", str(cfg), "--state-dir", str(state_dir))
    first = AgentProcess(*args)
    first.wait_ready()
    time.sleep(5)  # synced saves at 2 and 4 s; the counter (every 15 s of trace, 3 s here) read by then
    served = value(first.metrics(), "gpucost_gpu_energy_joules_total", gpu="0", source="counter")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    synced = json.loads((state_dir / "state.json").read_text())  # the periodic save
    assert sum(v for u, _, v in synced["gpu_energy_joules"] if u == UUID) > 0
    recent = json.loads((state_dir / "state-recent.json").read_text())  # the save the scrape made
    assert sum(v for u, _, v in recent["gpu_energy_joules"] if u == UUID) == pytest.approx(served)
    recent["gpu_energy_joules"][0][2] = -1.0
    (state_dir / "state-recent.json").write_text(json.dumps(recent))
    again = AgentProcess(*args)
    try:
        again.wait_ready()
        m = again.metrics()
    finally:
        assert again.stop() == 0
    assert value(m, "gpucost_gpu_energy_joules_total", gpu="0", source="counter") >= sum(
        v for u, _, v in synced["gpu_energy_joules"] if u == UUID)
    lines = [line for line in again.output.splitlines() if "state file" in line]
    assert len(lines) == 1 and "state-recent.json is unusable" in lines[0] and "last synced state" in lines[0], lines
    assert "totals continue from" in again.output and str(state_dir / "state.json") in again.output
