"""NvmlGpuSource against a fake nvidia-ml-py module: error translation at the edge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agent.sources.gpu import GpuError, GpuLost, GpuNotSupported, SourceUnavailable
from agent.sources.nvml import NvmlGpuSource


class FakeNVMLError(Exception):
    def __init__(self, value):
        self.value = value
        super().__init__(f"NVML error {value}")


def fake_nvml(**overrides):
    calls = {}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a)
        return wrapper

    def not_supported(*_):
        raise FakeNVMLError(3)

    nv = SimpleNamespace(
        NVMLError=FakeNVMLError,
        NVML_ERROR_NOT_SUPPORTED=3,
        NVML_ERROR_FUNCTION_NOT_FOUND=13,
        NVML_ERROR_GPU_IS_LOST=15,
        NVML_ERROR_NOT_FOUND=6,
        NVML_ERROR_UNKNOWN=999,
        NVML_TEMPERATURE_GPU=0,
        NVML_CLOCK_SM=1,
        NVML_TOTAL_POWER_SAMPLES=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"580.159.04",
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetUUID=lambda h: b"GPU-d9a96f9e",
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetSerial=lambda h: "1752624002307",
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=b"00000000:00:06.0"),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=85520809984, used=503316480, free=0),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700000,
        nvmlDeviceGetPowerUsage=lambda h: 116613,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=30),
        nvmlDeviceGetTemperature=lambda h, s: 34,
        nvmlDeviceGetClockInfo=lambda h, c: 1980,
        nvmlDeviceGetPerformanceState=lambda h: 0,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 4,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 2106361,
        nvmlDeviceGetSamples=lambda h, t, since: (1, [SimpleNamespace(timeStamp=1795346823469668,
                                                                      sampleValue=SimpleNamespace(uiVal=126446))]),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=398, usedGpuMemory=916455424)],
    )
    for k, v in overrides.items():
        setattr(nv, k, v)
    for k in list(vars(nv)):
        if k.startswith("nvmlDevice"):
            setattr(nv, k, counted(k, getattr(nv, k)))
    nv.calls = calls
    nv.not_supported = not_supported
    return nv


def test_inventory_and_readings_in_base_units():
    src = NvmlGpuSource(fake_nvml())
    (d,) = src.devices()
    assert (d.index, d.uuid, d.name, d.pci_bus_id, d.driver_version) == (
        0, "GPU-d9a96f9e", "NVIDIA H100 80GB HBM3", "00000000:00:06.0", "580.159.04")
    assert d.memory_total_bytes == 85520809984 and d.power_limit_watts == 700.0
    r = src.read(0)
    assert r.power_watts == 116.613
    assert (r.utilization_gpu_ratio, r.utilization_memory_ratio) == (0.87, 0.30)
    assert r.sm_clock_hertz == 1.98e9 and r.clock_event_reasons == 4 and r.temperature_celsius == 34
    assert src.energy_mj(0) == 2106361
    assert src.power_samples(0, 0) == [(1795346823469668, 126446)]
    assert src.processes(0) == [(398, 916455424)]


def test_unsupported_field_is_none_and_asked_only_once():
    nv = fake_nvml()
    nv.nvmlDeviceGetTemperature = nv.not_supported
    calls = {"n": 0}

    def temp(*_):
        calls["n"] += 1
        raise FakeNVMLError(3)

    nv.nvmlDeviceGetTemperature = temp
    src = NvmlGpuSource(nv)
    for _ in range(5):
        r = src.read(0)
        assert r.temperature_celsius is None and r.failed == ()
    assert calls["n"] == 1


def test_missing_function_in_old_driver_is_unsupported():
    nv = fake_nvml()

    def missing(*_):
        raise FakeNVMLError(13)

    nv.nvmlDeviceGetTotalEnergyConsumption = missing
    src = NvmlGpuSource(nv)
    with pytest.raises(GpuNotSupported):
        src.energy_mj(0)


def test_transient_error_is_a_failed_field_not_a_crash():
    nv = fake_nvml()

    def flaky(*_):
        raise FakeNVMLError(999)

    nv.nvmlDeviceGetPowerUsage = flaky
    src = NvmlGpuSource(nv)
    r = src.read(0)
    assert r.power_watts is None and r.failed == ("power",)
    assert r.utilization_gpu_ratio == 0.87
    nv.nvmlDeviceGetTotalEnergyConsumption = flaky
    with pytest.raises(GpuError) as exc:
        src.energy_mj(0)
    assert not isinstance(exc.value, GpuNotSupported)


def test_gpu_lost_is_translated():
    nv = fake_nvml()

    def lost(*_):
        raise FakeNVMLError(15)

    nv.nvmlDeviceGetPowerUsage = lost
    src = NvmlGpuSource(nv)
    with pytest.raises(GpuLost):
        src.read(0)


def test_empty_sample_buffer_is_not_an_error():
    nv = fake_nvml()

    def not_found(*_):
        raise FakeNVMLError(6)

    nv.nvmlDeviceGetSamples = not_found
    assert NvmlGpuSource(nv).power_samples(0, 123) == []


def test_no_driver_is_source_unavailable():
    def fail():
        raise FakeNVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED

    with pytest.raises(SourceUnavailable, match="NVML could not be initialised"):
        NvmlGpuSource(fake_nvml(nvmlInit=fail))


def test_real_binding_without_gpu_is_source_unavailable():
    """On this machine (no NVIDIA driver) the real nvidia-ml-py fails to initialise cleanly."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        with pytest.raises(SourceUnavailable):
            NvmlGpuSource()
    else:  # pragma: no cover - only on a GPU machine
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")


