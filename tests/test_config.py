"""Configuration: TOML + GPUCOST_* environment, one-line errors naming the field."""

from __future__ import annotations

import psutil
import re

import pytest

from agent.cli import main
from agent.config import ConfigError, load, parse_listen, unknown_env_vars


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    s = load(None)
    assert s.agent.listen == "0.0.0.0:9842"
    assert s.agent.tick_seconds == 1.0
    assert s.gpu.energy_counter_interval_seconds == 15.0
    assert s.gpu.energy_method == "auto"


def test_toml_then_env_then_flags(tmp_path, monkeypatch):
    p = write(tmp_path, '[agent]\ntick_seconds = 2.0\nlisten = "127.0.0.1:9000"\n[gpu]\nenergy_method = "samples"\n')
    s = load(p)
    assert (s.agent.tick_seconds, s.agent.listen, s.gpu.energy_method) == (2.0, "127.0.0.1:9000", "samples")
    monkeypatch.setenv("GPUCOST_GPU__ENERGY_METHOD", "polled")
    monkeypatch.setenv("GPUCOST_AGENT__TICK_SECONDS", "3")
    s = load(p)
    assert (s.agent.tick_seconds, s.gpu.energy_method) == (3.0, "polled")
    assert s.agent.listen == "127.0.0.1:9000"  # the rest of the table stays
    s = load(p, {"agent": {"tick_seconds": 0.5}})
    assert s.agent.tick_seconds == 0.5 and s.agent.listen == "127.0.0.1:9000"


@pytest.mark.parametrize(
    "text, field",
    [
        ("[agent]\ntick_seconds = -1\n", "agent.tick_seconds:"),
        ('[agent]\nlisten = "nonsense"\n', "agent.listen:"),
        ('[gpu]\nenergy_method = "guess"\n', "gpu.energy_method:"),
        ("[gpu]\nwhatever = 1\n", "gpu.whatever: unknown setting"),
        ("[agent]\ntick_seconds = 10\n[gpu]\nenergy_counter_interval_seconds = 5\n",
         "gpu.energy_counter_interval_seconds must be at least agent.tick_seconds"),
    ],
)
def test_bad_value_names_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    msg = str(exc.value)
    assert field in msg and "\n" not in msg


def test_bad_env_value_names_the_variable_and_the_field(monkeypatch):
    monkeypatch.setenv("GPUCOST_AGENT__TICK_SECONDS", "fast")
    with pytest.raises(ConfigError, match=r"^GPUCOST_AGENT__TICK_SECONDS=fast: agent\.tick_seconds: "):
        load(None)


def test_the_error_from_the_environment_is_the_one_shown(monkeypatch):
    """Without a currency the tariff has two errors; the one the variable caused is named."""
    monkeypatch.setenv("GPUCOST_TARIFF__FLAT_PRICE_PER_KWH", "abc")
    with pytest.raises(ConfigError) as exc:
        load(None)
    assert str(exc.value) == ("GPUCOST_TARIFF__FLAT_PRICE_PER_KWH=abc: tariff.flat_price_per_kwh: Input should be "
                              "a valid number, unable to parse string as a number (and 1 more error)")


def test_a_whole_table_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("GPUCOST_AGENT", '{"tick_seconds": 2, "tick": 1}')
    with pytest.raises(ConfigError, match=r'^GPUCOST_AGENT=\{"tick_seconds": 2, "tick": 1\}: agent\.tick: unknown'):
        load(None)


def test_errors_from_the_file_or_flags_name_no_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCOST_AGENT__TICK_SECONDS", "2")
    monkeypatch.setenv("GPUCOST_PUE__VALUE", "1.2")
    with pytest.raises(ConfigError, match=r"^agent\.tick_seconds: Input should be greater than 0"):
        load(None, {"agent": {"tick_seconds": -1}})  # the flag's value, not the variable's
    with pytest.raises(ConfigError, match=r"^carbon\.grams_per_kwh: "):
        load(write(tmp_path, "[carbon]\ngrams_per_kwh = -1\n"))


def test_unknown_variables_are_ignored_and_named(monkeypatch):
    monkeypatch.setenv("GPUCOST_TARRIF__FLAT_PRICE_PER_KWH", "0.3")
    monkeypatch.setenv("GPUCOST_GPU__ENERGY_MTHOD", "polled")  # an unknown key in a known table
    monkeypatch.setenv("GPUCOST_GPU__ENERGY_COUNTER_INTERVAL_SECONDS", "10")
    monkeypatch.setenv("GPUCOST_HOST__IPMI__ENABLED", "true")
    s = load(None)
    assert s.tariff is None and s.gpu.energy_method == "auto"  # ignored, not half-applied
    assert s.gpu.energy_counter_interval_seconds == 10 and s.host.ipmi.enabled  # the known ones apply
    assert unknown_env_vars() == [
        "ignoring environment variable GPUCOST_GPU__ENERGY_MTHOD: there is no setting gpu.energy_mthod; "
        "did you mean GPUCOST_GPU__ENERGY_METHOD?",
        "ignoring environment variable GPUCOST_TARRIF__FLAT_PRICE_PER_KWH: there is no setting "
        "tarrif.flat_price_per_kwh; did you mean GPUCOST_TARIFF__FLAT_PRICE_PER_KWH?",
    ]


