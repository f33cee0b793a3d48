"""Test helpers importable from every test module."""

from __future__ import annotations

from pathlib import Path

from agent.sampler import Sampler
from agent.sources.replay import ReplaySource
from agent.trace import Trace


ROOT = Path(__file__).resolve().parents[1]
H100_TRACE = ROOT / "fixtures" / "h100_trace_a.jsonl"


def counter_delta_joules(trace: Trace, gpu: str = "0") -> float:
    """The trace's own hardware-counter delta from first to last row: the truth. Units: J."""
    values = [r["gpus"][gpu]["energy_mj"] for r in trace.rows if r["gpus"].get(gpu, {}).get("energy_mj") is not None]
    return (values[-1] - values[0]) / 1000.0


def replay_through_sampler(
    trace: Trace,
    *,
    tick: float = 1.0,
    hide: tuple[str, ...] = (),
    method: str = "auto",
    counter_interval: float = 5.0,
    start_offset: float = 0.0,
) -> Sampler:
    """Play ``trace`` once through the real Sampler with a ``tick`` (trace seconds) and return it."""
    src = ReplaySource(trace, hide=hide)
    sampler = Sampler(src, clock=lambda: (src.t, src.t), energy_method=method, counter_interval=counter_interval)
    if start_offset:
        src.seek(src.t + start_offset)
    sampler.tick()
    while not src.finished:
        src.seek(src.t + tick)
        sampler.tick(final=src.finished)
    return sampler


def real_nvml_present() -> bool:
    """True on a machine with a working NVIDIA driver (where "no GPU" cannot be tested for real)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def exported_energy(sampler: Sampler, gpu: int = 0) -> float:
    return sum(sampler.snapshot.gpus[gpu].energy_joules.values())