def test_process_lists_merged_one_entry_per_pid():
    nv = fake_nvml(
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            SimpleNamespace(pid=398, usedGpuMemory=916455424), SimpleNamespace(pid=402, usedGpuMemory=None)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [
            SimpleNamespace(pid=402, usedGpuMemory=1048576), SimpleNamespace(pid=500, usedGpuMemory=2048)],
    )
    src = NvmlGpuSource(nv)
    assert sorted(src.processes(0)) == [(398, 916455424), (402, 1048576), (500, 2048)]


def test_graphics_list_not_supported_leaves_the_compute_list():
    nv = fake_nvml()
    nv.nvmlDeviceGetGraphicsRunningProcesses = nv.not_supported
    src = NvmlGpuSource(nv)
    assert src.processes(0) == [(398, 916455424)]
    assert src.processes(0) == [(398, 916455424)]


def sample(pid, ts, sm, mem):
    return SimpleNamespace(pid=pid, timeStamp=ts, smUtil=sm, memUtil=mem, encUtil=0, decUtil=0)


def test_process_utilization_not_found_is_no_new_samples():
    answers = [FakeNVMLError(6), [sample(402, 2_000, 97, 30), sample(428, 1_000, 55, 10)], FakeNVMLError(0)]
    seen = []

    def util(h, since):
        seen.append(since)
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    nv = fake_nvml(nvmlDeviceGetProcessUtilization=util, NVML_SUCCESS=0)
    src = NvmlGpuSource(nv)
    assert src.process_utilization(0, 0) == []
    # oldest first, as (pid, timestamp µs, SM %, memory %); the caller's since_us is passed through
    assert src.process_utilization(0, 500) == [(428, 1_000, 55, 10), (402, 2_000, 97, 30)]
    assert src.process_utilization(0, 2_000) == []  # the binding's "error" SUCCESS: nothing new
    assert seen == [0, 500, 2_000]


def test_process_utilization_errors_translated():
    def lost(h, since):
        raise FakeNVMLError(15)

    src = NvmlGpuSource(fake_nvml(nvmlDeviceGetProcessUtilization=lost))
    with pytest.raises(GpuLost):
        src.process_utilization(0, 0)
    nv = fake_nvml()
    nv.nvmlDeviceGetProcessUtilization = nv.not_supported
    src = NvmlGpuSource(nv)
    with pytest.raises(GpuNotSupported):
        src.process_utilization(0, 0)
    del nv.nvmlDeviceGetProcessUtilization
    with pytest.raises(GpuNotSupported):
        NvmlGpuSource(nv).process_utilization(0, 0)
