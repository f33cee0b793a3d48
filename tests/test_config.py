"""Configuration: TOML + GPUCOST_* environment, one-line errors naming the field."""

from __future__ import annotations

import re

import pytest

from agent.cli import main
from agent.config import ConfigError, load, parse_listen


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file():
    s = load(None)
    assert s.agent.listen == "0.0.0.0:9842"
    assert s.agent.tick_seconds == 1.0
    assert s.gpu.energy_counter_interval_seconds == 5.0
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


def test_bad_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("GPUCOST_AGENT__TICK_SECONDS", "fast")
    with pytest.raises(ConfigError, match=r"^agent\.tick_seconds: "):
        load(None)


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
