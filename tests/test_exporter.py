"""The collector renders the snapshot only: no source call at scrape time, absent stays absent."""

from __future__ import annotations

from fakes import FakeGpu, FakeSource, make_sampler
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.exporter import health_of, make_registry
from agent.sampler import Sampler


def test_scrape_makes_no_source_call():
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src)
    reg = make_registry(lambda: s.snapshot)
    before = dict(src.calls)
    for _ in range(20):
        generate_latest(reg)
    assert src.calls == before


def test_names_types_and_units_follow_conventions():
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src)
    src.t += 5
    s.tick(final=True)
    text = generate_latest(make_registry(lambda: s.snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("gpucost_gpu_info", "gpucost_gpu_up", "gpucost_gpu_power_watts", "gpucost_gpu_utilization_ratio",
                 "gpucost_gpu_memory_used_bytes", "gpucost_gpu_temperature_celsius", "gpucost_gpu_power_limit_watts",
                 "gpucost_agent_info", "gpucost_build_info", "gpucost_agent_last_sample_timestamp_seconds",
                 "gpucost_agent_sample_duration_seconds"):
        assert families[name].type == "gauge", name
    for name in ("gpucost_gpu_energy_joules", "gpucost_agent_errors", "gpucost_agent_ticks"):
        assert families[name].type == "counter", name
    energy = families["gpucost_gpu_energy_joules"].samples[0]
    assert energy.name == "gpucost_gpu_energy_joules_total"
    assert energy.labels == {"gpu": "0", "uuid": "GPU-fake-0", "source": "counter"}
    assert energy.value == 1500.0
    events = {smp.labels["reason"]: smp.value for smp in families["gpucost_gpu_clock_event_active"].samples}
    assert events == {}  # the fake GPU reports no reasons: absent, not all-zero


def test_lost_gpu_keeps_energy_but_exports_no_stale_readings():
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src)
    src.t += 5
    s.tick(final=True)
    src.gpus[0].lost = True
    src.t += 1
    s.tick()
    reg = make_registry(lambda: s.snapshot, process_metrics=False)
    labels = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert reg.get_sample_value("gpucost_gpu_up", labels) == 0
    assert reg.get_sample_value("gpucost_gpu_power_watts", labels) is None
    assert reg.get_sample_value("gpucost_gpu_energy_joules_total", {**labels, "source": "counter"}) == 1500.0
    assert reg.get_sample_value("gpucost_agent_errors_total", {"kind": "gpu_lost"}) == 1


def test_no_gpu_source_serves_agent_metrics_and_says_so():
    s = Sampler(None, source_kind="nvml", source_error="NVML could not be initialised: driver not loaded")
    s.tick()
    reg = make_registry(lambda: s.snapshot, process_metrics=False)
    assert reg.get_sample_value("gpucost_gpu_source_up", {"source": "nvml"}) == 0
    assert reg.get_sample_value("gpucost_agent_info", {"version": "0.1.0", "source": "nvml"}) == 1
    assert reg.get_sample_value("gpucost_agent_ticks_total") == 1
    ok, body = health_of(s.snapshot, 1.0)
    assert ok and body["status"] == "degraded" and "driver not loaded" in body["error"]


def test_health_goes_stale_when_ticks_stop():
    src = FakeSource([FakeGpu(lambda t: 300.0)])
    s = make_sampler(src)
    last = s.snapshot.agent.last_success_monotonic
    ok, body = health_of(s.snapshot, 1.0, mono_now=last + 1)
    assert ok and body["status"] == "ok"
    ok, body = health_of(s.snapshot, 1.0, mono_now=last + 60)
    assert not ok and body["status"] == "stale"


def test_error_counts_from_every_thread_are_kept_and_exported():
    """Issue 16 item 3: the scheduler's jobs, the ticker and the tick's threads all count errors,
    through one locked method; with the switch interval at its smallest, none is lost, and the
    snapshot's copy is taken while they count."""
    import sys
    import threading

    from fakes import FakeGpu, FakeSource, make_sampler

    src = FakeSource([FakeGpu(lambda t: 100.0)])
    s = make_sampler(src)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def work(kind: str) -> None:
            for _ in range(20000):
                s.count(kind)
        threads = [threading.Thread(target=work, args=(k,)) for k in ("tick_exception", "tick_exception", "dcmi")]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            src.t += 1
            s.tick()  # copies the counts into a snapshot while they grow
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    s.count("tick_skipped", 3)
    src.t += 1
    errors = s.tick().agent.errors
    assert errors["tick_exception"] == 40000 and errors["dcmi"] == 20000 and errors["tick_skipped"] == 3
    assert errors["gpu_lost"] == 0  # every known kind exported from 0
