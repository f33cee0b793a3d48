"""deploy/kubernetes/: every manifest valid against the Kubernetes API schemas, and wired together.

The schemas are the API's own (OpenAPI definitions of Kubernetes 1.25 and 1.37, strict: an unknown
field is an error, as with the API server's strict field validation), vendored from the PyPI
package kubernetes-validate by fixtures/kubernetes/make_schemas.py. The ServiceMonitor is a custom
resource of the Prometheus Operator; it is checked against SERVICEMONITOR below, a strict subset
of the CRD's openAPIV3Schema (monitoring.coreos.com/v1, Operator 0.93) written out by hand.

kustomization.yaml is read the way kustomize reads it (resources, namespace, the ConfigMap
generator); where kubectl is installed, its own `kubectl kustomize` output is validated as well.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from agentproc import ROOT, AgentProcess

K8S = ROOT / "deploy" / "kubernetes"
SCHEMAS = sorted((ROOT / "fixtures" / "kubernetes").glob("schemas-v*.json.gz"))
DOCKERFILE = ROOT / "Dockerfile"

#: The labels the agent's per-workload series carry that a Kubernetes scrape would also attach to
#: the target (issue 9 contract): the target's must go, or Prometheus renames the workload's.
WORKLOAD_LABELS = ("namespace", "pod", "container")

_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRINGS = {"type": "array", "items": {"type": "string"}}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": _STRINGS,
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {"type": "string", "enum": [
            v for a in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                        "lowercase", "uppercase", "keepequal", "dropequal")
            for v in (a, {"hashmod": "HashMod", "labelmap": "LabelMap", "labeldrop": "LabelDrop",
                          "labelkeep": "LabelKeep", "keepequal": "KeepEqual",
                          "dropequal": "DropEqual"}.get(a, a.capitalize()))
        ]},
    },
}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"}, "values": _STRINGS},
        }},
    },
}
#: The fields of a ServiceMonitor this project may use, typed as the CRD types them; anything else
#: is refused, so a misspelt field fails here rather than being pruned silently by the API server.
SERVICEMONITOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoints", "selector"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": _STRINGS}},
                "jobLabel": {"type": "string"},
                "targetLabels": _STRINGS,
                "podTargetLabels": _STRINGS,
                "attachMetadata": {"type": "object", "additionalProperties": False,
                                   "properties": {"node": {"type": "boolean"}}},
                "endpoints": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["integer", "string"]},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": _RELABEL},
                        "metricRelabelings": {"type": "array", "items": _RELABEL},
                    },
                }},
            },
        },
    },
}


# -- reading the manifests as kustomize does ------------------------------------------------


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


@cache
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


@cache
def manifests() -> tuple[dict, ...]:
    """Every object kustomize would emit, before its name transformations: the resources with
    the kustomization's namespace applied, and the generated ConfigMaps."""
    k = kustomization()
    docs = [d for name in k["resources"] for d in _load_all(K8S / name)]
    for gen in k.get("configMapGenerator", []):
        docs.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], **({"labels": gen["options"]["labels"]} if "options" in gen else {})},
            "data": {Path(f).name: (K8S / f).read_text(encoding="utf-8") for f in gen["files"]},
        })
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"].setdefault("namespace", k["namespace"])
    return tuple(docs)


def one(kind: str) -> dict:
    [doc] = [d for d in manifests() if d["kind"] == kind]
    return doc


def agent_container() -> dict:
    [c] = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


# -- schema validation ----------------------------------------------------------------------


@cache
def _schemas(path: Path) -> dict:
    return json.loads(gzip.decompress(path.read_bytes()))


def validator(doc: dict, schema_file: Path) -> jsonschema.protocols.Validator:
    if doc["kind"] == "ServiceMonitor":
        return jsonschema.Draft202012Validator(SERVICEMONITOR)
    bundle = _schemas(schema_file)
    key = f"{doc['apiVersion']} {doc['kind']}"
    assert key in bundle["kinds"], f"no schema for {key}: add it to fixtures/kubernetes/make_schemas.py"
    return jsonschema.Draft202012Validator({**bundle["kinds"][key], "$defs": bundle["$defs"]})


def schema_errors(doc: dict, schema_file: Path) -> list[str]:
    return [
        f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator(doc, schema_file).iter_errors(doc)
    ]


def test_the_schemas_are_vendored():
    assert [p.name for p in SCHEMAS] == ["schemas-v1.25.0.json.gz", "schemas-v1.37.0.json.gz"]
    for path in SCHEMAS:
        assert "kubernetes-validate" in _schemas(path)["source"]


def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(d["kind"] for d in manifests())
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount", "ServiceMonitor"]


