"""Command line: ``gpu-cost-agent run | demo | record | replay | check-config | report``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .accounting import Ledger
from .config import ConfigError, Refused, Settings, clip_line, load, unknown_env_vars
from .http import Listener, ListenError, open_listener
from .sampler import Sampler, resume_point
from .service import POD_RESOURCES_INTERVAL_SECONDS, Service, defer_sighup_until_serving
from .state import StateError, StateStore, default_state_dir

log = logging.getLogger("agent")


def demo_trace_path() -> Path:
    """The demo's H100 trace (agent/data/h100_demo.jsonl.gz, built by fixtures/make_demo_trace.py):
    a real recording of two users' processes sharing one H100, with who each process was."""
    return Path(str(resources.files("agent") / "data" / "h100_demo.jsonl.gz"))


def bundled_config_path() -> Path:
    """The demo's example configuration (agent/data/demo.toml): a time-of-use tariff, PUE, carbon, hardware."""
    return Path(str(resources.files("agent") / "data" / "demo.toml"))


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    _override_args(p)


def _override_args(p: argparse.ArgumentParser) -> None:
    """Flags that override the configuration: the serving commands' and check-config's."""
    p.add_argument("--listen", metavar="HOST:PORT", help="address of /metrics (default 0.0.0.0:9842)")
    p.add_argument("--tick", metavar="SECONDS", type=float, help="sampling interval (trace time for replays)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--state-dir", metavar="DIR", help="where totals are persisted (see [agent] state_dir)")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS and basic auth for the endpoint, in the Prometheus exporters' web-config format")


def _speed(text: str) -> float:
    """``--speed``: a finite number above 0, refused by the argument parser before anything starts."""
    try:
        speed = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 < speed < float("inf")):
        raise argparse.ArgumentTypeError(f"must be greater than 0 and finite, got {text}")
    return speed


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed", type=_speed, default=1.0, help="times real time (default 1)")
    p.add_argument(
        "--hide",
        action="append",
        default=[],
        choices=["energy_mj", "samples"],
        help="pretend the GPU lacks the energy counter or the power-sample buffer",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-cost-agent",
        description="Live, exact GPU energy and cost, served to Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"gpu-cost-agent {__version__}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="sample the node's GPUs through NVML and serve /metrics")
    _serving_args(p)

    p = sub.add_parser("demo", help="replay the bundled H100 trace (two users' processes) in a loop and serve /metrics")
    _serving_args(p)
    _replay_args(p)

    p = sub.add_parser("replay", help="play a recorded trace once, then keep serving its final state")
    p.add_argument("trace", metavar="TRACE")
    _serving_args(p)
    _replay_args(p)
    p.add_argument("--loop", action="store_true", help="repeat the trace forever")

    p = sub.add_parser("check-config", help="validate a configuration and print the effective tariff table")
    p.add_argument("file", metavar="FILE")
    replayed = p.add_mutually_exclusive_group()
    replayed.add_argument("--demo", action="store_true",
                          help="check it as 'demo' uses it: the host model describes the bundled trace's host")
    replayed.add_argument("--trace", metavar="TRACE",
                          help="check it as 'replay TRACE' uses it: the host model describes the recorded host")
    _override_args(p)

    p = sub.add_parser("record", help="record live NVML readings to a trace file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace to write (.jsonl or .jsonl.gz)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to record (0 = until Ctrl-C)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between rows (default 0.1)")
    p.add_argument("--energy-interval", type=float, default=0.1, help="seconds between energy counter reads")
    p.add_argument("--samples-interval", type=float, default=1.0, help="seconds between power-buffer reads")
    p.add_argument("--note", default="", help="free text stored in the header (what load ran)")

    # Handled in main() before parsing, by agent.report (never imported by the daemon).
    sub.add_parser("report", add_help=False,
                   help="write the bill of a period (CSV, FOCUS, JSON, HTML) from Prometheus or per-job records")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    agent: dict[str, Any] = {}
    if getattr(args, "listen", None):
        agent["listen"] = args.listen
    if getattr(args, "tick", None) is not None:
        agent["tick_seconds"] = args.tick
    if getattr(args, "log_level", None):
        agent["log_level"] = args.log_level
    if getattr(args, "state_dir", None):
        agent["state_dir"] = args.state_dir
    if getattr(args, "web_config_file", None):
        agent["web_config_file"] = args.web_config_file
    return {"agent": agent} if agent else {}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _make_ledger(settings: Settings) -> Ledger:
    return Ledger.from_settings(settings)


