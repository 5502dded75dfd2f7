"""The default number of busy workers: the CPUs of the process's affinity, lowered to its
cgroup's CPU quota. The cgroup files are laid out under a temporary root here, as Linux
lays them out in a container (cgroup v2, and v1 as Docker without a cgroup namespace
shows it) and on a host with nested groups (systemd slices)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from threadbridge import _cpus


def _write(root: Path, path: str, text: str) -> None:
    file = root / path.lstrip("/")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def _quota(root: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> float | None:
    """The quota read under ``root`` laid out with these /proc/self files and others."""
    _write(root, "/proc/self/cgroup", cgroup)
    _write(root, "/proc/self/mountinfo", mountinfo)
    for path, text in files.items():
        _write(root, path, text)
    return _cpus.cgroup_cpu_quota(root)


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_CPU_MOUNT = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
V1_CPUACCT_MOUNT = "33 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
UNIFIED_MOUNT = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(("cpu_max", "expected"), [("200000 100000\n", 2.0), ("max 100000", None)])
def test_cgroup_v2_quota_of_a_container(
    tmp_path: Path, cpu_max: str, expected: float | None
) -> None:
    files = {"/sys/fs/cgroup/cpu.max": cpu_max}
    assert _quota(tmp_path, "0::/\n", V2_MOUNT, files) == expected


@pytest.mark.parametrize(
    ("parent", "own", "expected"),
    [
        ("150000 100000", "max 100000", 1.5),  # systemd CPUQuota= on the slice
        ("400000 100000", "50000 100000", 0.5),  # the tighter one holds
        ("max 100000", "max 100000", None),
    ],
)
def test_cgroup_v2_quota_of_a_parent_group_holds(
    tmp_path: Path, parent: str, own: str, expected: float | None
) -> None:
    files = {
        "/sys/fs/cgroup/work.slice/cpu.max": parent,
        "/sys/fs/cgroup/work.slice/job.service/cpu.max": own,
    }
    assert _quota(tmp_path, "0::/work.slice/job.service\n", V2_MOUNT, files) == expected


def test_cgroup_v1_quota_seen_without_a_cgroup_namespace(tmp_path: Path) -> None:
    """Docker on cgroup v1: /proc/self/cgroup names the container's group, and the mount
    shows that same group at the mount point."""
    group = "/docker/0123abcd"
    cgroup = f"12:memory:{group}\n4:cpu,cpuacct:{group}\n3:cpuset:{group}\n1:name=systemd:{group}\n"
    mountinfo = (
        f"40 31 0:37 {group} /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
        f"41 31 0:38 {group} /sys/fs/cgroup/cpuset ro - cgroup cgroup rw,cpuset\n"
    )
    files = {
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "250000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert _quota(tmp_path, cgroup, mountinfo, files) == 2.5


@pytest.mark.parametrize(("quota", "expected"), [("100000\n", 1.0), ("-1\n", None)])
def test_hybrid_host_counts_the_v1_cpu_quota(
    tmp_path: Path, quota: str, expected: float | None
) -> None:
    """cgroup v1 for the cpu controller, and a unified (v2) hierarchy without it: no
    cpu.max there. Only the hierarchy with the cpu controller counts."""
    files = {
        "/sys/fs/cgroup/cpu/batch/cpu.cfs_quota_us": quota,
        "/sys/fs/cgroup/cpu/batch/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpuacct/batch/cpu.cfs_quota_us": "1000\n",  # not cpu's
        "/sys/fs/cgroup/cpuacct/batch/cpu.cfs_period_us": "100000\n",
    }
    mountinfo = V1_CPU_MOUNT + V1_CPUACCT_MOUNT + UNIFIED_MOUNT
    assert _quota(tmp_path, "1:cpu:/batch\n0::/batch\n", mountinfo, files) == expected


def test_mount_of_another_part_of_the_hierarchy_is_not_read(tmp_path: Path) -> None:
    mountinfo = V2_MOUNT.replace(" / /sys", " /mine /sys")
    files = {"/sys/fs/cgroup/cpu.max": "100000 100000\n"}
    assert _quota(tmp_path, "0::/elsewhere/job\n", mountinfo, files) is None


def test_escaped_mount_point(tmp_path: Path) -> None:
    mountinfo = "30 23 0:26 / /cg\\040roups rw - cgroup2 cgroup2 rw\n"
    files = {"/cg roups/cpu.max": "300000 100000\n"}
    assert _quota(tmp_path, "0::/\n", mountinfo, files) == 3.0


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", "0::/\n1:cpu\n"],
)
def test_unreadable_or_odd_cgroup_files_count_as_no_quota(tmp_path: Path, text: str) -> None:
    assert _cpus.cgroup_cpu_quota(tmp_path) is None  # no files at all (not Linux)
    _write(tmp_path, "/proc/self/cgroup", text)
    _write(tmp_path, "/proc/self/mountinfo", V2_MOUNT + "no dash here\n")
    _write(tmp_path, "/sys/fs/cgroup/cpu.max", "not numbers\n")
    assert _cpus.cgroup_cpu_quota(tmp_path) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [
        (8, None, 8),
        (8, 0.3, 1),  # never 0
        (8, 1.5, 2),  # a fraction counts up
        (8, 2.0, 2),
        (2, 16.0, 2),  # a quota above the affinity does not raise it
        (1, None, 1),
    ],
)
def test_usable_cpus_is_the_affinity_lowered_to_the_quota(
    monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, expected: int
) -> None:
    monkeypatch.setattr(_cpus, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(_cpus, "cgroup_cpu_quota", lambda: quota)
    assert _cpus.usable_cpus() == expected


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform (macOS)"
)
def test_affinity_counts_the_cpus_this_process_may_run_on() -> None:
    """Held to one CPU (as ``taskset -c 0`` would), it counts one, whatever the machine
    has; ``os.cpu_count()`` would count them all."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # on Linux, this thread's: restored below
    try:
        assert _cpus.affinity_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_default_process_limiter_and_pool_size_follow_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from threadbridge import _process_backend

    monkeypatch.setattr(_cpus, "cgroup_cpu_quota", lambda: 0.5)
    assert _process_backend.ProcessBackend().default_limit() == 1
    assert _process_backend.ProcessPool()._workers == 1
