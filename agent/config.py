"""Configuration: a TOML file, overridden by ``GPUCOST_*`` environment variables.

Precedence, highest first: command-line flags, environment, TOML file,
defaults. Nested tables map to ``__`` in variable names, e.g.
``GPUCOST_GPU__ENERGY_METHOD=samples`` overrides ``[gpu] energy_method``.
A wrong value is refused at start with a one-line message naming the field
(and the variable, when the value came from the environment). A ``GPUCOST_*``
variable that names no setting is ignored and warned about by name
(:func:`unknown_env_vars`), so a typo never passes unnoticed.
"""

from __future__ import annotations

import inspect
import os
import ipaddress
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .attribution.config import AttributionConfig
from .cost import (
    CarbonConfig,
    CloudPrice,
    HardwareConfig,
    IdleConfig,
    PlanningConfig,
    PueConfig,
    RunningCostItem,
    TariffConfig,
    format_validation_error,
)
from .sources.host import (
    DEFAULT_CPU_IDLE_WATTS_PER_CPU,
    DEFAULT_CPU_MAX_WATTS_PER_CPU,
    CpuHost,
    HostConfig,
    resolve_cpu_watts,
)

ENV_PREFIX = "GPUCOST_"
DEFAULT_PORT = 9842  # clear of node_exporter 9100, dcgm-exporter 9400, nvidia_gpu_exporter 9835
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


class ConfigError(Exception):
    """A configuration that cannot be used. ``str()`` is one line naming the field."""


class Refused(Exception):
    """A configuration a command cannot use, for whatever reason: a value, the web-config file,
    ``[host] mode = "rapl"`` without RAPL. ``str()`` is the one line every command refuses it
    with, after ``gpu-cost-agent: `` (exit code 2); on SIGHUP it is logged and the running
    configuration stays. Raised by ``agent.cli.validate``, the one check they all share."""


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
    tick_seconds: float = Field(1.0, gt=0, le=300, allow_inf_nan=False)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Where totals are persisted. Unset: $STATE_DIRECTORY (systemd), else
    #: /var/lib/gpu-cost-agent (root) or ~/.local/state/gpu-cost-agent. Replays
    #: persist only when this is set explicitly (or --state-dir is given).
    state_dir: Path | None = None
    #: How often totals are written to the state file (and always on SIGTERM). Units: s.
    persist_interval_seconds: float = Field(60.0, gt=0, le=86400, allow_inf_nan=False)
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
    energy_counter_interval_seconds: float = Field(5.0, gt=0, le=600, allow_inf_nan=False)


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
    #: ``[[running_costs]]``: colocation, network, support, licences, staff (docs/cost.md).
    running_costs: list[RunningCostItem] = Field(default_factory=list, max_length=256)
    #: ``[[cloud_prices]]``: the price of renting the same GPU model, per GPU-hour (never fetched).
    cloud_prices: list[CloudPrice] = Field(default_factory=list, max_length=256)
    #: ``[planning]``: what check-config assumes to print the cost of one GPU-hour.
    planning: PlanningConfig = PlanningConfig()
    idle: IdleConfig = IdleConfig()
    attribution: AttributionConfig = AttributionConfig()

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
        sources: list[PydanticBaseSettingsSource] = [init_settings, _KnownEnvSettings(settings_cls, env_settings)]
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
        for i, item in enumerate(self.running_costs):
            if item.currency is None and self.hardware_currency is None:
                raise ValueError(f"running_costs[{i}].currency is required when neither [hardware] currency "
                                 "nor a [tariff] gives one")
        names = [(i.name, i.scope) for i in self.running_costs]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"running_costs: two items named {n[0]!r} with scope {n[1]!r}; give each its own name")
        return self

    @property
    def hardware_currency(self) -> str | None:
        return self.hardware.currency or (self.tariff.currency if self.tariff is not None else None)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    cpu_host: CpuHost | None | Literal["local"] = "local",
) -> Settings:
    """Load settings from ``path`` (TOML), the environment and ``overrides`` (CLI flags).

    ``cpu_host`` is the machine the host power model will describe, whose CPU count the CPU
    model's unset figures default by: ``"local"`` (this machine) for ``run``, the recorded host
    for a replay, None where no host is modelled (a trace without host readings).

    Raises :class:`ConfigError` with a one-line message naming the file or field, and
    the ``GPUCOST_*`` variable when the bad value came from the environment.
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
        try:
            base = Settings()
        except ValidationError as exc:
            raise ConfigError(_describe_with_env(exc)) from exc
        if overrides:
            # Flags are merged section by section so a flag does not wipe the
            # rest of its table coming from the file or environment.
            try:
                base = Settings.model_validate(_merge(base.model_dump(), overrides))
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc)) from exc
    finally:
        Settings._toml_file = None
    if cpu_host is not None:
        check_cpu_model(base.host, CpuHost.local() if cpu_host == "local" else cpu_host)
    return base


def check_cpu_model(host: HostConfig, on: CpuHost) -> None:
    """The CPU model's max must not be below its idle once an unset figure takes its default
    on the machine it describes (``on``), exactly as the host source resolves it there.

    Raises :class:`ConfigError` naming the field (and its ``GPUCOST_*`` variable)."""
    if not host.enabled:
        return
    idle, peak = resolve_cpu_watts(host, on.cpus)
    if peak >= idle:
        return
    if host.cpu_max_watts is None:
        field, line = "cpu_idle_watts", (
            f"{idle:g} W is above cpu_max_watts, which is unset and defaults to {peak:g} W on {on.name} "
            f"({DEFAULT_CPU_MAX_WATTS_PER_CPU:g} W x {on.cpus} logical CPUs); set cpu_max_watts too")
    elif host.cpu_idle_watts is None:
        field, line = "cpu_max_watts", (
            f"{peak:g} W is below cpu_idle_watts, which is unset and defaults to {idle:g} W on {on.name} "
            f"({DEFAULT_CPU_IDLE_WATTS_PER_CPU:g} W x {on.cpus} logical CPUs); set cpu_idle_watts too")
    else:
        return  # both set: HostConfig's own check has already refused it
    line = f"host.{field}: {line}"
    origin = _env_origin(("host", field))
    raise ConfigError(f"{origin}: {line}" if origin else line)


# -- the environment ----------------------------------------------------------------------


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field that is a table (``TariffConfig | None`` → TariffConfig)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            return arg
    return None


def _setting_paths(model: type[BaseModel] = Settings, above: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every path an environment variable may name: each table and each key in it."""
    out = []
    for name, field in model.model_fields.items():
        path = (*above, name)
        out.append(path)
        sub = _section_model(field.annotation)
        if sub is not None:
            out.extend(_setting_paths(sub, path))
    return out


