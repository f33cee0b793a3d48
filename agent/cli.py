"""Command line: ``gpu-cost-agent run | demo | record | replay``."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .config import ConfigError, Settings, load
from .sampler import Sampler
from .service import Service

log = logging.getLogger("agent")


def demo_trace_path() -> Path:
    """The bundled H100 trace (fixtures/h100_trace_a.jsonl, shipped inside the package)."""
    return Path(str(resources.files("agent") / "data" / "h100_trace_a.jsonl"))


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT", help="address of /metrics (default 0.0.0.0:9842)")
    p.add_argument("--tick", metavar="SECONDS", type=float, help="sampling interval (trace time for replays)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed", type=float, default=1.0, help="times real time (default 1)")
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

    p = sub.add_parser("demo", help="replay the bundled H100 trace in a loop and serve /metrics")
    _serving_args(p)
    _replay_args(p)

    p = sub.add_parser("replay", help="play a recorded trace once, then keep serving its final state")
    p.add_argument("trace", metavar="TRACE")
    _serving_args(p)
    _replay_args(p)
    p.add_argument("--loop", action="store_true", help="repeat the trace forever")

    p = sub.add_parser("record", help="record live NVML readings to a trace file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace to write (.jsonl or .jsonl.gz)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to record (0 = until Ctrl-C)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between rows (default 0.1)")
    p.add_argument("--energy-interval", type=float, default=0.1, help="seconds between energy counter reads")
    p.add_argument("--samples-interval", type=float, default=1.0, help="seconds between power-buffer reads")
    p.add_argument("--note", default="", help="free text stored in the header (what load ran)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    agent: dict[str, Any] = {}
    if getattr(args, "listen", None):
        agent["listen"] = args.listen
    if getattr(args, "tick", None) is not None:
        agent["tick_seconds"] = args.tick
    if getattr(args, "log_level", None):
        agent["log_level"] = args.log_level
    return {"agent": agent} if agent else {}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _serve_replay(settings: Settings, trace_path: Path, args: argparse.Namespace, loop: bool) -> int:
    from .sources.replay import ReplaySource
    from .trace import TraceError
    from .trace import load as load_trace

    try:
        trace = load_trace(trace_path)
    except TraceError as exc:
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 2
    if args.speed <= 0:
        print("gpu-cost-agent: --speed must be greater than 0", file=sys.stderr)
        return 2
    source = ReplaySource(trace, loop=loop, hide=args.hide)
    log.info(
        "replaying %s (%d GPUs, %.1f s) at %gx%s — this is recorded data, not this node",
        trace_path,
        len(source.devices()),
        source.duration_seconds,
        args.speed,
        ", looping" if loop else "",
    )
    host = source.host_source(settings.host) if settings.host.enabled else None
    sampler = Sampler(
        source,
        clock=lambda: (source.t, source.t),
        energy_method=settings.gpu.energy_method,
        counter_interval=settings.gpu.energy_counter_interval_seconds,
        host=host,
    )
    return Service(settings, sampler, replay=source, speed=args.speed).run_forever()


def _serve_nvml(settings: Settings) -> int:
    from .sources.gpu import SourceUnavailable
    from .sources.nvml import NvmlGpuSource

    source = None
    error = ""
    if settings.gpu.enabled:
        try:
            source = NvmlGpuSource()
        except SourceUnavailable as exc:
            error = str(exc)
            log.error(
                "no GPU can be read: %s. Serving host and agent metrics only "
                "(gpucost_gpu_source_up 0); use 'gpu-cost-agent demo' to see recorded data.",
                error,
            )
    else:
        error = "GPU sampling disabled in the configuration ([gpu] enabled = false)"
    host = None
    if settings.host.enabled:
        from .sources.host import HostPowerSource
        from .sources.rapl import RaplUnavailable

        try:
            host = HostPowerSource(settings.host)
        except RaplUnavailable as exc:  # only with [host] mode = "rapl"
            print(f"gpu-cost-agent: host.mode = \"rapl\" but RAPL cannot be read: {exc.reason}", file=sys.stderr)
            return 2
        log.info(host.describe())
    sampler = Sampler(
        source,
        host=host,
        energy_method=settings.gpu.energy_method,
        counter_interval=settings.gpu.energy_counter_interval_seconds,
        source_kind="nvml",
        source_error=error,
    )
    return Service(settings, sampler).run_forever()


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
    print(f"wrote {rows} rows for {len(source.devices())} GPU(s) to {args.output}")
    return 0


def _nvml_present() -> bool:
    from .sources.gpu import SourceUnavailable
    from .sources.nvml import NvmlGpuSource

    try:
        NvmlGpuSource().close()
        return True
    except SourceUnavailable:
        return False


def main(argv: Sequence[str] | None = None) -> int:
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
    try:
        settings = load(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"gpu-cost-agent: config error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.agent.log_level)
    try:
        if args.command == "run":
            return _serve_nvml(settings)
        if args.command == "demo":
            return _serve_replay(settings, demo_trace_path(), args, loop=True)
        return _serve_replay(settings, Path(args.trace), args, loop=args.loop)
    except OSError as exc:  # e.g. the port is taken
        print(f"gpu-cost-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