def test_every_documented_variable_is_known():
    env = {"GPUCOST_AGENT__LISTEN": "", "GPUCOST_TARIFF__FLAT_PRICE_PER_KWH": "", "GPUCOST_HOST__IPMI__ENABLED": "",
           "GPUCOST_HOST__IPMI": "", "GPUCOST_TARIFF__BANDS": "", "GPUCOST_HARDWARE__GPUS": "",
           "GPUCOST_IDLE__UTILIZATION_THRESHOLD": "", "gpucost_pue__value": ""}
    assert unknown_env_vars(env) == []
    assert unknown_env_vars({"GPUCOST_": "", "GPUCOST_AGENT__": "", "GPUCOST_PUE__VALUE__X": ""}) == [
        "ignoring environment variable GPUCOST_: there is no setting (empty)",
        "ignoring environment variable GPUCOST_AGENT__: there is no setting agent.; did you mean GPUCOST_AGENT?",
        "ignoring environment variable GPUCOST_PUE__VALUE__X: there is no setting pue.value.x; "
        "did you mean GPUCOST_PUE__VALUE?",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[host]\nplatform_watts = 1e308\n", "host.platform_watts: Input should be less than or equal to 100000"),
        ("[host]\nplatform_watts = inf\n", "host.platform_watts: Input should be a finite number"),
        ("[host]\ncpu_max_watts = nan\n", "host.cpu_max_watts: Input should be a finite number"),
        ("[host]\nmemory_watts_per_gib = 375\n", "host.memory_watts_per_gib: Input should be less than or equal to 10"),
        ("[host.ipmi]\ninterval_seconds = 1e9\n", "host.ipmi.interval_seconds: Input should be less than or equal "
                                                  "to 3600"),
        ("[agent]\ntick_seconds = 1e308\n", "agent.tick_seconds: Input should be less than or equal to 300"),
        ("[host]\ncpu_idle_watts = 5000\n", "host.cpu_idle_watts: 5000 W is above cpu_max_watts, which is unset and "
                                            "defaults to "),
        ("[host]\ncpu_max_watts = 0.1\n", "host.cpu_max_watts: 0.1 W is below cpu_idle_watts, which is unset and "
                                          "defaults to "),
        ("[host]\ncpu_idle_watts = 50\ncpu_max_watts = 40\n", "host: cpu_max_watts (40.0) must be >= cpu_idle_watts"),
    ],
)
def test_values_that_would_poison_totals_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_the_cpu_check_uses_this_machines_defaults_and_skips_a_disabled_host(tmp_path):
    cpus = psutil.cpu_count() or 1
    just_fits = 3.5 * cpus
    assert load(write(tmp_path, f"[host]\ncpu_idle_watts = {just_fits}\n")).host.cpu_idle_watts == just_fits
    with pytest.raises(ConfigError, match=rf"defaults to {just_fits:g} W on this machine \(3.5 W x {cpus} logical"):
        load(write(tmp_path, f"[host]\ncpu_idle_watts = {just_fits + 1}\n"))
    assert load(write(tmp_path, "[host]\nenabled = false\ncpu_idle_watts = 5000\n")).host.cpu_idle_watts == 5000


def test_the_cpu_check_uses_the_host_the_model_describes(tmp_path):
    """A replay models the recorded host: its CPU count scales the defaults, not this machine's."""
    from agent.sources.host import CpuHost

    path = write(tmp_path, "[host]\ncpu_idle_watts = 50\n")
    recorded = CpuHost(16, "the recorded host node17")
    assert load(path, cpu_host=recorded).host.cpu_idle_watts == 50  # 3.5 W x 16 = 56 W max
    with pytest.raises(ConfigError, match=r"defaults to 14 W on the recorded host node17 \(3.5 W x 4 logical"):
        load(path, cpu_host=CpuHost(4, "the recorded host node17"))
    assert load(path, cpu_host=None).host.cpu_idle_watts == 50  # no host readings: nothing is modelled


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "[agent]\ntick_seconds = \n")
    with pytest.raises(ConfigError, match=r"agent\.toml: invalid TOML: .*line 2"):
        load(p)


def test_cli_refuses_bad_config_with_exit_2(tmp_path, capsys):
    p = write(tmp_path, '[gpu]\nenergy_method = "guess"\n')
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu-cost-agent: config error: gpu.energy_method:")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("value, expected", [("0.0.0.0:9842", ("0.0.0.0", 9842)), (":80", ("0.0.0.0", 80)),
                                             ("[::1]:9842", ("::1", 9842)), ("[::]:9842", ("::", 9842)),
                                             ("localhost:9842", ("localhost", 9842))])
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value, message", [("::1:9842", "needs brackets: [::1]:9842"),
                                            ("[::1:9842", "expected [IPv6 address]:PORT"),
                                            ("[1.2.3.4]:80", "expected [IPv6 address]:PORT"),
                                            ("host:99999", "port 0-65535")])
def test_parse_listen_refuses(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_listen(value)
