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
import re
import stat
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

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
    every address, IPv4 too); ``:9842`` listens on all IPv4 interfaces. A URL is refused
    with the ``HOST:PORT`` it holds: the address is where to listen, not what to fetch."""
    scheme, sep, rest = value.partition("://")
    if sep and scheme and "/" not in scheme:
        hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        raise ValueError(f"expected HOST:PORT, not a URL: use {hostport!r} (TLS is set by the web-config "
                         f"file), got {value!r}")
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
    #: How often the hardware energy counter is read (3.8 ms CPU per read on H100), besides the reads
    #: at every tariff band, PUE or carbon edge and at shutdown, which keep each priced stretch
    #: exact (docs/accuracy.md). The default is the scrape interval of deploy/prometheus, so every
    #: scrape sees whole counter steps. Units: s.
    energy_counter_interval_seconds: float = Field(15.0, gt=0, le=600, allow_inf_nan=False)


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

    # Set by load() for the duration of one construction: the file's tables, read by read_toml.
    _toml_data: ClassVar[dict[str, Any] | None] = None

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
        if cls._toml_data is not None:
            # The tables read_toml read and checked: the file is read once, never again here.
            sources.append(InitSettingsSource(settings_cls, cls._toml_data))
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
    data = read_toml(path) if path is not None else None
    try:
        base = _build(data, overrides)
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, UnicodeError) as exc:
        # Whatever a value does to the validators (nesting, size, conversion limits): refused.
        # The file was bounded by read_toml; a GPUCOST_* variable (parsed as JSON) was not.
        env = ", ".join(sorted(_gpucost_env()))
        where = " with ".join(x for x in (str(path) if path is not None else "", env) if x)
        raise ConfigError(clip_line(f"{where or 'the configuration'}: cannot be used: {_exc_text(exc)}")) from None
    if cpu_host is not None:
        check_cpu_model(base.host, CpuHost.local() if cpu_host == "local" else cpu_host)
    return base


def _build(data: dict[str, Any] | None, overrides: dict[str, Any] | None) -> Settings:
    Settings._toml_data = data
    try:
        try:
            base = Settings()
        except ValidationError as exc:
            raise ConfigError(clip_line(_describe_with_env(exc))) from exc
        if overrides:
            # Flags are merged section by section so a flag does not wipe the
            # rest of its table coming from the file or environment.
            try:
                base = Settings.model_validate(_merge(base.model_dump(), overrides))
            except ValidationError as exc:
                raise ConfigError(clip_line(_with_hint(exc))) from exc
    finally:
        Settings._toml_data = None
    return base


# -- reading the file: bounded ------------------------------------------------------------

#: A configuration file larger than this is refused unread (the examples are 2 KB). Units: bytes.
MAX_CONFIG_BYTES = 1 << 20
#: Most parts of one key or table name (``a.b.c`` has 3): tomllib's time grows with their square.
MAX_KEY_PARTS = 32
#: Deepest nesting of arrays and inline tables, and of tables in the parsed result.
MAX_NESTING = 32
#: Most keys and array items in the whole file, counted after parsing.
MAX_ENTRIES = 10_000
#: Longest run of an error line echoed from a value; longer runs are cut, saying the full length.
MAX_ECHO_CHARS = 100
#: Longest error line (after cutting values), cut beyond that, saying the full length.
MAX_LINE_CHARS = 1000

_LONG_RUN = re.compile(r"\S{%d,}" % (MAX_ECHO_CHARS + 1))


def clip_line(text: str) -> str:
    """``text`` as one bounded line: every run of more than MAX_ECHO_CHARS characters without a
    space (a value echoed back) is cut to its first MAX_ECHO_CHARS with its full length noted,
    line breaks become spaces, and what is still above MAX_LINE_CHARS is cut, saying so."""
    text = " ".join(text.splitlines())
    text = _LONG_RUN.sub(lambda m: f"{m.group()[:MAX_ECHO_CHARS]}...[{len(m.group())} characters]", text)
    if len(text) > MAX_LINE_CHARS:
        text = f"{text[:MAX_LINE_CHARS]}...[{len(text)} characters in all]"
    return text


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    if isinstance(exc, MemoryError):
        return "too large to hold in memory"
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return "a number with too many digits"
    return str(exc) or type(exc).__name__


#: What the prescan stops at: a string or comment opening, a bracket, a key separator, a newline.
_SCAN = re.compile(r"[\"'#\[\]{}=,\n.]")


def _prescan(text: str) -> str | None:
    """Why ``text`` is refused before tomllib sees it, or None: a key or table name of more than
    MAX_KEY_PARTS parts (tomllib's work grows with their square), arrays and inline tables nested
    deeper than MAX_NESTING, more than MAX_ENTRIES keys, table headers and commas. Strings and comments
    are skipped; this only bounds the work, tomllib judges the syntax. Linear in ``text``."""
    depth = dots = entries = 0
    line = 1
    after_equals = False  # on this line, outside brackets: a value's '[' is no table header
    pos, end = 0, len(text)
    search = _SCAN.search
    while True:
        m = search(text, pos)
        if m is None:
            return None
        c, pos = m.group(), m.end()
        if c == ".":
            dots += 1  # a float or a time has one; only a key has more
            if dots >= MAX_KEY_PARTS:
                return f"line {line}: a key or table name of more than {MAX_KEY_PARTS} parts"
        elif c in "\"'":  # a quoted part of a key ("a"."b") is still the same key: dots go on
            if text.startswith(c * 3, pos - 1):  # multi-line: to the closing triple quote
                pos += 2
                while True:
                    close = text.find(c * 3, pos)
                    if close < 0:
                        return None  # unterminated: tomllib says where
                    line += text.count("\n", pos, close)
                    if c == '"' and _escaped(text, close, pos):
                        pos = close + 1
                        continue
                    pos = close + 3
                    while pos < end and pos < close + 5 and text[pos] == c:  # up to two quotes inside
                        pos += 1
                    break
            else:  # one line: to the closing quote or the line's end
                nl = text.find("\n", pos)
                nl = end if nl < 0 else nl
                while True:
                    close = text.find(c, pos, nl)
                    if close < 0:
                        pos = nl
                        break
                    escaped = c == '"' and _escaped(text, close, pos)
                    pos = close + 1
                    if not escaped:
                        break
        else:
            dots = 0
            if c == "\n":
                line += 1
                after_equals = False
            elif c == "#":
                nl = text.find("\n", pos)
                pos = end if nl < 0 else nl
            elif c in "=," or (c == "[" and depth == 0 and not after_equals):  # a key, an item, a [table]
                entries += 1
                if entries > MAX_ENTRIES:
                    return f"line {line}: more than {MAX_ENTRIES} keys, tables and array items"
                after_equals = after_equals or (c == "=" and depth == 0)
            if c in "[{":
                depth += 1
                if depth > MAX_NESTING:
                    return f"line {line}: arrays or inline tables nested more than {MAX_NESTING} deep"
            elif c in "]}":
                depth = max(0, depth - 1)


def _escaped(text: str, quote: int, start: int) -> bool:
    """Whether the quote at ``quote`` follows an odd run of backslashes (none before ``start``)."""
    i = quote
    while i > start and text[i - 1] == "\\":
        i -= 1
    return (quote - i) % 2 == 1


def _count_entries(data: Any) -> str | None:
    """Why the parsed tables are refused, or None: more than MAX_ENTRIES keys and items, or
    nested more than MAX_NESTING deep (no recursion: a stack)."""
    count = 0
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"nested more than {MAX_NESTING} deep"
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            count += 1
            if count > MAX_ENTRIES:
                return f"more than {MAX_ENTRIES} keys and array items"
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of the TOML file at ``path``, read once and with bounded work, or
    :class:`ConfigError` with one line naming the file: unreadable, not a regular file, above
    MAX_CONFIG_BYTES, not UTF-8, invalid TOML, nested too deep, too many keys, a number of more
    digits than Python converts. Never anything else."""
    toml_path = Path(path)
    try:
        fd = os.open(toml_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"{toml_path}: cannot read: not a regular file")
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{toml_path}: too large: {st.st_size} bytes, the most is {MAX_CONFIG_BYTES} "
                                  "(1 MiB)")
            with os.fdopen(fd, "rb", closefd=True) as fh:
                fd = -1
                raw = fh.read(MAX_CONFIG_BYTES + 1)
        finally:
            if fd >= 0:
                os.close(fd)
    except OSError as exc:
        raise ConfigError(clip_line(f"{toml_path}: cannot read: {exc.strerror or exc}")) from None
    if len(raw) > MAX_CONFIG_BYTES:  # grew since fstat, or a device
        raise ConfigError(f"{toml_path}: too large: more than {MAX_CONFIG_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{toml_path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, "
                          f"column {column}") from None
    why = _prescan(text)
    if why is None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(clip_line(f"{toml_path}: invalid TOML: {exc}")) from None
        except (RecursionError, MemoryError, ValueError) as exc:
            raise ConfigError(f"{toml_path}: invalid TOML: {_exc_text(exc)}") from None
        why = _count_entries(data)
    if why is not None:
        raise ConfigError(f"{toml_path}: refused: {why}")
    return data


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


