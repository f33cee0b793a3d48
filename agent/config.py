"""Configuration: a TOML file, overridden by ``GPUCOST_*`` environment variables.

Precedence, highest first: command-line flags, environment, TOML file,
defaults. Nested tables map to ``__`` in variable names, e.g.
``GPUCOST_GPU__ENERGY_METHOD=samples`` overrides ``[gpu] energy_method``.
A wrong value is refused at start with a one-line message naming the field.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .cost import CarbonConfig, HardwareConfig, IdleConfig, PueConfig, TariffConfig, format_validation_error
from .sources.host import HostConfig

DEFAULT_PORT = 9842  # clear of node_exporter 9100, dcgm-exporter 9400, nvidia_gpu_exporter 9835
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


class ConfigError(Exception):
    """A configuration that cannot be used. ``str()`` is one line naming the field."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port). IPv6 in brackets (``[::1]:9842``, ``[::]:9842`` for
    every address, IPv4 too); ``:9842`` listens on all IPv4 interfaces."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, got {value!r}")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1]
        if not (host.startswith("[") and host.endswith("]")) or not _is_ipv6(inner):
            raise ValueError(f"expected [IPv6 address]:PORT, got {value!r}")
        return inner, int(port)
    if ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}, got {value!r}")
    return host or "0.0.0.0", int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


class AgentSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Address of the /metrics and /healthz endpoint.
    listen: str = DEFAULT_LISTEN
    #: Sampling interval of the cheap readings. Units: s.
    tick_seconds: float = Field(1.0, gt=0, le=300)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Where totals are persisted. Unset: $STATE_DIRECTORY (systemd), else
    #: /var/lib/gpu-cost-agent (root) or ~/.local/state/gpu-cost-agent. Replays
    #: persist only when this is set explicitly (or --state-dir is given).
    state_dir: Path | None = None
    #: How often totals are written to the state file (and always on SIGTERM). Units: s.
    persist_interval_seconds: float = Field(60.0, gt=0, le=86400)
    #: TLS and basic auth for the endpoint: a web-config file in the format Prometheus
    #: exporters share (exporter-toolkit, ``--web.config.file``). Unset: plain HTTP, no auth.
    web_config_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class GpuSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: ``auto`` picks the best the GPU supports: counter, then samples, then polled.
    energy_method: Literal["auto", "counter", "samples", "polled"] = "auto"
    #: How often the hardware energy counter is read (3.8 ms CPU per read on H100). Units: s.
    energy_counter_interval_seconds: float = Field(5.0, gt=0, le=600)


class Settings(BaseSettings):
    """The whole configuration. Sections are TOML tables."""

    model_config = SettingsConfigDict(
        env_prefix="GPUCOST_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    agent: AgentSection = AgentSection()
    gpu: GpuSection = GpuSection()
    host: HostConfig = HostConfig()
    #: No [tariff] table: energy is exported, cost is not.
    tariff: TariffConfig | None = None
    pue: PueConfig = PueConfig()
    carbon: CarbonConfig = CarbonConfig()
    hardware: HardwareConfig = HardwareConfig()
    idle: IdleConfig = IdleConfig()

    # Set by load() for the duration of one construction.
    _toml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if self.gpu.energy_counter_interval_seconds < self.agent.tick_seconds:
            raise ValueError(
                "gpu.energy_counter_interval_seconds must be at least agent.tick_seconds "
                f"({self.gpu.energy_counter_interval_seconds} < {self.agent.tick_seconds})"
            )
        hw = self.hardware
        priced = hw.gpu_price > 0 or hw.node_price > 0 or bool(hw.gpus)
        if priced and not hw.currency and self.tariff is None:
            raise ValueError("hardware.currency is required when there is no [tariff] to take it from")
        return self

    @property
    def hardware_currency(self) -> str | None:
        return self.hardware.currency or (self.tariff.currency if self.tariff is not None else None)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings from ``path`` (TOML), the environment and ``overrides`` (CLI flags).

    Raises :class:`ConfigError` with a one-line message naming the file or field.
    """
    toml_path = None
    if path is not None:
        toml_path = Path(path)
        try:
            with open(toml_path, "rb") as fh:
                tomllib.load(fh)  # parse once here for a clear, line-numbered error
        except OSError as exc:
            raise ConfigError(f"{toml_path}: cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_path}: invalid TOML: {exc}") from exc
    Settings._toml_file = toml_path
    try:
        # Flags are merged section by section so a flag does not wipe the
        # rest of its table coming from the file or environment.
        base = Settings()
        if not overrides:
            return base
        merged = _merge(base.model_dump(), overrides)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    finally:
        Settings._toml_file = None