def _attribution(settings: Settings, ledger: Ledger, *, replay: bool, identities: Any = None) -> Any:
    """The workload attribution stage, or None when ``[attribution] enabled = false``."""
    from .attribution.split import from_settings

    stage = from_settings(settings, ledger.workloads, replay=replay, identities=identities)
    if stage is not None and stage.pods is not None:
        log.info("pod names from the kubelet: on (%s, asked every %.0f s)",
                 settings.attribution.pod_resources_socket, POD_RESOURCES_INTERVAL_SECONDS)
    return stage


#: Where loaded totals end on this boot (see agent.sampler.resume_point): nothing to bridge.
_NO_RESUME: tuple[dict[str, tuple[int, float]], float | None, Any] = ({}, None, None)


def _open_state(
    settings: Settings, ledger: Ledger, *, replay: bool
) -> tuple[StateStore | None, tuple[dict[str, tuple[int, float]], float | None, Any], Any]:
    """The state store, with its totals loaded into ``ledger``, where those totals end on this
    boot (for the sampler to bridge the time no agent ran), and the state loaded (None: none
    or set aside; its ``agent_counters`` go to the sampler). Raises StateError."""
    directory = settings.agent.state_dir
    if directory is None:
        if replay:
            return None, _NO_RESUME, None  # a replay's totals are not the node's: kept only when asked
        directory = default_state_dir()
    store = StateStore(directory)
    store.check_writable()
    store.remove_stale_temp_files()
    state = store.load()
    resume = _NO_RESUME
    while state is not None:
        try:
            found = resume_point(state)  # checked first: all or nothing
            ledger.load_state(state)  # all or nothing: on error the ledger stays at zero
            resume = found
        except Exception as exc:  # whatever is wrong with the file, the agent starts
            rejected = store.loaded_path
            store.reject(str(exc) or type(exc).__name__)
            # A recent (unsynced) file set aside: the synced one, if any, is tried next.
            state = store.load() if rejected == store.recent_path else None
        else:
            log.info("totals continue from %s (saved at %s)", store.loaded_path, state.get("saved_at"))
            break
    return store, resume, state


#: Loads the configuration again for SIGHUP (set by main for the serving commands).
_reload: Any = None


@dataclass
class Checked:
    """A configuration that passed :func:`validate`, with what the checks built on the way."""

    settings: Settings
    #: The endpoint's TLS and basic auth (an ``agent.webconfig.WebConfig``, imported only when a
    #: web-config file is named); None: plain HTTP, no auth.
    web: Any
    #: For ``run``: the host power source, built quietly (announce it when put to use); None
    #: when ``[host]`` is disabled and for replays (they model the recorded host).
    host: Any = None


def _quiet_logger() -> logging.Logger:
    quiet = logging.getLogger("agent.check")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    return quiet