@pytest.mark.parametrize("schema_file", SCHEMAS, ids=lambda p: p.name.removesuffix(".json.gz"))
def test_every_manifest_is_valid(schema_file):
    problems = [e for doc in manifests() for e in schema_errors(doc, schema_file)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("schema_file", SCHEMAS, ids=lambda p: p.name.removesuffix(".json.gz"))
def test_the_schemas_refuse_what_the_api_refuses(schema_file):
    """The validation is not vacuous: a misspelt field, a wrong type, an unknown enum value fail."""
    ds = json.loads(json.dumps(one("DaemonSet")))
    pod = ds["spec"]["template"]["spec"]
    pod["hostPid"] = pod.pop("hostPID")                                    # misspelt
    pod["containers"][0]["ports"][0]["containerPort"] = "9842"             # a string
    pod["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt
    errors = "\n".join(schema_errors(ds, schema_file))
    assert "'hostPid' was unexpected" in errors
    assert "containers.0.ports.0.containerPort" in errors
    assert "'readOnlyRootFileSystem' was unexpected" in errors

    svc = json.loads(json.dumps(one("Service")))
    del svc["spec"]["ports"][0]["port"]                                    # required
    assert any("'port' is a required property" in e for e in schema_errors(svc, schema_file))

    sm = json.loads(json.dumps(one("ServiceMonitor")))
    endpoint = sm["spec"]["endpoints"][0]
    endpoint["interval"] = "15 s"
    endpoint["relabelings"][0]["target_label"] = endpoint["relabelings"][0].pop("targetLabel")
    endpoint["relabelings"][1]["action"] = "rename"
    errors = "\n".join(schema_errors(sm, schema_file))
    assert "'15 s' does not match" in errors
    assert "'target_label' was unexpected" in errors
    assert "'rename' is not one of" in errors


def test_kubectl_kustomize_output_is_valid():
    """kustomize's own build: valid, and the DaemonSet mounts the generated ConfigMap by its hashed name."""
    from tools import need

    kubectl = need("kubectl", "apt install kubernetes-client")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in manifests())
    problems = [e for doc in docs for path in SCHEMAS for e in schema_errors(doc, path)]
    assert not problems, "\n".join(problems)
    [cm] = [d for d in docs if d["kind"] == "ConfigMap"]
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    assert re.fullmatch(r"gpu-cost-agent-config-[a-z0-9]{10}", cm["metadata"]["name"])
    mounted = {v["configMap"]["name"] for v in ds["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert mounted == {cm["metadata"]["name"]}
    assert all(d["metadata"].get("namespace") == "gpu-cost-agent" for d in docs if d["kind"] != "Namespace")


# -- what the agent needs, and that the pieces fit --------------------------------------------


def _arg(container: dict, flag: str) -> str:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"{flag}=")]
    assert len(values) == 1, f"{flag}=... not in {container['args']}"
    return values[0]


def _mount(container: dict, path: str) -> tuple[dict, dict]:
    """The volume mount at ``path`` and its volume."""
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    [volume] = [v for v in one("DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_the_daemonset_sees_gpus_and_processes_without_taking_a_gpu():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    c = agent_container()
    assert pod["hostPID"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert pod["runtimeClassName"] == "nvidia"
    for kind in ("requests", "limits"):
        assert not [r for r in c["resources"][kind] if r.startswith("nvidia.com/")], "it must not take a GPU"
    mount, volume = _mount(c, "/var/lib/kubelet/pod-resources")
    assert mount["readOnly"] is True and volume["hostPath"]["path"] == "/var/lib/kubelet/pod-resources"
    # Only GPU nodes, whichever labeller marks them; GPU taints tolerated.
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert keys == {"nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"}
    assert "nvidia.com/gpu" in {t.get("key") for t in pod["tolerations"]}


def test_the_daemonset_is_locked_down():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    sc = agent_container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    # Writable: only the state directory and a small /tmp.
    writable = {m["mountPath"] for m in agent_container()["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/gpu-cost-agent", "/tmp"}
    # Never two agents on a node (one state file, the same GPUs counted twice).
    assert one("DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    # The namespace admits what the pod needs (host PID namespace, hostPath).
    assert one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_args_ports_volumes_and_config_fit_together():
    c = agent_container()
    config = Path(_arg(c, "--config"))
    mount, volume = _mount(c, str(config.parent))
    assert mount["readOnly"] is True
    cm = one("ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and config.name in cm["data"]

    state = _arg(c, "--state-dir")
    _, volume = _mount(c, state)
    assert volume["hostPath"] == {"path": "/var/lib/gpu-cost-agent", "type": "DirectoryOrCreate"}

    [port] = c["ports"]
    assert port["name"] == "metrics" and _arg(c, "--listen").endswith(f":{port['containerPort']}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe

    svc = one("Service")
    assert svc["spec"]["clusterIP"] == "None"
    [sport] = svc["spec"]["ports"]
    assert sport == {"name": "metrics", "port": port["containerPort"], "targetPort": "metrics", "protocol": "TCP"}
    pod_labels = one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    account = one("ServiceAccount")["metadata"]["name"]
    assert one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_the_configmap_config_is_accepted_by_the_agent(tmp_path):
    """check-config, the same check `run` makes at start, on the ConfigMap's config.toml."""
    path = tmp_path / "config.toml"
    path.write_text(one("ConfigMap")["data"]["config.toml"], encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "agent", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{path}: OK" in result.stdout


def test_pod_names_come_from_the_mounted_socket():
    """The ConfigMap asks the kubelet for pod names through the socket the DaemonSet mounts, once
    the agent has the [attribution] table; until then the table waits there, commented out."""
    from agent.config import Settings

    text = one("ConfigMap")["data"]["config.toml"]
    socket = "/var/lib/kubelet/pod-resources/kubelet.sock"
    mount, _ = _mount(agent_container(), str(Path(socket).parent))
    assert mount["readOnly"] is True
    if "attribution" not in Settings.model_fields:
        assert f'# pod_resources_socket = "{socket}"' in text
        return
    import tomllib

    table = tomllib.loads(text).get("attribution")
    assert table is not None, "uncomment [attribution] in deploy/kubernetes/config.toml: the agent has it now"
    assert table["pod_resources"] is True and table["pod_resources_socket"] == socket


def test_servicemonitor_scrapes_the_service_as_the_rules_expect():
    sm, svc = one("ServiceMonitor"), one("Service")
    spec = sm["spec"]
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    # The Operator names the job after the Service: the alert rules select job="gpu-cost-agent".
    assert svc["metadata"]["name"] == "gpu-cost-agent" and "jobLabel" not in spec
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"]
    assert endpoint["interval"] == "15s" and endpoint["path"] == "/metrics"
    assert not endpoint.get("honorLabels")
    relabel = endpoint["relabelings"]
    node = [r for r in relabel if r.get("sourceLabels") == ["__meta_kubernetes_pod_node_name"]]
    assert {r["targetLabel"] for r in node} == {"instance", "node"}
    [drop] = [r for r in relabel if r.get("action") == "labeldrop"]
    dropped = re.compile(drop["regex"])  # Prometheus anchors relabel regexes
    for label in (*WORKLOAD_LABELS, "service", "endpoint"):
        assert dropped.fullmatch(label), label
    for label in ("job", "instance", "node", "cluster", "team"):
        assert not dropped.fullmatch(label), label


def test_termination_grace_covers_the_agents_stop(tmp_path):
    """SIGTERM to a running agent: it reads the counters once more, saves and exits well inside
    the pod's grace period (measured here on a replay; on NVML the extra read is ~4 ms per GPU)."""
    grace = one("DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    agent = AgentProcess("demo", "--speed", "5", "--state-dir", str(tmp_path), "--log-level", "info")
    try:
        agent.wait_ready()
        time.sleep(1.5)
        began = time.monotonic()
        rc = agent.stop(signal.SIGTERM, timeout=grace)
        took = time.monotonic() - began
    finally:
        agent.stop(signal.SIGKILL)
    print(f"agent stopped in {took:.2f} s; grace period {grace} s")
    assert rc == 0 and (tmp_path / "state.json").exists(), agent.output
    # The BMC job may still be running on a real node: up to its 5 s timeout comes on top.
    assert took + 5 < grace / 2


# -- the image ---------------------------------------------------------------------------------


def test_the_dockerfile_builds_what_the_daemonset_runs():
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    froms = [rest for op, *rest in instructions if op == "FROM"]
    assert all(r[0].startswith("python:3.12-slim") for r in froms)
    entry = [json.loads(rest[0]) for op, *rest in instructions if op == "ENTRYPOINT"]
    assert entry == [["gpu-cost-agent"]]
    assert agent_container()["args"][0] == "run" and "image" in agent_container()
    # grpcio for pod names from the kubelet; the web extra for TLS and basic auth.
    assert re.search(r"\[kubernetes,web\]", text)
    # Non-root unless the DaemonSet says otherwise (it does, and says why).
    users = [rest[0] for op, *rest in instructions if op == "USER"]
    assert users and users[-1] != "0" and users[-1] != "root"
    assert "EXPOSE 9842" in text
