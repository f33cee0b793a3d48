"""Workload identity from fake /proc trees (fixtures/proc/) and from cgroup path variants."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
from pathlib import Path

import pytest

from agent.attribution.identity import (
    CgroupFacts,
    IdentityResolver,
    parse_cgroup,
    parse_cmdline,
    parse_environ,
    parse_real_uid,
    parse_start_time,
)

REPO = Path(__file__).resolve().parents[2]
PROC = REPO / "fixtures" / "proc"
NODE = PROC / "node"

NAMES = {0: "root", 1000: "alice", 1001: "bob"}


def lookup(uid: int) -> str | None:
    return NAMES.get(uid)


def h(name: str) -> str:
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()


def resolver(root: Path = NODE, **kw) -> IdentityResolver:
    kw.setdefault("lookup_user", lookup)
    return IdentityResolver(root, **kw)


@pytest.fixture
def node_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "node"
    shutil.copytree(NODE, dst)
    return dst


def set_start(root: Path, pid: int, start: int) -> None:
    stat = root / str(pid) / "stat"
    fields = stat.read_text().split(" ")
    comm_end = next(i for i, f in enumerate(fields) if f.endswith(")"))
    fields[comm_end + 20] = str(start)  # field 22
    stat.write_text(" ".join(fields))
    assert parse_start_time(stat.read_text()) == start


class Recorder:
    """A read_bytes that records the files read and can deny some."""

    def __init__(self, deny: tuple[str, ...] = ()) -> None:
        self.deny = deny
        self.reads: list[str] = []

    def __call__(self, path: Path) -> bytes:
        rel = f"{path.parent.name}/{path.name}"
        self.reads.append(rel)
        if rel in self.deny:
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_bytes()


# --- each fixture process --------------------------------------------------------

EXPECTED = {
    1100: dict(kind="user", uid=1000, user="alice", systemd_unit="session-3.scope"),
    1200: dict(kind="systemd", uid=0, user="root", systemd_unit="trainer.service"),
    1300: dict(kind="slurm", uid=1001, user="bob", systemd_unit="slurmd.service",
               slurm_job_id="4242", slurm_step_id="0"),
    1301: dict(kind="slurm", uid=1001, user="bob", systemd_unit="slurmd.service",
               slurm_job_id="4243", slurm_step_id="batch"),
    1400: dict(kind="slurm", uid=1001, user="bob", systemd_unit="slurmstepd.scope",
               slurm_job_id="4244", slurm_step_id="1"),
    1500: dict(kind="slurm", uid=1001, user="bob", systemd_unit="slurmstepd.scope",
               slurm_job_id="4245", slurm_step_id="0", slurm_sluid="sBR1JB8J1YM400"),
    1501: dict(kind="slurm", uid=1001, user="bob", systemd_unit="gpu01_slurmstepd.scope",
               slurm_step_id="extern", slurm_sluid="sBR1JB8J1YM401"),
    1600: dict(kind="container", uid=0, user="root", container_id=h("docker-v1"), container_runtime="docker"),
    1601: dict(kind="container", uid=0, user="root", container_id=h("docker-v2"), container_runtime="docker",
               systemd_unit=f"docker-{h('docker-v2')}.scope"),
    1700: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("k8s-v1"),
               pod_uid="3f1d2c4b-5a69-4e7d-8c1b-2a3e4f5d6c7b", qos_class="burstable"),
    1701: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("k8s-v2"), container_runtime="containerd",
               pod_uid="a8b7c6d5-e4f3-4a2b-9c1d-0e9f8a7b6c5d", qos_class="besteffort",
               systemd_unit=f"cri-containerd-{h('k8s-v2')}.scope"),
    1702: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("k8s-guar"), container_runtime="containerd",
               pod_uid="11223344-5566-4778-899a-abbccddeeff0", qos_class="guaranteed",
               systemd_unit=f"cri-containerd-{h('k8s-guar')}.scope"),
    1800: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("ctrd"), container_runtime="containerd",
               pod_uid="c0ffee00-1234-4abc-8def-0123456789ab", qos_class="burstable",
               systemd_unit=f"cri-containerd-{h('ctrd')}.scope"),
    1900: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("crio"), container_runtime="cri-o",
               pod_uid="deadbeef-0000-4111-8222-333344445555", qos_class="burstable",
               systemd_unit=f"crio-{h('crio')}.scope"),
    2000: dict(kind="kubernetes", uid=1000, user="alice", container_id=h("rel"), container_runtime="containerd",
               pod_uid="77777777-8888-4999-aaaa-bbbbccccdddd", qos_class="burstable",
               systemd_unit=f"cri-containerd-{h('rel')}.scope"),
}


@pytest.mark.parametrize("pid", sorted(EXPECTED))
def test_fixture_identity(pid):
    ident = resolver().resolve(pid)
    assert ident.pid == pid
    assert ident.start_time == 1_000_000 + pid
    assert ident.reason is None
    assert not ident.unknown
    labels = ident.labels()
    assert labels == {k: str(v) for k, v in EXPECTED[pid].items()}


def test_every_fixture_process_is_covered():
    listed = {int(p.name) for p in NODE.iterdir()}
    assert listed == set(EXPECTED) | {2100}


def test_slurm_v1_takes_the_job_from_memory_not_from_cpu_or_systemd():
    # cpu,cpuacct and name=systemd put the process in slurmd.service; memory, cpuset,
    # freezer and devices in the job's step: the job wins, the unit is systemd's.
    facts = parse_cgroup((NODE / "1300" / "cgroup").read_text())
    assert (facts.slurm_job_id, facts.slurm_step_id) == ("4242", "0")
    assert facts.path == "/slurm/uid_1001/job_4242/step_0/task_0"
    assert facts.systemd_unit == "slurmd.service"


# --- unknown -----------------------------------------------------------------------


def test_hidden_pid_is_unknown_not_an_error():
    ident = resolver().resolve(9999)
    assert ident.unknown and ident.kind == "unknown"
    assert ident.reason == "stat: not visible"
    assert ident.labels() == {"kind": "unknown", "reason": "stat: not visible"}


def test_missing_status_is_unknown():
    ident = resolver().resolve(2100)
    assert ident.unknown
    assert ident.reason == "status: not visible"
    assert ident.uid is None and ident.systemd_unit is None
    assert ident.start_time == 1_002_100


def test_status_permission_denied_is_unknown():
    ident = resolver(read_bytes=Recorder(deny=("1100/status",))).resolve(1100)
    assert ident.unknown
    assert ident.reason == "status: permission denied"


def test_stat_permission_denied_is_unknown():
    ident = resolver(read_bytes=Recorder(deny=("1700/stat",))).resolve(1700)
    assert ident.unknown
    assert ident.reason == "stat: permission denied"
    assert ident.start_time is None


def test_malformed_stat_is_unknown(node_copy):
    (node_copy / "1100" / "stat").write_text("1100 (python3) S 1 2\n")
    ident = resolver(node_copy).resolve(1100)
    assert ident.unknown
    assert ident.reason.startswith("stat: ")


def test_unreadable_cgroup_keeps_the_uid():
    ident = resolver(read_bytes=Recorder(deny=("1700/cgroup",))).resolve(1700)
    assert ident.kind == "user"
    assert (ident.uid, ident.user, ident.pod_uid, ident.container_id) == (1000, "alice", None, None)


def test_nested_pid_namespace_is_warned_about_and_pids_still_resolved(caplog):
    with caplog.at_level(logging.WARNING):
        r = resolver(PROC / "nested_pidns")
    assert r.host_pid_namespace is False
    assert sum("not in the host PID namespace" in m for m in caplog.messages) == 1
    # NVML (driver 580) gives PIDs as this namespace numbers them: they resolve.
    ident = r.resolve(7)
    assert (ident.kind, ident.uid, ident.user) == ("user", 1000, "alice")


def test_nested_pid_namespace_seen_through_the_host_proc_mount(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tgpu-cost-agent\nNSpid:\t4321\t1\n")
    assert resolver(tmp_path).host_pid_namespace is False
    (tmp_path / "self" / "status").write_text("Name:\tgpu-cost-agent\nNSpid:\t4321\n")
    assert resolver(tmp_path).host_pid_namespace is None  # one PID: a namespace's own mount looks the same
    (tmp_path / "self" / "ns").mkdir()
    (tmp_path / "self" / "ns" / "pid").symlink_to("pid:[4026531836]")
    assert resolver(tmp_path).host_pid_namespace is True


def test_fixture_tree_without_self_cannot_tell(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolver().host_pid_namespace is None
    assert caplog.messages == []


# --- SLUID and the environment --------------------------------------------------------


def test_sluid_environ_denied_keeps_the_sluid():
    rec = Recorder(deny=("1500/environ",))
    ident = resolver(read_bytes=rec).resolve(1500)
    assert ident.kind == "slurm"
    assert ident.slurm_job_id is None
    assert ident.slurm_sluid == "sBR1JB8J1YM400"
    assert ident.slurm_step_id == "0"  # from the path
    assert "1500/environ" in rec.reads


def test_environ_read_only_for_sluid_paths():
    rec = Recorder()
    r = resolver(read_bytes=rec)
    for pid in EXPECTED:
        r.resolve(pid)
    assert [x for x in rec.reads if x.endswith("/environ")] == ["1500/environ", "1501/environ"]


def test_step_from_environ_when_the_path_has_none(node_copy):
    (node_copy / "1500" / "cgroup").write_text("0::/system.slice/slurmstepd.scope/sBR1JB8J1YM400\n")
    ident = resolver(node_copy).resolve(1500)
    assert (ident.slurm_job_id, ident.slurm_step_id) == ("4245", "0")


def test_parse_environ():
    data = b"A=1\0SLURM_JOB_ID=77\0SLURM_JOB_ID_X=9\0SLURM_STEP_ID=3\0"
    assert parse_environ(data, ("SLURM_JOB_ID", "SLURM_STEP_ID")) == {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"}
    assert parse_environ(b"", ("SLURM_JOB_ID",)) == {}


# --- cache ------------------------------------------------------------------------------


def test_each_process_is_resolved_once():
    rec = Recorder()
    r = resolver(read_bytes=rec)
    first = r.resolve(1701)
    n = len(rec.reads)
    assert r.resolve(1701) is first
    assert r.resolutions == 1
    assert rec.reads[n:] == ["1701/stat"]  # a cache hit reads only stat, to detect PID reuse


def test_pid_reuse_is_detected(node_copy):
    r = resolver(node_copy)
    old = r.resolve(1100)
    assert old.kind == "user"
    # PID 1100 exits and a Docker container's process gets the same PID.
    set_start(node_copy, 1100, 2_000_000)
    (node_copy / "1100" / "cgroup").write_text(f"0::/system.slice/docker-{h('reuse')}.scope\n")
    new = r.resolve(1100)
    assert r.resolutions == 2
    assert new.start_time == 2_000_000
    assert (new.kind, new.container_id) == ("container", h("reuse"))
    assert len(r) == 1


def test_pid_changing_hands_during_resolution_is_resolved_again(node_copy):
    swapped = []

    def racing(path: Path) -> bytes:
        data = path.read_bytes()
        if path.name == "cgroup" and not swapped:  # the process exits, its PID is reused
            swapped.append(True)
            set_start(node_copy, 1200, 3_000_000)
            (node_copy / "1200" / "cgroup").write_text("0::/system.slice/other.service\n")
        return data

    ident = resolver(node_copy, read_bytes=racing).resolve(1200)
    assert ident.start_time == 3_000_000
    assert ident.systemd_unit == "other.service"


def test_process_exiting_during_resolution_is_unknown(node_copy):
    def exiting(path: Path) -> bytes:
        data = path.read_bytes()
        if path.name == "status":
            shutil.rmtree(node_copy / "1200")
        return data

    ident = resolver(node_copy, read_bytes=exiting).resolve(1200)
    assert ident.unknown and ident.reason == "exited"


def test_cache_is_bounded_and_drops_dead_pids_first(node_copy):
    r = resolver(node_copy, max_entries=2)
    r.resolve(1100)
    r.resolve(1200)
    shutil.rmtree(node_copy / "1200")  # the newer one exits
    r.resolve(1300)
    assert len(r) == 2
    # 1100 (the least recently asked, but alive) is kept: the dead one went
    rec = Recorder()
    r._read = rec
    r.resolve(1100)
    assert rec.reads == ["1100/stat"]
    rec.reads.clear()
    # all alive: the least recently asked goes
    r.resolve(1400)
    assert len(r) == 2
    rec.reads.clear()
    r.resolve(1300)
    assert "1300/status" in rec.reads  # 1300 had been evicted


def test_prune_drops_exited_and_reused(node_copy):
    r = resolver(node_copy)
    for pid in (1100, 1200, 1300):
        r.resolve(pid)
    shutil.rmtree(node_copy / "1100")
    set_start(node_copy, 1200, 5)
    assert r.prune() == 2
    assert len(r) == 1
    assert r.prune() == 0


def test_max_entries_must_be_positive():
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        IdentityResolver(NODE, max_entries=0)


# --- user names and command lines -----------------------------------------------------------


def test_user_names_switched_off():
    calls = []

    def spy(uid: int) -> str | None:
        calls.append(uid)
        return "x"

    ident = IdentityResolver(NODE, user_names=False, lookup_user=spy).resolve(1100)
    assert (ident.uid, ident.user) == (1000, None)
    assert "user" not in ident.labels()
    assert calls == []


def test_user_name_looked_up_once_per_uid():
    calls = []

    def spy(uid: int) -> str | None:
        calls.append(uid)
        return NAMES.get(uid)

    r = IdentityResolver(NODE, lookup_user=spy)
    for pid in (1300, 1301, 1400, 1500, 1100):
        r.resolve(pid)
    assert calls == [1001, 1000]


def test_real_pwd_lookup(node_copy):
    free_uid = max(p.pw_uid for p in pwd.getpwall() if p.pw_uid < 2**31) + 1
    status = node_copy / "1100" / "status"
    status.write_text(status.read_text().replace("Uid:\t1000\t1000\t1000\t1000", f"Uid:\t{free_uid}\t0\t0\t0"))
    r = IdentityResolver(node_copy)  # the real pwd database
    assert r.resolve(1200).user == "root"
    ident = r.resolve(1100)
    assert (ident.uid, ident.user) == (free_uid, None)


def test_failing_name_service_does_not_stop_resolution(caplog):
    def broken(uid: int) -> str | None:
        raise RuntimeError("sssd not responding")

    with caplog.at_level(logging.WARNING):
        ident = IdentityResolver(NODE, lookup_user=broken).resolve(1100)
    assert (ident.kind, ident.uid, ident.user) == ("user", 1000, None)
    assert any("sssd not responding" in m for m in caplog.messages)


def test_cmdline_off_by_default():
    rec = Recorder()
    ident = resolver(read_bytes=rec).resolve(1100)
    assert ident.cmdline is None
    assert "cmdline" not in ident.labels()
    assert "1100/cmdline" not in rec.reads


def test_cmdline_when_asked():
    ident = resolver(cmdline=True).resolve(1100)
    assert ident.cmdline == "python3 train.py --epochs 3"
    assert ident.labels()["cmdline"] == "python3 train.py --epochs 3"


def test_parse_cmdline():
    assert parse_cmdline(b"a\0b c\0") == "a b c"
    assert parse_cmdline(b"") is None  # kernel threads
    assert parse_cmdline(b"x" * 5000) == "x" * 1024


# --- parsers ------------------------------------------------------------------------------


def test_start_time_with_parentheses_in_the_command_name():
    stat = (NODE / "1200" / "stat").read_text()
    assert stat.startswith("1200 (trainer (gpu)) S")
    assert parse_start_time(stat) == 1_001_200
    with pytest.raises(ValueError):
        parse_start_time("garbage")


def test_real_uid_not_effective():
    assert parse_real_uid("Name:\tsu\nUid:\t1000\t0\t0\t0\n") == 1000
    with pytest.raises(ValueError):
        parse_real_uid("Name:\tx\n")


HEX = h("c")
UID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SDUID = UID.replace("-", "_")


@pytest.mark.parametrize(
    "text, expected",
    [
        # Slurm v1 step names, multiple-slurmd prefix
        ("4:memory:/slurm/uid_5/job_9/step_extern/task_0\n", dict(slurm_job_id="9", slurm_step_id="extern")),
        ("4:memory:/slurm/uid_5/job_9/step_interactive\n", dict(slurm_job_id="9", slurm_step_id="interactive")),
        ("4:memory:/slurm_n01/uid_5/job_9/step_3/task_1\n", dict(slurm_job_id="9", slurm_step_id="3")),
        ("4:memory:/slurm/uid_5/job_9\n", dict(slurm_job_id="9")),
        # Slurm v2: heterogeneous step, slurmstepd's own cgroup, another slice, node prefix
        ("0::/system.slice/slurmstepd.scope/job_12/step_0+1/user/task_0\n",
         dict(slurm_job_id="12", slurm_step_id="0+1", systemd_unit="slurmstepd.scope")),
        ("0::/system.slice/slurmstepd.scope/job_12/step_batch/slurm\n",
         dict(slurm_job_id="12", slurm_step_id="batch", systemd_unit="slurmstepd.scope")),
        ("0::/slurm.slice/n1_slurmstepd.scope/sEKNKTV3WPV500/step_2/user/task_0\n",
         dict(slurm_sluid="sEKNKTV3WPV500", slurm_step_id="2", systemd_unit="n1_slurmstepd.scope")),
        # not a SLUID (lower case, wrong length): no job
        ("0::/system.slice/slurmstepd.scope/sabc/step_2\n", dict(systemd_unit="slurmstepd.scope")),
        # Kubernetes, cgroupfs: guaranteed, besteffort CRI-O, static pod (32 hex UID)
        (f"0::/kubepods/pod{UID}/{HEX}\n", dict(pod_uid=UID, qos_class="guaranteed", container_id=HEX)),
        (f"5:memory:/kubepods/besteffort/pod{UID}/crio-{HEX}\n",
         dict(pod_uid=UID, qos_class="besteffort", container_id=HEX, container_runtime="cri-o")),
        (f"0::/kubepods/burstable/pod{'ab' * 16}/{HEX}\n",
         dict(pod_uid="ab" * 16, qos_class="burstable", container_id=HEX)),
        # Kubernetes, systemd driver: Docker runtime, kind's kubelet.slice prefix, containerd's own notation
        (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SDUID}.slice/docker-{HEX}.scope\n",
         dict(pod_uid=UID, qos_class="besteffort", container_id=HEX, container_runtime="docker",
              systemd_unit=f"docker-{HEX}.scope")),
        (f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
         f"kubelet-kubepods-burstable-pod{SDUID}.slice/cri-containerd-{HEX}.scope\n",
         dict(pod_uid=UID, qos_class="burstable", container_id=HEX, container_runtime="containerd",
              systemd_unit=f"cri-containerd-{HEX}.scope")),
        (f"0::/system.slice/containerd.service/kubepods-burstable-pod{SDUID}.slice:cri-containerd:{HEX}\n",
         dict(pod_uid=UID, qos_class="burstable", container_id=HEX, container_runtime="containerd",
              systemd_unit="containerd.service")),
        # kind: a pod inside a Docker container: the innermost container is the pod's
        (f"0::/docker/{h('node')}/kubepods/burstable/pod{UID}/{HEX}\n",
         dict(pod_uid=UID, qos_class="burstable", container_id=HEX)),
        # Podman
        (f"0::/machine.slice/libpod-{HEX}.scope/container\n",
         dict(container_id=HEX, container_runtime="podman", systemd_unit=f"libpod-{HEX}.scope")),
        # conmon is a runtime helper, not a container
        (f"0::/machine.slice/crio-conmon-{HEX}.scope\n", dict(systemd_unit=f"crio-conmon-{HEX}.scope")),
        # a pod-like name outside kubepods is not a pod
        (f"0::/foo/pod{UID}/{HEX}\n", dict()),
        # user services under the user manager
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/jupyter.service\n",
         dict(systemd_unit="jupyter.service")),
        # root cgroup, empty and garbage
        ("0::/\n", dict()),
        ("", dict()),
        ("not a cgroup line\n", dict()),
        # v1 without name=systemd (non-systemd distribution): no unit
        (f"3:cpu,cpuacct:/docker/{HEX}\n2:memory:/docker/{HEX}\n",
         dict(container_id=HEX, container_runtime="docker")),
    ],
)
def test_cgroup_layouts(text, expected):
    facts = parse_cgroup(text)
    got = {k: v for k, v in vars(facts).items() if v is not None and k != "path"}
    assert got == expected


def test_v1_controllers_in_order_of_trust():
    # cpuset listed first at job level, memory at task level: memory's deeper path is used.
    text = "9:cpuset:/slurm/uid_5/job_9\n10:memory:/slurm/uid_5/job_9/step_0/task_0\n1:name=systemd:/\n"
    facts = parse_cgroup(text)
    assert (facts.slurm_job_id, facts.slurm_step_id) == ("9", "0")
    assert facts.path == "/slurm/uid_5/job_9/step_0/task_0"


def test_empty_cgroup_gives_no_facts():
    assert parse_cgroup("") == CgroupFacts()


# --- fixtures stay what the script writes -----------------------------------------------------


def test_fixture_trees_match_their_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_proc_fixtures", PROC / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write(tmp_path)
    for tree in ("node", "nested_pidns"):
        made = sorted(p.relative_to(tmp_path / tree) for p in (tmp_path / tree).rglob("*"))
        committed = sorted(p.relative_to(PROC / tree) for p in (PROC / tree).rglob("*"))
        assert made == committed
        for rel in made:
            a, b = tmp_path / tree / rel, PROC / tree / rel
            if a.is_symlink():  # self/ns/pid points at no file, as in /proc
                assert b.is_symlink() and os.readlink(a) == os.readlink(b), rel
            elif a.is_file():
                assert a.read_bytes() == b.read_bytes(), rel


def test_workload_keys_are_built_once_per_process_and_again_for_a_reused_pid(node_copy):
    from agent.attribution.split import resolver_keys

    r = resolver(node_copy)
    key_of = resolver_keys(r)
    key, labels = key_of(1100)
    assert key_of(1100) == (key, labels) and key_of(1100)[1] is labels  # cached process: built once
    assert (key, labels["kind"]) == ("user:1000", "user")
    set_start(node_copy, 1100, 2_000_000)  # PID 1100 now names a container's process
    (node_copy / "1100" / "cgroup").write_text(f"0::/system.slice/docker-{h('reuse')}.scope\n")
    key2, labels2 = key_of(1100)
    assert (key2, labels2["kind"], labels2["container"]) == (f"container:{h('reuse')}", "container", h("reuse"))
