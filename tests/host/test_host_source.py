"""HostPowerSource: mode choice, the utilisation model, RAPL components, serialisation."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from agent.sources.host import (
    DEFAULT_CPU_IDLE_WATTS_PER_CPU,
    DEFAULT_CPU_MAX_WATTS_PER_CPU,
    DEFAULT_MEMORY_WATTS_PER_GIB,
    GIB,
    CpuUtilMeter,
    HostComponent,
    HostConfig,
    HostPowerSource,
    HostSample,
)
from agent.sources.rapl import RaplUnavailable

MEM = SimpleNamespace(total=16 * GIB, available=6 * GIB)


def make(cfg: HostConfig | None = None, *, util_pct: float | list[float] = 0.0, root: Path | None = None, **kw):
    """A source with 8 CPUs, 16 GiB, and a scripted utilisation (percent)."""
    script = list(util_pct) if isinstance(util_pct, list) else None

    def cpu_percent() -> float:
        return script.pop(0) if script is not None else util_pct  # type: ignore[return-value]

    return HostPowerSource(
        cfg or HostConfig(),
        powercap_root=root if root is not None else Path("/nonexistent/powercap"),
        cpu_percent=cpu_percent,
        virtual_memory=lambda: MEM,
        cpu_count=8,
        **kw,
    )


def by_name(sample: HostSample) -> dict[str, HostComponent]:
    return {c.component if c.socket is None else f"{c.component}{c.socket}": c for c in sample.components}


# -- the model ----------------------------------------------------------------


def test_default_figures():
    assert DEFAULT_CPU_IDLE_WATTS_PER_CPU == 0.75
    assert DEFAULT_CPU_MAX_WATTS_PER_CPU == 3.5
    assert DEFAULT_MEMORY_WATTS_PER_GIB == 0.375
    src = make()
    # 8 CPUs: idle 8 × 0.75 = 6 W, max 8 × 3.5 = 28 W
    assert (src.cpu_idle_watts, src.cpu_max_watts) == (6.0, 28.0)


@pytest.mark.parametrize(
    "util_pct, cpu_watts, cpu_joules",
    [
        (0.0, 6.0, 12.0),  # idle: 6 W; × 2 s = 12 J
        (50.0, 17.0, 34.0),  # half: 6 + (28 - 6) × 0.5 = 17 W; × 2 s = 34 J
        (100.0, 28.0, 56.0),  # full: 28 W; × 2 s = 56 J
    ],
)
def test_model_idle_half_full(util_pct, cpu_watts, cpu_joules):
    src = make(HostConfig(platform_watts=40.0), util_pct=util_pct)
    first = src.read(100.0)
    assert first.baseline and first.joules == 0.0
    s = src.read(102.0)  # dt = 2 s
    assert not s.baseline
    c = by_name(s)
    assert set(c) == {"cpu", "dram", "platform"}
    assert (c["cpu"].source, c["dram"].source, c["platform"].source) == ("model", "model", "static")
    assert (c["cpu"].watts, c["cpu"].joules) == (cpu_watts, cpu_joules)
    # dram: 0.375 W/GiB × 16 GiB = 6 W; × 2 s = 12 J
    assert (c["dram"].watts, c["dram"].joules) == (6.0, 12.0)
    # platform: 40 W static; × 2 s = 80 J
    assert (c["platform"].watts, c["platform"].joules) == (40.0, 80.0)
    assert s.watts == cpu_watts + 6.0 + 40.0
    assert s.joules == cpu_joules + 12.0 + 80.0
    assert s.cpu_util_ratio == util_pct / 100
    assert (s.mem_total_bytes, s.mem_used_bytes) == (16 * GIB, 10 * GIB)


def test_first_read_is_baseline_with_model_watts():
    src = make(util_pct=50.0)
    s = src.read(5.0)
    assert s.baseline
    assert [(c.component, c.watts, c.joules) for c in s.components] == [
        ("cpu", 17.0, 0.0),
        ("dram", 6.0, 0.0),
        ("platform", 0.0, 0.0),
    ]


def test_model_uses_interval_average_utilisation():
    # cpu_percent() returns the average since the previous call, so each
    # interval is charged at its own utilisation (rectangle, exact for the model).
    src = make(util_pct=[0.0, 100.0, 0.0])
    src.read(0.0)
    s1 = src.read(1.0)  # 1 s at 100 %: 28 W × 1 s = 28 J
    s2 = src.read(3.0)  # 2 s at 0 %: 6 W × 2 s = 12 J
    assert by_name(s1)["cpu"].joules == 28.0
    assert by_name(s2)["cpu"].joules == 12.0


def test_explicit_cpu_figures_and_clamping():
    src = make(HostConfig(cpu_idle_watts=100.0, cpu_max_watts=300.0), util_pct=[150.0, -5.0, 25.0])
    assert by_name(src.read(0.0))["cpu"].watts == 300.0  # clamped to 1.0
    assert by_name(src.read(1.0))["cpu"].watts == 100.0  # clamped to 0.0
    # 100 + 200 × 0.25 = 150 W over 4 s = 600 J
    c = by_name(src.read(5.0))["cpu"]
    assert (c.watts, c.joules) == (150.0, 600.0)


def test_idle_above_default_max_is_rejected():
    with pytest.raises(ValueError, match="cpu_max_watts resolves to 28 W"):
        make(HostConfig(cpu_idle_watts=50.0))
    with pytest.raises(ValidationError, match="cpu_max_watts"):
        HostConfig(cpu_idle_watts=50.0, cpu_max_watts=40.0)


def test_zero_or_negative_dt_adds_no_model_energy():
    src = make(HostConfig(platform_watts=10.0), util_pct=100.0)
    src.read(7.0)
    s = src.read(7.0)
    assert s.joules == 0.0 and not s.baseline


# -- mode choice and the one log line ------------------------------------------


def test_fallback_when_no_powercap(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        src = make(root=tmp_path / "powercap")
    assert src.mode == "model"
    assert src.describe().startswith(f"host power: model (no {tmp_path / 'powercap'}); cpu 6-28 W over 8 CPUs")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage() == src.describe()
    s = src.read(1.0)
    assert {c.source for c in s.components if c.component in ("cpu", "dram")} == {"model"}


def test_this_machine_without_powercap(tmp_path):
    missing = tmp_path / "powercap"  # most real hosts have /sys/class/powercap: a root that does not exist
    src = HostPowerSource(HostConfig(powercap_root=missing))  # real psutil
    assert src.mode == "model"
    assert src.describe().startswith(f"host power: model (no {missing})")
    src.read(0.0)
    s = src.read(0.2)
    assert 0.0 <= s.cpu_util_ratio <= 1.0 and s.mem_total_bytes > 0
    assert [(c.component, c.source) for c in s.components] == [
        ("cpu", "model"),
        ("dram", "model"),
        ("platform", "static"),
    ]


def test_rapl_two_sockets(powercap_copy, set_uj, caplog):
    root = powercap_copy("two_sockets")
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        src = make(root=root)
    assert src.mode == "rapl"
    assert src.describe() == "host power: rapl, 2 packages + 2 dram, platform 0 W static"
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO
    first = src.read(10.0)
    assert first.baseline
    assert all(c.joules == 0.0 and c.watts == 0.0 for c in first.components)
    set_uj(root, "intel-rapl:0", 100_000_000_000 + 180_500_000)  # +180.5 J
    set_uj(root, "intel-rapl:1", 150_000_000_000 + 95_250_000)  # +95.25 J
    set_uj(root, "intel-rapl:0:1", 20_000_000_000 + 12_000_000)  # +12 J
    set_uj(root, "intel-rapl:1:1", 30_000_000_000 + 8_125_000)  # +8.125 J
    s = src.read(12.0)  # dt = 2 s
    assert [(c.component, c.socket, c.source, c.watts, c.joules) for c in s.components] == [
        ("cpu", "0", "rapl", 90.25, 180.5),  # 180.5 J / 2 s
        ("cpu", "1", "rapl", 47.625, 95.25),  # 95.25 J / 2 s
        ("dram", "0", "rapl", 6.0, 12.0),  # 12 J / 2 s
        ("dram", "1", "rapl", 4.0625, 8.125),  # 8.125 J / 2 s
        ("platform", None, "static", 0.0, 0.0),
    ]


def test_rapl_without_dram_models_dram(powercap_copy, set_uj):
    root = powercap_copy("one_socket")
    src = make(HostConfig(platform_watts=25.0), root=root)
    assert src.describe() == "host power: rapl, 1 package + 0 dram (dram modelled at 0.375 W/GiB), platform 25 W static"
    src.read(0.0)
    set_uj(root, "intel-rapl:0", 48_213_177_625 + 150_000_000)  # +150 J
    s = src.read(1.5)
    assert [(c.component, c.socket, c.source, c.watts, c.joules) for c in s.components] == [
        ("cpu", "0", "rapl", 100.0, 150.0),  # 150 J / 1.5 s
        ("dram", None, "model", 6.0, 9.0),  # 0.375 × 16 GiB = 6 W × 1.5 s
        ("platform", None, "static", 25.0, 37.5),  # 25 W × 1.5 s
    ]


def test_rapl_wrap_through_source(powercap_copy, set_uj):
    root = powercap_copy("wrap")
    src = make(root=root)
    src.read(0.0)
    set_uj(root, "intel-rapl:0", 50_000_000)
    # 50 000 000 + 262 143 328 850 - 262 143 000 000 = 50 328 850 µJ over 1 s
    cpu = by_name(src.read(1.0))["cpu0"]
    assert cpu.joules == pytest.approx(50.32885, abs=1e-9)
    assert cpu.watts == pytest.approx(50.32885, abs=1e-9)


def _deny_energy(path: Path) -> str:
    if path.name == "energy_uj":
        raise PermissionError(13, "Permission denied", str(path))
    return path.read_text()


def test_permission_denied_falls_back_with_one_line(powercap_dir, caplog):
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        src = make(root=powercap_dir / "two_sockets", read_text=_deny_energy)
        src.read(0.0)
        src.read(1.0)
    assert src.mode == "model"
    d = src.describe()
    assert d.startswith("host power: model (energy_uj not readable: permission denied (")
    assert "; see docs/host-power.md); cpu 6-28 W" in d
    assert [r.getMessage() for r in caplog.records] == [d]


def test_mode_rapl_fails_loudly(powercap_dir, tmp_path):
    with pytest.raises(RaplUnavailable, match='mode = "rapl" but energy_uj not readable: permission denied'):
        make(HostConfig(mode="rapl"), root=powercap_dir / "two_sockets", read_text=_deny_energy)
    with pytest.raises(RaplUnavailable, match='mode = "rapl" but no '):
        make(HostConfig(mode="rapl"), root=tmp_path)


def test_mode_model_ignores_rapl(powercap_dir):
    src = make(HostConfig(mode="model"), root=powercap_dir / "two_sockets")
    assert src.mode == "model"
    assert src.describe().startswith('host power: model (mode = "model" in [host]); ')
    assert all(c.source != "rapl" for c in src.read(0.0).components)


def test_rapl_lost_at_runtime_falls_back_once(powercap_copy, set_uj, caplog):
    root = powercap_copy("one_socket")
    deny = {"on": False}

    def rd(path: Path) -> str:
        if deny["on"] and path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    src = make(root=root, read_text=rd, util_pct=50.0)
    src.read(0.0)
    set_uj(root, "intel-rapl:0", 48_213_177_625 + 100_000_000)
    assert by_name(src.read(1.0))["cpu0"].source == "rapl"
    deny["on"] = True
    with caplog.at_level(logging.WARNING, logger="agent.sources.host"):
        s = src.read(2.0)
        src.read(3.0)
    assert len(caplog.records) == 1
    assert src.mode == "model"
    # this very tick is modelled: 17 W × 1 s
    assert [(c.component, c.source, c.joules) for c in s.components] == [
        ("cpu", "model", 17.0),
        ("dram", "model", 6.0),
        ("platform", "static", 0.0),
    ]


def test_frozen_rapl_counters_fall_back_in_auto(powercap_dir, caplog):
    # A read-only fixture: the counters never move, as with some virtualised RAPL.
    with caplog.at_level(logging.WARNING, logger="agent.sources.host"):
        src = make(root=powercap_dir / "one_socket")
        src.read(0.0)
        s = src.read(1.0)
    assert src.mode == "model"
    assert "did not advance in 1 s" in src.describe()
    assert by_name(s)["cpu"].source == "model"
    assert len(caplog.records) == 1


def test_frozen_check_waits_for_a_long_enough_interval(powercap_dir):
    src = make(root=powercap_dir / "one_socket")
    src.read(0.0)
    src.read(0.1)  # too short to judge
    assert src.mode == "rapl"


def test_disabled():
    src = make(HostConfig(enabled=False))
    assert src.describe() == "host power: disabled ([host] enabled = false)"
    s = src.read(1.0)
    assert s.components == () and s.watts == 0.0


# -- serialisation and config --------------------------------------------------


def test_sample_round_trip_through_json(powercap_copy, set_uj):
    root = powercap_copy("two_sockets")
    src = make(HostConfig(platform_watts=12.5), root=root, util_pct=30.0)
    src.read(0.0)
    set_uj(root, "intel-rapl:0", 100_000_000_000 + 1_000_000)
    s = src.read(1.0)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["components"][0] == {"component": "cpu", "socket": "0", "source": "rapl", "watts": 1.0, "joules": 1.0}
    assert HostSample.from_dict(d) == s
    base = src.read(1.0)
    assert HostSample.from_dict(base.to_dict()) == base


def test_from_dict_errors():
    with pytest.raises(ValueError, match="missing or wrong field"):
        HostSample.from_dict({"t_mono": 1.0})
    with pytest.raises(ValueError, match="bad host component"):
        HostSample.from_dict(
            {"t_mono": 1, "cpu_util_ratio": 0, "mem_used_bytes": 0, "mem_total_bytes": 0, "components": [{"x": 1}]}
        )
    # baseline defaults to False when absent
    s = HostSample.from_dict({"t_mono": 1, "cpu_util_ratio": 0.5, "mem_used_bytes": 1, "mem_total_bytes": 2})
    assert s.components == () and s.baseline is False


TOML = """
[host]
enabled = true
mode = "auto"
powercap_root = "/sys/class/powercap"
cpu_idle_watts = 60.0
cpu_max_watts = 350.0
memory_watts_per_gib = 0.375
platform_watts = 80.0

