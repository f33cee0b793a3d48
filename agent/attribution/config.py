"""``[attribution]``: splitting GPU energy and cost among the workloads on each GPU."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .identity import DEFAULT_PROC_ROOT
from .podresources import DEFAULT_SOCKET
from .split import DEFAULT_WINDOW_SECONDS
from .workloads import DEFAULT_MAX_WORKLOADS, DEFAULT_RETENTION_SECONDS

#: Highest plausible idle power of one GPU. Units: W.
MAX_IDLE_WATTS = 5000.0


class AttributionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Export user names (from the agent's NSS); false: the uid only.
    user_names: bool = True
    #: Most workloads charged on the node; beyond it the smallest are folded into workload="other".
    max_workloads: int = Field(DEFAULT_MAX_WORKLOADS, ge=1, le=100_000)
    #: How long a finished workload is still exported. Units: s.
    retention_seconds: float = Field(DEFAULT_RETENTION_SECONDS, ge=0, le=30 * 86400, allow_inf_nan=False)
    #: Window of per-process SM samples that a slice's active energy is split by. Units: s.
    window_seconds: float = Field(DEFAULT_WINDOW_SECONDS, ge=1, le=300, allow_inf_nan=False)
    #: A GPU's idle power (W): one number for every GPU, or a table by GPU index ("0"), UUID
    #: ("GPU-…") or "default". Unset: the lowest power seen on a tick with GPU utilisation 0.
    idle_watts: float | dict[str, float] | None = None
    #: Read command lines into identities (never exported as labels).
    cmdline: bool = False
    #: Ask the kubelet's pod-resources socket for pod names and namespaces.
    pod_resources: bool = False
    pod_resources_socket: Path = DEFAULT_SOCKET
    #: Where the GPU processes' /proc is: the host's, mounted elsewhere (e.g. /host/proc) when the
    #: agent runs in a container that does not share the host's PID namespace.
    proc_root: Path = DEFAULT_PROC_ROOT

    @field_validator("pod_resources_socket")
    @classmethod
    def _socket(cls, v: Path) -> Path:
        if str(v) in ("", "."):
            raise ValueError("the kubelet's pod-resources socket needs a path, e.g. " + str(DEFAULT_SOCKET))
        return v

    @field_validator("proc_root")
    @classmethod
    def _proc(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"the processes' /proc needs an absolute path, e.g. /host/proc, got {str(v)!r}")
        return v

    @field_validator("idle_watts")
    @classmethod
    def _idle(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = [v] if isinstance(v, (int, float)) else list(v.values()) if isinstance(v, dict) else []
        for w in values:
            if not (0 <= w <= MAX_IDLE_WATTS):
                raise ValueError(f"idle power must be between 0 and {MAX_IDLE_WATTS:g} W, got {w!r}")
        if isinstance(v, dict):
            for k in v:
                if not (k.isdigit() or k.startswith(("GPU-", "MIG-")) or k == "default"):
                    raise ValueError(f"idle_watts keys are a GPU index, a GPU UUID or \"default\", got {k!r}")
        return v
