"""NvmlGpuSource.mig_instances against a fake nvidia-ml-py: an H100 split 3g + 2g + 2g, read
only (a test fails on any NVML call that would change the MIG mode or the instances)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from agent.sources.gpu import GpuNotSupported
from agent.sources.nvml import NvmlGpuSource
from test_nvml import FakeNVMLError, fake_nvml

GIB = 1 << 30
#: MIG device index → (GPU instance, compute instance, profile, slices, SMs, processes)
MIG_DEVICES = {
    0: (1, 0, "3g.40gb", 3, 60, [(501, 8 * GIB), (502, 24 * GIB)]),
    1: (5, 0, "2g.20gb", 2, 32, [(601, 4 * GIB)]),
    2: (6, 0, "2g.20gb", 2, 32, []),
}
#: GPU instance → GPM SM_UTIL (%) between two samples
SM_UTIL = {1: 80.0, 5: 40.0, 6: 0.0}
#: NVML calls that change the MIG mode or the instances: the agent must never make them.
WRITES = re.compile(r"Set|Create|Destroy|Reset|Clear")


class Recorder:
    """The fake module, recording every NVML name the source looks up."""

    def __init__(self, nv):
        self._nv = nv
        self.names: list[str] = []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self._nv, name)


def mig_nvml(*, per_device_lists: bool = True, gpm: bool = True, mode=(1, 1)):
    state = {"alloc": 0, "freed": 0}

    def mig(h):
        if not (isinstance(h, str) and h.startswith("mig")):
            raise FakeNVMLError(2)  # INVALID_ARGUMENT: a parent handle
        return MIG_DEVICES[int(h[3:])]

    def handle_by_index(h, i):
        if i not in MIG_DEVICES:
            raise FakeNVMLError(6)  # NOT_FOUND: no MIG device at this index
        return f"mig{i}"

    def procs(h):
        if h == "h0":  # the parent: every instance's processes, each with its gpuInstanceId
            return [SimpleNamespace(pid=p, usedGpuMemory=m, gpuInstanceId=d[0])
                    for d in MIG_DEVICES.values() for p, m in d[5]]
        if not per_device_lists:
            raise FakeNVMLError(3)
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in mig(h)[5]]

    def alloc():
        state["alloc"] += 1
        return SimpleNamespace(gi=None)

    def sample_get(h, gi, sample):
        assert h == "h0"
        sample.gi = gi

    def metrics_get(req):
        assert req.sample1.gi == req.sample2.gi and req.metrics[0].metricId == 2
        req.metrics[0].value = SM_UTIL[req.sample2.gi]
        req.metrics[0].nvmlReturn = 0

    def free(sample):
        state["freed"] += 1

    nv = fake_nvml(
        NVML_DEVICE_MIG_ENABLE=1,
        NVML_ERROR_INVALID_ARGUMENT=2,
        NVML_SUCCESS=0,
        NVML_GPM_METRICS_GET_VERSION=1,
        NVML_GPM_METRIC_SM_UTIL=2,
        nvmlDeviceGetMigMode=lambda h: mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=handle_by_index,
        nvmlDeviceGetGpuInstanceId=lambda h: mig(h)[0],
        nvmlDeviceGetComputeInstanceId=lambda h: mig(h)[1],
        nvmlDeviceGetUUID=lambda h: b"GPU-d9a96f9e" if h == "h0" else f"MIG-{h}".encode(),
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3" + ("" if h == "h0" else f" MIG {mig(h)[2]}"),
        nvmlDeviceGetAttributes=lambda h: SimpleNamespace(gpuInstanceSliceCount=mig(h)[3],
                                                          computeInstanceSliceCount=mig(h)[3],
                                                          multiprocessorCount=mig(h)[4]),
        nvmlDeviceGetComputeRunningProcesses=procs,
        nvmlGpmQueryDeviceSupport=(lambda h: SimpleNamespace(isSupportedDevice=1)) if gpm else (
            lambda h: (_ for _ in ()).throw(FakeNVMLError(3))),
        nvmlGpmSampleAlloc=alloc,
        nvmlGpmMigSampleGet=sample_get,
        nvmlGpmMetricsGet=metrics_get,
        nvmlGpmSampleFree=free,
        c_nvmlGpmMetricsGet_t=lambda: SimpleNamespace(metrics=[SimpleNamespace(metricId=None, value=None,
                                                                                nvmlReturn=None)]),
    )
    nv.gpm_state = state
    return Recorder(nv)


def test_3g_2g_2g_read_with_processes_and_gpm_activity_from_the_second_read():
    nv = mig_nvml()
    src = NvmlGpuSource(nv)
    first = src.mig_instances(0)
    assert [(m.gpu_instance, m.profile, m.slices) for m in first] == [(1, "3g.40gb", 3), (5, "2g.20gb", 2),
                                                                       (6, "2g.20gb", 2)]
    assert [m.processes for m in first] == [((501, 8 * GIB), (502, 24 * GIB)), ((601, 4 * GIB),), ()]
    assert [(c.compute_instance, c.uuid, c.compute_slices, c.multiprocessors) for c in first[0].compute_instances] == [
        (0, "MIG-mig0", 3, 60)]
    assert [m.sm_activity for m in first] == [None, None, None]  # GPM needs two samples
    second = src.mig_instances(0)
    assert [m.sm_activity for m in second] == [0.8, 0.4, 0.0]
    assert nv.calls["nvmlDeviceGetAttributes"] == 3  # static facts asked once per MIG device
    assert nv.gpm_state == {"alloc": 6, "freed": 3}  # the previous samples freed, the latest held
    src.close()
    assert nv.gpm_state["freed"] == 6
    assert not [n for n in nv.names if WRITES.search(n)]  # read-only


def test_without_per_device_process_lists_the_parents_list_is_grouped_by_instance():
    src = NvmlGpuSource(mig_nvml(per_device_lists=False))
    got = src.mig_instances(0)
    assert [m.processes for m in got] == [((501, 8 * GIB), (502, 24 * GIB)), ((601, 4 * GIB),), ()]


def test_without_gpm_there_is_no_activity_and_gpm_is_asked_once():
    nv = mig_nvml(gpm=False)
    src = NvmlGpuSource(nv)
    for _ in range(3):
        assert [m.sm_activity for m in src.mig_instances(0)] == [None, None, None]
    assert nv.names.count("nvmlGpmQueryDeviceSupport") == 1
    assert "nvmlGpmSampleAlloc" not in nv.names


def test_a_gpu_not_in_mig_mode_or_without_mig_has_no_instances():
    assert NvmlGpuSource(mig_nvml(mode=(0, 0))).mig_instances(0) is None
    nv = fake_nvml()  # no nvmlDeviceGetMigMode at all, as in an old binding
    src = NvmlGpuSource(nv)
    assert src.mig_instances(0) is None and src.mig_instances(0) is None
    nv2 = fake_nvml(nvmlDeviceGetMigMode=nv.not_supported)
    src2 = NvmlGpuSource(nv2)
    assert src2.mig_instances(0) is None and src2.mig_instances(0) is None
    assert nv2.calls["nvmlDeviceGetMigMode"] == 1  # NotSupported: never asked again
    with pytest.raises(GpuNotSupported):
        src2._call(0, "mig_mode", nv2.nvmlDeviceGetMigMode)


def test_mig_mode_off_is_asked_again_only_after_the_recheck_interval_or_a_reacquire(monkeypatch):
    import agent.sources.nvml as nvml_mod

    now = {"t": 1000.0}
    monkeypatch.setattr(nvml_mod, "_monotonic", lambda: now["t"])
    mode = [(0, 0)]
    nv = mig_nvml()
    nv._nv.nvmlDeviceGetMigMode = lambda h: mode[0]  # the calls are counted by the wrapper below
    asked = {"n": 0}
    inner = nv._nv.nvmlDeviceGetMigMode

    def counted(h):
        asked["n"] += 1
        return inner(h)

    nv._nv.nvmlDeviceGetMigMode = counted
    nv._nv.nvmlDeviceGetHandleByUUID = lambda u: "h0"
    src = NvmlGpuSource(nv)
    for _ in range(5):
        assert src.mig_instances(0) is None
        now["t"] += 1.0
    assert asked["n"] == 1  # off: not asked on every tick
    mode[0] = (1, 1)  # MIG turned on
    now["t"] = 1000.0 + nvml_mod.MIG_MODE_RECHECK_SECONDS - 0.1
    assert src.mig_instances(0) is None and asked["n"] == 1
    now["t"] = 1000.0 + nvml_mod.MIG_MODE_RECHECK_SECONDS
    assert [m.gpu_instance for m in src.mig_instances(0)] == [1, 5, 6]
    assert src.mig_instances(0) is not None and asked["n"] == 3  # in MIG mode: asked every time
    mode[0] = (0, 0)
    assert src.mig_instances(0) is None and asked["n"] == 4
    src.reacquire(0)  # a reset (new handle) may have changed the mode: asked at once
    mode[0] = (1, 1)
    assert src.mig_instances(0) is not None and asked["n"] == 5