[host.ipmi]
enabled = true
command = ["ipmitool", "dcmi", "power", "reading"]
interval_seconds = 10
timeout_seconds = 5
cost_basis = "wall"
"""


def test_toml_shape():
    cfg = HostConfig.model_validate(tomllib.loads(TOML)["host"])
    assert cfg.cpu_idle_watts == 60.0 and cfg.platform_watts == 80.0
    assert cfg.powercap_root == Path("/sys/class/powercap")
    assert cfg.ipmi.enabled and cfg.ipmi.cost_basis == "wall" and cfg.ipmi.interval_seconds == 10.0
    d = HostConfig()
    assert (d.enabled, d.mode, d.cpu_idle_watts, d.cpu_max_watts) == (True, "auto", None, None)
    assert (d.memory_watts_per_gib, d.platform_watts) == (0.375, 0.0)
    assert (d.ipmi.enabled, d.ipmi.command, d.ipmi.cost_basis) == (
        False,
        ["ipmitool", "dcmi", "power", "reading"],
        "components",
    )
    assert (d.ipmi.interval_seconds, d.ipmi.timeout_seconds) == (10.0, 5.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"typo_watts": 1},
        {"mode": "msr"},
        {"platform_watts": -1},
        {"ipmi": {"cost_basis": "both"}},
        {"ipmi": {"command": []}},
        {"ipmi": {"interval_seconds": 0}},
        {"ipmi": {"unknown": 1}},
    ],
)
def test_config_rejects(bad):
    with pytest.raises(ValidationError):
        HostConfig.model_validate(bad)


def test_cpu_util_meter_own_state():
    times = [
        SimpleNamespace(user=10.0, nice=0.0, system=5.0, idle=85.0, iowait=0.0, irq=0.0, softirq=0.0, steal=0.0),
        # +30 busy (user 20, system 5, irq 3, softirq 2), +70 idle/iowait/steal
        SimpleNamespace(user=30.0, nice=0.0, system=10.0, idle=145.0, iowait=5.0, irq=3.0, softirq=2.0, steal=5.0),
        SimpleNamespace(user=30.0, nice=0.0, system=10.0, idle=145.0, iowait=5.0, irq=3.0, softirq=2.0, steal=5.0),
    ]
    m = CpuUtilMeter(cpu_times=lambda: times.pop(0))
    assert m() == pytest.approx(30.0)  # 30 busy of 100
    assert m() == 0.0  # no time passed


# -- a restart on the same boot: the RAPL counters bridge the time no agent ran -----------


def test_a_restart_bridges_the_rapl_counters_through_a_wrap(powercap_copy, set_uj, caplog):
    """kill -9 after the last read whose energy is in the totals: the next run's first read counts,
    exact from the counter (one wrap undone), what was used since that read; later reads go on."""
    root = powercap_copy("wrap")  # package-0 at 262 143 000 000 µJ, 328 850 µJ below its range
    first = make(root=root)
    first.read(100.0)
    set_uj(root, "intel-rapl:0", 20_000_000)  # wrapped: +20.32885 J
    assert by_name(first.read(101.0))["cpu0"].joules == pytest.approx(20.32885, abs=1e-9)
    mark = first.counter_mark()
    assert mark is not None and mark.mono == 101.0 and mark.counters == {"intel-rapl:0": (20_000_000, 262_143_328_850)}
    set_uj(root, "intel-rapl:0", 95_000_000)  # +75 J while no agent runs
    second = make(root=root)
    second.resume(mark)
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        s = second.read(131.0)  # 30 s later
    assert s.baseline and s.bridged_since == 101.0
    parts = by_name(s)
    assert parts["cpu0"].joules == pytest.approx(75.0, abs=1e-9) and parts["cpu0"].source == "rapl"
    assert parts["dram"].joules == 0.0 and parts["platform"].joules == 0.0  # modelled: nothing invented
    assert "host: 75.000 J used in the 30.0 s the agent was not running, from the RAPL counters" in caplog.text
    set_uj(root, "intel-rapl:0", 105_000_000)
    assert by_name(second.read(132.0))["cpu0"].joules == pytest.approx(10.0, abs=1e-9)  # and on from there


@pytest.mark.parametrize("case", ["long gap", "other zones", "future", "too much"])
def test_a_rapl_bridge_the_counters_cannot_tell_is_not_taken(powercap_copy, set_uj, caplog, case):
    root = powercap_copy("wrap")
    first = make(root=root)
    first.read(100.0)
    mark = first.counter_mark()
    assert mark is not None
    now, why = 130.0, ""
    if case == "long gap":  # 262 kJ of range, 1 kW at most: beyond 262 s a second wrap cannot be ruled out
        now, why = 100.0 + 263.0, "could have wrapped more than once in that time (262143 J range)"
    elif case == "other zones":
        root = powercap_copy("two_sockets")
        why = "the RAPL zones are not those the totals end at"
    elif case == "future":
        now, why = 90.0, "the saved reading is 10.0 s in the future"
    else:  # 60 kJ in 30 s: 2 kW from one package
        set_uj(root, "intel-rapl:0", 262_143_000_000 - 1 + 60_000_000_000 - 262_143_328_850)
        why = "more than a zone can draw"
    second = make(root=root)
    second.resume(mark)
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        s = second.read(now)
    assert s.baseline and s.bridged_since is None
    assert all(c.joules == 0.0 for c in s.components)
    assert "host: the energy used while the agent was not running" in caplog.text and why in caplog.text


def test_a_modelled_host_has_no_counter_mark_and_bridges_nothing(powercap_copy, caplog):
    """No counter, no bridge: the model's energy for a time no agent ran is not known, and none is invented."""
    rapl = make(root=powercap_copy("one_socket"))
    rapl.read(10.0)
    mark = rapl.counter_mark()
    model = make(util_pct=50.0)
    assert model.mode == "model"
    model.read(20.0)
    assert model.counter_mark() is None
    again = make(util_pct=50.0)
    with caplog.at_level(logging.INFO, logger="agent.sources.host"):
        again.resume(mark)
    s = again.read(40.0)
    assert s.bridged_since is None and all(c.joules == 0.0 for c in s.components)
    assert "not counted: host power is model now, not RAPL counters" in caplog.text


