"""[attribution]: defaults, bounds, environment, and check-config refusing what run refuses."""

from __future__ import annotations

import pytest

from agent.cli import main
from agent.config import ConfigError, load


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults():
    a = load(None).attribution
    assert (a.enabled, a.user_names, a.max_workloads, a.retention_seconds) == (True, True, 100, 300.0)
    assert (a.idle_watts, a.cmdline, a.pod_resources) == (None, False, False)
    assert str(a.pod_resources_socket) == "/var/lib/kubelet/pod-resources/kubelet.sock"


def test_idle_watts_one_number_or_a_table(tmp_path):
    assert load(write(tmp_path, "[attribution]\nidle_watts = 70\n")).attribution.idle_watts == 70
    table = '[attribution.idle_watts]\n"0" = 70\n"GPU-d9a96f9e" = 65\ndefault = 60\n'
    assert load(write(tmp_path, table)).attribution.idle_watts == {"0": 70, "GPU-d9a96f9e": 65, "default": 60}


@pytest.mark.parametrize("body, field", [
    ("max_workloads = 0", "attribution.max_workloads"),
    ("retention_seconds = -1", "attribution.retention_seconds"),
    ("retention_seconds = inf", "attribution.retention_seconds"),
    ("window_seconds = 0.1", "attribution.window_seconds"),
    ("idle_watts = -5", "attribution.idle_watts"),
    ("idle_watts = 9000", "attribution.idle_watts"),
    ("enabled = \"maybe\"", "attribution.enabled"),
    ("cmdlines = true", "attribution.cmdlines"),
])
def test_bad_values_are_one_line_naming_the_field(tmp_path, capsys, body, field):
    p = write(tmp_path, f"[attribution]\n{body}\n")
    with pytest.raises(ConfigError) as exc:
        load(p)
    assert field in str(exc.value) and "\n" not in str(exc.value)
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1


def test_bad_idle_watts_key(tmp_path):
    with pytest.raises(ConfigError, match="GPU index, a GPU UUID"):
        load(write(tmp_path, '[attribution.idle_watts]\ngpu0 = 70\n'))


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("GPUCOST_ATTRIBUTION__MAX_WORKLOADS", "7")
    monkeypatch.setenv("GPUCOST_ATTRIBUTION__ENABLED", "false")
    a = load(None).attribution
    assert (a.max_workloads, a.enabled) == (7, False)


def test_check_config_says_what_attribution_does(tmp_path, capsys):
    assert main(["check-config", str(write(tmp_path, "[attribution]\nmax_workloads = 20\nidle_watts = 70\n"))]) == 0
    out = capsys.readouterr().out
    assert "attribution: at most 20 workloads" in out and "idle power 70 W" in out
    assert main(["check-config", str(write(tmp_path, "[attribution]\nenabled = false\n"))]) == 0
    assert "attribution: off" in capsys.readouterr().out
