"""Which pod and container hold each GPU, from the kubelet's pod-resources API.

The kubelet serves ``v1.PodResourcesLister/List`` over gRPC on a unix socket
(default ``/var/lib/kubelet/pod-resources/kubelet.sock``; dcgm-exporter maps GPUs
to pods the same way). Its answer lists, per pod and container, the device ids
each device plugin allocated: for the NVIDIA device plugin, ``nvidia.com/gpu``
with GPU UUIDs (``GPU-<uuid>``), ``nvidia.com/mig-<profile>`` with MIG device
UUIDs (``MIG-<uuid>``), and time-sliced replicas as ``GPU-<uuid>::<n>``.

The gRPC transport needs ``grpcio``, an optional extra
(``pip install gpu-cost-agent[kubernetes]``); without it, or without the socket
(not a Kubernetes node), :class:`PodResourcesClient` says why in one log line
and :attr:`~PodResourcesClient.available` is False. The protobuf answer is
decoded here by hand (the few messages of ``api.proto`` v1 that carry devices;
unknown fields are skipped), so neither protoc nor the protobuf package is needed.

Devices allocated through dynamic resource allocation (DRA, ``dynamic_resources``)
are named by their driver (``gpu-0``), not by UUID, and are not mapped.

A List call is a round trip to the kubelet (milliseconds to seconds under load):
call it on its own slow schedule, never in the sampling tick or the scrape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
LIST_METHOD = "/v1.PodResourcesLister/List"
#: The kubelet's answer on a busy node can exceed gRPC's default 4 MiB limit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
INSTALL_HINT = "pip install gpu-cost-agent[kubernetes]"
#: Resources whose device ids are GPUs or MIG devices.
GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu", "nvidia.com/mig-")


class PodResourcesError(Exception):
    """The kubelet could not be asked, or its answer could not be read. One line."""


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: tuple[ContainerDevices, ...]


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: tuple[ContainerResources, ...]


@dataclass(frozen=True)
class PodContainer:
    """One container holding a device."""

    namespace: str
    pod: str
    container: str
    resource_name: str


# --- protobuf wire format ----------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise PodResourcesError("truncated protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise PodResourcesError("protobuf varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise PodResourcesError("protobuf field number 0")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise PodResourcesError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise PodResourcesError("truncated protobuf message")
        yield number, wire, value


def _strings(buf: bytes, wanted: dict[int, str]) -> dict[str, str]:
    out = {name: "" for name in wanted.values()}
    for number, wire, value in _fields(buf):
        if number in wanted and wire == 2:
            out[wanted[number]] = value.decode("utf-8", "replace")
    return out


def _devices(buf: bytes) -> ContainerDevices:
    name = ""
    ids: list[str] = []
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            name = value.decode("utf-8", "replace")
        elif number == 2:
            ids.append(value.decode("utf-8", "replace"))
    return ContainerDevices(name, tuple(ids))


def _container(buf: bytes) -> ContainerResources:
    name = ""
    devices: list[ContainerDevices] = []
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            name = value.decode("utf-8", "replace")
        elif number == 2:
            devices.append(_devices(value))
    return ContainerResources(name, tuple(devices))


def _pod(buf: bytes) -> PodResources:
    names = _strings(buf, {1: "name", 2: "namespace"})
    containers = tuple(_container(v) for n, w, v in _fields(buf) if n == 3 and w == 2)
    return PodResources(names["name"], names["namespace"], containers)


def decode_list_response(data: bytes) -> list[PodResources]:
    """Decode a serialised ``ListPodResourcesResponse``. Raises :class:`PodResourcesError`."""
    return [_pod(v) for n, w, v in _fields(data) if n == 1 and w == 2]


def device_id(raw: str) -> str:
    """The physical device of a device-plugin id: a time-slicing replica suffix ``::<n>`` removed."""
    head, sep, tail = raw.rpartition("::")
    return head if sep and tail.isdigit() else raw


def gpu_device_map(
    pods: Iterable[PodResources], prefixes: tuple[str, ...] = GPU_RESOURCE_PREFIXES
) -> dict[str, tuple[PodContainer, ...]]:
    """GPU or MIG device id (UUID) -> the containers holding it.

    More than one container where the GPU is shared (time-slicing replicas, MPS).
    """
    out: dict[str, list[PodContainer]] = {}
    for pod in pods:
        for c in pod.containers:
            for d in c.devices:
                if not d.resource_name.startswith(prefixes):
                    continue
                holder = PodContainer(pod.namespace, pod.name, c.name, d.resource_name)
                for raw in d.device_ids:
                    holders = out.setdefault(device_id(raw), [])
                    if holder not in holders:
                        holders.append(holder)
    return {k: tuple(v) for k, v in out.items()}


# --- client ------------------------------------------------------------------------


def _import_grpc() -> Any:
    import grpc  # optional dependency: gpu-cost-agent[kubernetes]

    return grpc


class PodResourcesClient:
    """A minimal client of the kubelet's ``v1.PodResourcesLister/List``.

    ``available`` is False (and ``reason`` says why, logged once) without grpcio
    or without the socket.
    """

    def __init__(
        self,
        socket_path: Path | str = DEFAULT_SOCKET,
        *,
        timeout_s: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._log = logger or log
        self._channel: Any = None
        self._call: Any = None
        self.reason: str | None = None
        try:
            grpc = _import_grpc()
        except ImportError:
            self.reason = f"grpcio is not installed ({INSTALL_HINT})"
        else:
            if not self.socket_path.exists():
                self.reason = f"no {self.socket_path} (not a Kubernetes node, or the socket is not mounted)"
            else:
                self._grpc = grpc
                self._channel = grpc.insecure_channel(
                    f"unix://{self.socket_path}",
                    options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
                )
                self._call = self._channel.unary_unary(
                    LIST_METHOD,
                    request_serializer=lambda _req: b"",  # ListPodResourcesRequest has no fields
                    response_deserializer=lambda raw: raw,
                )
        if self.reason:
            self._log.info("pod names from the kubelet: off, %s", self.reason)

    @property
    def available(self) -> bool:
        return self._call is not None

    def list(self) -> list[PodResources]:
        """Every pod's allocated devices. Raises :class:`PodResourcesError`."""
        if self._call is None:
            raise PodResourcesError(self.reason or "pod-resources client closed")
        try:
            raw = self._call(None, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise PodResourcesError(f"kubelet pod-resources List failed: {code}: {details}") from None
        return decode_list_response(raw)

    def gpu_devices(self) -> dict[str, tuple[PodContainer, ...]]:
        """GPU or MIG device UUID -> containers holding it. Raises :class:`PodResourcesError`."""
        return gpu_device_map(self.list())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._call = None
