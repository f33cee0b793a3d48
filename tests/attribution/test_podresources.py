"""Kubelet pod-resources: decoding a List answer encoded by Google's protobuf, and the client."""

from __future__ import annotations

import contextlib
import logging
import sys
from concurrent import futures
from pathlib import Path

import pytest

from agent.attribution import podresources
from agent.attribution.podresources import (
    ContainerDevices,
    PodContainer,
    PodResourcesClient,
    PodResourcesError,
    decode_list_response,
    device_id,
    gpu_device_map,
)

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "podresources" / "list_response.bin"
GPU0 = "GPU-8c1c7d52-3b6a-4f4e-9d0e-6a1f2b3c4d5e"
GPU1 = "GPU-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
MIG0 = "MIG-5f4e3d2c-1b0a-5987-a6b5-c4d3e2f1a0b9"
MIG1 = "MIG-0f1e2d3c-4b5a-5697-b8a9-c0d1e2f3a4b5"


@pytest.fixture(scope="module")
def answer() -> bytes:
    return FIXTURE.read_bytes()


@contextlib.contextmanager
def fake_kubelet(sock: Path, answer):
    """A kubelet pod-resources server over real gRPC on ``sock``; ``answer(request, context)`` answers List."""
    grpc = pytest.importorskip("grpc")
    handler = grpc.method_handlers_generic_handler(
        "v1.PodResourcesLister",
        {"List": grpc.unary_unary_rpc_method_handler(answer, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        yield
    finally:
        server.stop(None)


def test_decode_recorded_list_response(answer):
    pods = decode_list_response(answer)
    assert [(p.namespace, p.name) for p in pods] == [
        ("ml", "trainer-0"),
        ("serving", "infer-7f9c"),
        ("research", "notebook-a"),
        ("research", "notebook-b"),
        ("hw", "fpga-job"),
        ("ml", "dra-job"),
        ("default", "idle-pod"),
    ]
    trainer = pods[0]
    assert [c.name for c in trainer.containers] == ["main", "log-shipper"]
    # cpu_ids, memory and topology are skipped; devices kept
    assert trainer.containers[0].devices == (ContainerDevices("nvidia.com/gpu", (GPU0,)),)
    assert trainer.containers[1].devices == ()
    assert pods[1].containers[1].devices == (ContainerDevices("nvidia.com/mig-3g.40gb", (MIG1,)),)
    assert pods[5].containers[0].devices == ()  # DRA only
    assert pods[6].containers == ()


def test_gpu_device_map(answer):
    m = gpu_device_map(decode_list_response(answer))
    assert m == {
        GPU0: (PodContainer("ml", "trainer-0", "main", "nvidia.com/gpu"),),
        MIG0: (PodContainer("serving", "infer-7f9c", "server", "nvidia.com/mig-1g.10gb"),),
        MIG1: (PodContainer("serving", "infer-7f9c", "server2", "nvidia.com/mig-3g.40gb"),),
        # a time-sliced GPU: both pods, replica suffixes removed
        GPU1: (
            PodContainer("research", "notebook-a", "jupyter", "nvidia.com/gpu"),
            PodContainer("research", "notebook-b", "jupyter", "nvidia.com/gpu"),
        ),
    }


def test_device_id():
    assert device_id(f"{GPU1}::3") == GPU1
    assert device_id(GPU1) == GPU1
    assert device_id("MIG-GPU-8c1c7d52/1/0") == "MIG-GPU-8c1c7d52/1/0"  # legacy MIG id, kept
    assert device_id("a::b") == "a::b"


@pytest.mark.parametrize("cut", [1, 2, 5, 50, 300, 684])
def test_truncated_answer_is_a_clear_error(answer, cut):
    with pytest.raises(PodResourcesError, match="truncated"):
        decode_list_response(answer[:cut])


def test_bad_wire_type_is_a_clear_error():
    with pytest.raises(PodResourcesError, match="wire type 3"):
        decode_list_response(bytes([1 << 3 | 3]))
    with pytest.raises(PodResourcesError, match="field number 0"):
        decode_list_response(bytes([0, 0]))


def test_empty_answer_is_no_pods():
    assert decode_list_response(b"") == []


def test_without_grpcio_the_client_is_off_with_one_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc -> ImportError
    sock = tmp_path / "kubelet.sock"
    sock.touch()
    with caplog.at_level(logging.INFO):
        c = PodResourcesClient(sock)
    assert not c.available
    assert "grpcio is not installed" in c.reason and "gpu-cost-agent[kubernetes]" in c.reason
    assert len([r for r in caplog.records if r.name == podresources.__name__]) == 1
    with pytest.raises(PodResourcesError, match="grpcio is not installed"):
        c.list()


def test_without_socket_the_client_is_off(monkeypatch, tmp_path):
    monkeypatch.setattr(podresources, "_import_grpc", lambda: object())
    c = PodResourcesClient(tmp_path / "missing.sock")
    assert not c.available
    assert c.reason.startswith(f"no {tmp_path / 'missing.sock'}")


def test_list_over_grpc_from_a_fake_kubelet(answer, tmp_path):
    sock = tmp_path / "kubelet.sock"
    requests = []

    def list_handler(request: bytes, context) -> bytes:
        requests.append(request)
        return answer

    with fake_kubelet(sock, list_handler):
        c = PodResourcesClient(sock, timeout_s=5)
        assert c.available
        m = c.gpu_devices()
        assert m[GPU0] == (PodContainer("ml", "trainer-0", "main", "nvidia.com/gpu"),)
        assert len(m[GPU1]) == 2
        assert requests == [b""]
        c.close()


def test_grpc_error_is_one_line(tmp_path):
    grpc = pytest.importorskip("grpc")
    sock = tmp_path / "kubelet.sock"

    def denied(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not allowed")

    with fake_kubelet(sock, denied):
        c = PodResourcesClient(sock, timeout_s=5)
        with pytest.raises(PodResourcesError, match="PERMISSION_DENIED: not allowed"):
            c.list()
        c.close()


def test_attribution_asks_the_socket_named_in_the_config(answer, tmp_path):
    """[attribution] pod_resources = true: the stage the agent builds asks that socket (a fake
    kubelet over real gRPC) and labels by its answer; without the socket it stays off."""
    from agent.accounting import Ledger
    from agent.attribution.split import from_settings
    from agent.config import Settings

    sock = tmp_path / "kubelet.sock"
    with fake_kubelet(sock, lambda request, context: answer):
        settings = Settings(attribution={"pod_resources": True, "pod_resources_socket": str(sock)})
        stage = from_settings(settings, Ledger().workloads, replay=False)
        assert stage.pods is not None
        stage.refresh_pods()
        labels = {"kind": "kubernetes", "pod_uid": "u", "namespace": "", "pod": ""}
        assert stage._with_pod_names(GPU0, labels) == {**labels, "namespace": "ml", "pod": "trainer-0"}
        assert stage._with_pod_names(GPU1, labels) == labels  # two pods share it: not guessed
        assert stage._with_pod_names(GPU0, {**labels, "kind": "user"})["pod"] == ""
    off = Settings(attribution={"pod_resources": True, "pod_resources_socket": str(tmp_path / "none.sock")})
    assert from_settings(off, Ledger().workloads, replay=False).pods is None