def _env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(path).upper()


def _path_of(name: str) -> tuple[str, ...]:
    return tuple(name[len(ENV_PREFIX):].lower().split("__"))


def _gpucost_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``GPUCOST_*`` variables (names matched without regard to case, as pydantic-settings does)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line for each ``GPUCOST_*`` variable that names no setting (it is ignored)."""
    known = set(_setting_paths())
    names = [_env_name(p)[len(ENV_PREFIX):] for p in sorted(known)]
    lines = []
    for var in sorted(_gpucost_env(environ)):
        path = _path_of(var)
        if path in known:
            continue
        import difflib  # only for a variable that names no setting

        hint = difflib.get_close_matches(var[len(ENV_PREFIX):].upper(), names, n=1, cutoff=0.8)
        lines.append(
            f"ignoring environment variable {var}: there is no setting {'.'.join(path) or '(empty)'}"
            + (f"; did you mean {ENV_PREFIX}{hint[0]}?" if hint else "")
        )
    return lines


class _KnownEnvSettings(PydanticBaseSettingsSource):
    """The environment source, without variables that name no setting: those are warned
    about (:func:`unknown_env_vars`), never a reason to refuse the whole configuration."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return self.inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = self.inner()
        known = set(_setting_paths())
        for var in _gpucost_env():
            path = _path_of(var)
            if path in known:
                continue
            node: Any = data
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(path[-1], None)
        return data


def _env_origin(loc: tuple[Any, ...]) -> str | None:
    """``NAME=value`` of the variable that set the value at ``loc``, or a table above it."""
    env = {k.upper(): (k, v) for k, v in _gpucost_env().items()}
    parts: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        parts.append(part)
    for i in range(len(parts), 0, -1):
        name = _env_name(tuple(parts[:i]))
        if name in env:
            var, value = env[name]
            shown = value if len(value) <= 60 else value[:57] + "..."
            return f"{var}={shown}"
    return None


def _describe_with_env(exc: ValidationError) -> str:
    """One line for the first error, preferring one whose value came from the environment,
    prefixed with that variable: ``GPUCOST_TARIFF__FLAT_PRICE_PER_KWH=abc: tariff.flat_...``."""
    for i, err in enumerate(exc.errors(include_url=False)):
        origin = _env_origin(tuple(err.get("loc", ())))
        if origin is not None:
            return f"{origin}: {format_validation_error(exc, index=i)}"
    return format_validation_error(exc)