def _table_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model of a field that is a table or an array of tables, and whether it is an array
    (``list[TouBand] | None`` → (TouBand, True)); (None, False) for a plain value."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in typing.get_args(annotation):
        model, array = _table_of(arg)
        if model is not None:
            return model, array or typing.get_origin(annotation) is list
    return None, False


def setting_tables(model: type[BaseModel] | None = None, above: str = "") -> dict[str, bool]:
    """Every table a configuration file may hold, dotted as in TOML (``host.ipmi``,
    ``tariff.bands``), and whether it is an array of tables (``[[tariff.bands]]``)."""
    out: dict[str, bool] = {}
    for name, field in (model or Settings).model_fields.items():
        sub, array = _table_of(field.annotation)
        if sub is not None:
            out[above + name] = array
            out.update(setting_tables(sub, f"{above}{name}."))
    return out


def setting_keys(
    model: type[BaseModel] | None = None, above: tuple[str, ...] = (), in_array: bool = False
) -> dict[str, str | None]:
    """Every key a configuration file may set, dotted as in TOML (``tariff.bands.price_per_kwh``
    is ``price_per_kwh`` of a ``[[tariff.bands]]``), with the ``GPUCOST_*`` variable that sets it;
    None for a key of an array of tables, which its array's variable sets whole (as JSON)."""
    out: dict[str, str | None] = {}
    for name, field in (model or Settings).model_fields.items():
        path = (*above, name)
        sub, array = _table_of(field.annotation)
        if sub is None:
            out[".".join(path)] = None if in_array else _env_name(path)
        else:
            out.update(setting_keys(sub, path, in_array or array))
    return out