def test_rapl_marks_are_taken_only_from_this_boot_and_malformed_ones_refused():
    from agent.sources.host import RaplMark

    good = {"boot_id": "boot-a", "mono": 12.5, "zones": [["intel-rapl:0", 5, 262_143_328_850]]}
    assert RaplMark.from_state(good, "boot-a") == RaplMark({"intel-rapl:0": (5, 262_143_328_850)}, 12.5)
    assert RaplMark.from_state(good, "boot-b") is None and RaplMark.from_state(good, None) is None
    assert RaplMark.from_state(None, "boot-a") is None  # states saved before this existed
    mark = RaplMark({"intel-rapl:0": (5, 262_143_328_850)}, 12.5)
    assert RaplMark.from_state(mark.to_state("boot-a"), "boot-a") == mark
    for bad in ({**good, "zones": [["intel-rapl:0", -1, 5]]}, {**good, "zones": [["intel-rapl:0", 1.5, 5]]},
                {**good, "zones": [["", 1, 5]]}, {**good, "zones": [["z", 1, 5], ["z", 2, 5]]},
                {**good, "zones": "x"}, {**good, "mono": float("nan")}, {**good, "mono": True}, []):
        with pytest.raises(ValueError, match="host_counters"):
            RaplMark.from_state(bad, "boot-a")