def validate(config_path: str | None, overrides: dict[str, Any], *, trace: Any = None) -> Checked:
    """The one check of a configuration that ``run``, ``demo``, ``replay``, ``check-config`` and
    SIGHUP share, so that each refuses exactly what the others refuse, with the same line.

    Every value (:func:`agent.config.load`; the CPU model against the host it will describe:
    this machine, or ``trace``'s recorded host), the web-config file, and, without a trace, the
    host power source as ``run`` builds it (``[host] mode = "rapl"`` without RAPL is refused).
    Logs nothing. Raises :class:`~agent.config.Refused`.
    """
    try:
        settings = load(config_path, overrides, cpu_host=_cpu_host(trace))
        web = None
        if settings.agent.web_config_file:
            from .webconfig import load as load_web_config  # only with a web-config file

            web = load_web_config(settings.agent.web_config_file)
    except ConfigError as exc:  # WebConfigError is one
        raise Refused(f"config error: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 — nothing a file holds may end a command or the daemon
        where = f"{config_path}: " if config_path else ""
        raise Refused(clip_line(f"config error: {where}cannot be used: {type(exc).__name__}: {exc}")) from exc
    host = None
    if settings.host.enabled and trace is None:
        from .sources.host import HostPowerSource
        from .sources.rapl import RaplUnavailable

        try:
            host = HostPowerSource(settings.host, logger=_quiet_logger())
        except RaplUnavailable as exc:  # only with [host] mode = "rapl": the reason says so
            raise Refused(exc.reason) from exc
    return Checked(settings, web, host)


def _serve(settings: Settings, sampler: Sampler, store: StateStore | None, listener: Listener, **kw: Any) -> int:
    return Service(settings, sampler, store=store, listener=listener, reload=_reload, **kw).run_forever()


def _load_trace(path: Path) -> Any:
    """The trace at ``path``, or None after saying on stderr why it cannot be played."""
    from .trace import TraceError
    from .trace import load as load_trace

    try:
        return load_trace(path)
    except TraceError as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return None


def _cpu_host(trace: Any) -> Any:
    """The machine the host model describes: this one (``run``), or a replayed trace's host."""
    if trace is None:
        return "local"
    from .sources.replay import recorded_host

    return recorded_host(trace)


def _serve_replay(
    settings: Settings, listener: Listener, trace: Any, trace_path: Path, args: argparse.Namespace, loop: bool
) -> int:
    from .sources.replay import ReplaySource

    source = ReplaySource(trace, loop=loop, hide=args.hide)
    log.info(
        "replaying %s (%s, %.1f s) at %gx%s — this is recorded data, not this node",
        trace_path,
        _count(len(source.devices()), "GPU"),
        source.duration_seconds,
        args.speed,
        ", looping" if loop else "",
    )
    # The configuration was checked against the trace's host (load's cpu_host), so this holds.
    host = source.host_source(settings.host) if settings.host.enabled else None
    ledger = _make_ledger(settings)
    store, _, loaded = _open_state(settings, ledger, replay=True)
    if loop:
        # A looping demo runs forever: price it at today's wall time (today's
        # tariff band), anchored now and advancing with the trace. A single
        # replay keeps the recorded times, so its cost is the recorded day's.
        offset = time.time() - source.t
        clock = lambda: (source.t + offset, source.t)  # noqa: E731
    else:
        clock = lambda: (source.t, source.t)  # noqa: E731
    sampler = Sampler(
        source,
        clock=clock,
        energy_method=settings.gpu.energy_method,
        counter_interval=settings.gpu.energy_counter_interval_seconds,
        tick_seconds=settings.agent.tick_seconds,
        host=host,
        ledger=ledger,
        attribution=_attribution(settings, ledger, replay=True, identities=source.identities),
    )
    sampler.continue_agent_counters(loaded)
    return _serve(settings, sampler, store, listener, replay=source, speed=args.speed)


#: How long `run` waits for NVML to open at start before it serves without GPUs (and keeps trying). Units: s.
NVML_OPEN_TIMEOUT_SECONDS = 10.0


def _serve_nvml(settings: Settings, host: Any, listener: Listener) -> int:
    from .gpucalls import Pending
    from .sampler import probe_methods
    from .sources.gpu import SourceUnavailable
    from .sources.nvml import NvmlGpuSource

    def open_source() -> tuple[NvmlGpuSource, dict[int, str]]:
        source = NvmlGpuSource()
        return source, probe_methods(source, settings.gpu.energy_method)

    if host is not None:  # built by validate, before anything started
        host.announce(logging.getLogger("agent.sources.host"))
    source = None
    methods = None
    error = ""
    if settings.gpu.enabled:
        # On its own thread: an NVML that hangs at init must not keep the agent from serving.
        first = Pending(open_source, "nvml-open")
        outcome = first.wait(NVML_OPEN_TIMEOUT_SECONDS)
        if outcome is None:
            error = f"NVML did not answer within {NVML_OPEN_TIMEOUT_SECONDS:.0f} s"
        elif outcome[0]:
            source, methods = outcome[1]
        elif isinstance(outcome[1], SourceUnavailable):
            error = str(outcome[1])
        else:
            raise outcome[1]
        if source is None:
            log.error(
                "no GPU can be read: %s. Serving host and agent metrics only "
                "(gpucost_gpu_source_up 0) and trying again with back-off; "
                "use 'gpu-cost-agent demo' to see recorded data.",
                error,
            )
    else:
        error = "GPU sampling disabled in the configuration ([gpu] enabled = false)"
    ledger = _make_ledger(settings)
    store, resume, loaded = _open_state(settings, ledger, replay=False)
    sampler = Sampler(
        source,
        host=host,
        energy_method=settings.gpu.energy_method,
        counter_interval=settings.gpu.energy_counter_interval_seconds,
        tick_seconds=settings.agent.tick_seconds,
        source_kind="nvml",
        source_error=error,
        ledger=ledger,
        wall_cost_basis=settings.host.ipmi.enabled and settings.host.ipmi.cost_basis == "wall",
        attribution=_attribution(settings, ledger, replay=False) if settings.gpu.enabled else None,
        methods=methods,
    )
    sampler.resume_counters(*resume)
    sampler.continue_agent_counters(loaded)
    retry = open_source if settings.gpu.enabled and source is None else None
    # An open still hanging is waited for, not joined by a second one (which would hang too).
    hanging = first if retry is not None and outcome is None else None
    return _serve(settings, sampler, store, listener, open_source=retry, open_pending=hanging)


def _record(args: argparse.Namespace) -> int:
    from .record import record
    from .sources.gpu import SourceUnavailable
    from .sources.nvml import NvmlGpuSource

    try:
        source = NvmlGpuSource()
    except SourceUnavailable as exc:
        print(f"gpu-cost-agent record: no GPU can be read: {exc}", file=sys.stderr)
        return 1
    try:
        rows = record(
            source,
            args.output,
            duration=args.duration,
            interval=args.interval,
            energy_interval=args.energy_interval,
            samples_interval=args.samples_interval,
            note=args.note,
        )
    finally:
        source.close()
    print(f"wrote {_count(rows, 'row')} for {_count(len(source.devices()), 'GPU')} to {args.output}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .cost import Amortization, Tariff, tariff_table

    path = args.file
    trace = None
    if args.demo or args.trace:
        trace = _load_trace(demo_trace_path() if args.demo else Path(args.trace))
        if trace is None:
            return 2
    try:
        checked = validate(path, _overrides(args), trace=trace)
    except Refused as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 2
    settings, web = checked.settings, checked.web
    for line in unknown_env_vars() + config_warnings(settings, replay=trace is not None):
        print(f"gpu-cost-agent: warning: {line}", file=sys.stderr)
    host_line = "host power: disabled ([host] enabled = false)"
    if checked.host is not None:
        host_line = checked.host.describe()
    elif settings.host.enabled and trace is not None:  # what a replay models: the recorded host
        from .sources.replay import ReplaySource

        replayed = ReplaySource(trace).host_source(settings.host)
        host_line = replayed.describe() if replayed is not None else "host power: none (the trace has no host readings)"
    a = settings.agent
    print(f"{path}: OK")
    print(host_line)
    if web is not None:
        print(f"web config {web.path}: OK ({web.describe()})")
    ipmi = settings.host.ipmi
    if ipmi.enabled and trace is None:
        print(f"BMC wall power: `{' '.join(ipmi.command)}` every {ipmi.interval_seconds:g} s (timeout "
              f"{ipmi.timeout_seconds:g} s), cost basis {ipmi.cost_basis}")
    print(f"listen {a.listen}, tick {a.tick_seconds:g} s, energy counter every "
          f"{settings.gpu.energy_counter_interval_seconds:g} s, energy method {settings.gpu.energy_method}")
    print(f"state dir {a.state_dir or default_state_dir()} (persisted every {a.persist_interval_seconds:g} s)")
    p = settings.pue
    print(f"PUE: {p.value:g}" if not (p.by_month or p.bands) else "PUE: schedule (" + ("by month" if p.by_month else "hour bands") + ")")
    c = settings.carbon
    print("carbon: " + ("not set (no emissions exported)" if not c.enabled else
                        f"{c.grams_per_kwh:g} g CO2e/kWh" if c.grams_per_kwh is not None else "schedule"))
    amort = Amortization(settings.hardware)
    if amort.enabled:
        print(f"hardware: {settings.hardware_currency} {amort.node_cost_per_hour():.4f}/h for the node, "
              f"{amort.gpu_cost_per_hour(0):.4f}/h per GPU (GPU 0; overrides by index or model apply)")
    for line in _running_and_cloud_lines(settings):
        print(line)
    print(f"idle: GPU utilisation below {settings.idle.utilization_threshold:.0%} counts as idle")
    at = settings.attribution
    if not at.enabled:
        print("attribution: off ([attribution] enabled = false): no workload series")
    else:
        idle = ("lowest power seen on two 0 % utilisation ticks in a row (H100 80GB HBM3: 70 W until then)"
                if at.idle_watts is None else
                f"{at.idle_watts:g} W" if isinstance(at.idle_watts, (int, float)) else
                ", ".join(f"{k} {v:g} W" for k, v in sorted(at.idle_watts.items())))
        pods = "off"
        if at.pod_resources:  # run goes without pod names where the socket is missing, and says so
            pods = f"on ({at.pod_resources_socket}" + (
                ")" if at.pod_resources_socket.exists() else ", not there now: run goes without pod names until restarted)")
        print(f"attribution: at most {at.max_workloads} workloads (then 'other'), kept {at.retention_seconds:g} s "
              f"after they end, SM window {at.window_seconds:g} s, idle power {idle}, user names "
              f"{'on' if at.user_names else 'off'}, pod names from the kubelet {pods}")
    if settings.tariff is None:
        print("tariff: none ([tariff] absent): energy is exported, cost is not")
    else:
        print()
        print(tariff_table(Tariff(settings.tariff)))
    return 0


def _running_and_cloud_lines(settings: Settings) -> list[str]:
    """check-config's lines on running costs, cloud prices and the fully loaded GPU-hour."""
    from .cost import PERIOD_SECONDS
    from .cost.gpuhour import break_even, gpu_hour, week_average_price

    lines = []
    for item in settings.running_costs:
        cur = item.currency or settings.hardware_currency
        where = "for the node" if item.scope == "node" else "per GPU"
        extra = f" ({_count(len(item.gpus), 'per-GPU override')})" if item.gpus else ""
        lines.append(f"running cost {item.name!r}: {item.amount:g} {cur}/{item.period} {where}{extra} "
                     f"= {item.amount / PERIOD_SECONDS[item.period] * 3600:.4f} {cur}/h")
    for c in settings.cloud_prices:
        lines.append(f"cloud price: {c.model} {c.price_per_gpu_hour:g} {c.currency} per GPU-hour "
                     f"({c.provider}, {c.offering})")
    currency = settings.hardware_currency
    if currency is None:
        return lines
    levels = [gpu_hour(settings, load) for load in (0.0, 0.5, 1.0)]
    if not any(h.total(currency) for h in levels):
        return lines
    plan = settings.planning
    basis = (f"{_count(plan.gpus_per_node, 'GPU')} per node, GPU {plan.gpu_idle_watts:g}-{plan.gpu_full_watts:g} W, "
             f"host {plan.host_watts:g} W")
    if settings.tariff is not None:
        basis += (f", the tariff's week average {week_average_price(settings.tariff):.4f} "
                  f"{settings.tariff.currency}/kWh, PUE {settings.pue.average():.3g}")
    lines.append(f"one GPU-hour, fully loaded ([planning]: {basis}):")
    for name, h in zip(("idle", "50 %", "full"), levels):
        parts = [f"energy {h.energy:.4f}" if h.energy is not None else "energy -",
                 f"hardware {h.hardware:.4f}" if h.hardware is not None else "hardware -",
                 f"running {h.running.get(currency, 0.0):.4f}"]
        lines.append(f"  {name:>4} ({h.gpu_watts:g} W): {' + '.join(parts)} = {h.total(currency):.4f} "
                     f"{currency} per GPU-hour")
    for c in settings.cloud_prices:
        if c.currency != currency:
            lines.append(f"  break-even against {c.provider} {c.offering} {c.model}: not computed "
                         f"({c.currency} is not {currency})")
            continue
        u = break_even(levels[0], levels[2], c.price_per_gpu_hour, currency)
        lines.append(f"  break-even against {c.provider} {c.offering} {c.model} at {c.price_per_gpu_hour:g} "
                     f"{currency}/GPU-hour: " + ("renting is cheaper at any utilisation" if u is None else
                                                 f"owning is cheaper above {u:.1%} utilisation"))
    return lines


def _count(n: int, word: str) -> str:
    """``1 GPU``, ``2 GPUs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def config_warnings(settings: Settings, *, replay: bool) -> list[str]:
    """What is wrong with a configuration that is used all the same, one line each: check-config
    prints them, the agent logs them at start and on SIGHUP. ``replay``: no BMC is polled."""
    lines = []
    if settings.tariff is not None:
        holidays = settings.tariff.holidays_warning(time.time())
        if holidays is not None:
            lines.append(holidays)
    ipmi = settings.host.ipmi
    if ipmi.enabled and not replay:
        from .sources.ipmi import command_problem

        problem = command_problem(ipmi)
        if problem is not None:
            lines.append(f"[host.ipmi] is enabled, but {problem}: no wall power is read and every poll (each "
                         f"{ipmi.interval_seconds:g} s) counts a dcmi error; install ipmitool or set "
                         "[host.ipmi] command")
    return lines


def _log_tariff(settings: Settings, origin: str, command: str) -> None:
    """Say once, at start, which tariff prices the energy and where it came from."""
    t = settings.tariff
    if t is None:
        log.warning(
            "no [tariff] in the configuration%s: energy is exported, cost is not "
            "(add a [tariff] table, see docs/cost.md)",
            f" ({origin})" if origin else "",
        )
        return
    from .cost import Tariff

    price, band = Tariff(t).price_at(time.time())
    kind = f"flat {t.flat_price_per_kwh:g} {t.currency}/kWh" if t.bands is None else (
        f"time-of-use in {t.timezone}, {len(t.bands)} bands, now {price:g} {t.currency}/kWh (band {band})"
    )
    env = sorted(k for k in os.environ if k.upper().startswith("GPUCOST_TARIFF__"))
    sources = [f"the environment ({', '.join(env)})"] if env else []
    if origin:
        sources.append(origin)
    log.info("tariff: %s, from %s", kind, " over ".join(sources) or "the environment")


def _nvml_present() -> bool:
    from .sources.gpu import SourceUnavailable
    from .sources.nvml import NvmlGpuSource

    try:
        NvmlGpuSource().close()
        return True
    except SourceUnavailable:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gpu-cost-agent`` command. A reader that goes away (``check-config FILE | head -3``)
    ends it quietly, as it ends ``cat``: exit status 141 (128 + SIGPIPE), no traceback."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could no longer be caught
        return status
    except BrokenPipeError:
        # What is still buffered for stdout would fail again at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from .report.cli import main as report

        return report(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # No command: the quick start. Real GPUs when NVML answers, otherwise
        # the demo replay, said loudly (the metrics say source="replay" too).
        if _nvml_present():
            args = parser.parse_args(["run"])
        else:
            print(
                "gpu-cost-agent: no NVIDIA GPU can be read on this machine; starting the demo, a replay of a "
                "recorded H100 trace (source=\"replay\"), NOT this node's data. Use 'gpu-cost-agent run' in production.",
                file=sys.stderr,
            )
            args = parser.parse_args(["demo"])
    if args.command == "record":
        _setup_logging("info")
        return _record(args)
    if args.command == "check-config":
        return _check_config(args)
    # From here a SIGHUP is held until the agent serves, then acted on: never the default (exit).
    defer_sighup_until_serving()
    config_path, origin = args.config, f"the file {args.config}" if args.config else ""
    if config_path is None and args.command == "demo":
        config_path = str(bundled_config_path())
        origin = f"the demo's bundled example config ({config_path}; --config FILE replaces it)"
    trace = trace_path = None
    if args.command in ("demo", "replay"):
        # Read first: the configuration is checked against the host the trace recorded.
        trace_path = demo_trace_path() if args.command == "demo" else Path(args.trace)
        trace = _load_trace(trace_path)
        if trace is None:
            return 2
    try:
        checked = validate(config_path, _overrides(args), trace=trace)
        settings = checked.settings
        # Bound before anything starts, so a taken port is the first and only thing said.
        listener = open_listener(settings.agent.listen, checked.web)
    except Refused as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 1
    _setup_logging(settings.agent.log_level)
    for line in unknown_env_vars() + config_warnings(settings, replay=args.command != "run"):
        log.warning("%s", line)
    _log_tariff(settings, origin, args.command)
    if listener.web is not None:
        log.info("web config %s: %s", listener.web.path, listener.web.describe())

    def reload() -> Checked:
        new = validate(config_path, _overrides(args), trace=trace)  # as at start: raises Refused
        for line in config_warnings(new.settings, replay=args.command != "run"):
            log.warning("%s", line)
        _log_tariff(new.settings, origin, args.command)
        return new

    global _reload
    _reload = reload
    try:
        if args.command == "run":
            return _serve_nvml(settings, checked.host, listener)
        assert trace_path is not None
        return _serve_replay(settings, listener, trace, trace_path, args, loop=args.command == "demo" or args.loop)
    except StateError as exc:  # a state directory that cannot be written: refuse to start
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        listener.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