def did_you_mean(loc: Sequence[Any]) -> str | None:
    """The setting nearest to the unknown key at ``loc`` (a validation error's location, as
    ``("agent", "tick_secnds")`` or ``("tariff", "bands", 0, "nmae")``), or None."""
    model: type[BaseModel] | None = Settings
    names = [part for part in loc if isinstance(part, str)]
    for part in names[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _table_of(field.annotation)[0]
    if model is None or not names:
        return None
    import difflib  # only for a key that names no setting

    hint = difflib.get_close_matches(names[-1].lower(), list(model.model_fields), n=1, cutoff=0.6)
    return hint[0] if hint else None


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
    errors = exc.errors(include_url=False)
    for i, err in enumerate(errors):
        origin = _env_origin(tuple(err.get("loc", ())))
        if origin is not None:
            return f"{origin}: {format_validation_error(exc, index=i)}"
    return _with_hint(exc)


def _with_hint(exc: ValidationError) -> str:
    """The first error's line; for an unknown key, with ``; did you mean KEY?``. A required key
    that is missing because it was misspelt is told as the misspelt key, with its hint."""
    errors = exc.errors(include_url=False)
    hints = {i: did_you_mean(tuple(e.get("loc", ()))) for i, e in enumerate(errors)
             if e.get("type") == "extra_forbidden"}
    index = 0
    if errors and errors[0].get("type") == "missing":
        missing = {tuple(e.get("loc", ())) for e in errors if e.get("type") == "missing"}
        for i, hint in hints.items():
            if hint is not None and (*tuple(errors[i].get("loc", ()))[:-1], hint) in missing:
                index = i
                break
    line = format_validation_error(exc, index=index)
    hint = hints.get(index)
    return line.replace("unknown setting", f"unknown setting; did you mean {hint}?", 1) if hint else line
