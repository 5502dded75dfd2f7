"""How many CPUs this process may really use: the default number of busy workers.

``os.cpu_count()`` counts every CPU of the machine. A process can be held to fewer in
two ways, and both are counted here:

* its affinity (``taskset``, a container's cpuset): the CPUs it may run on;
* a CPU quota of its cgroup (``docker --cpus=2``, a Kubernetes CPU limit, systemd's
  ``CPUQuota=``): CPU time per period, which the kernel enforces by pausing the whole
  group once it is spent. A container held to 2 CPUs on a 64-CPU host sees 64 CPUs of
  affinity; 64 busy workers there would each run a thirty-second of the time, with the
  memory of 64.

A quota is read from the cgroup files of Linux (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), along the process's own cgroup and each
of its parents, as the kernel applies them. A fractional quota counts up (1.5 CPUs
allow 2 workers), and never below 1. Whatever cannot be read (another OS, an unusual
mount) counts as no quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["affinity_cpus", "cgroup_cpu_quota", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, lowered to its cgroup's CPU quota."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def affinity_cpus() -> int:
    """The CPUs this process may run on."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+ (PYTHON_CPU_COUNT too)
    if count is not None:
        return int(count() or 1)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS has no affinity
        return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota that holds this process, in CPUs (``1.5``), or None if there is none.

    The tightest of the quotas set on its cgroup and on every parent of it, in each
    hierarchy that has the ``cpu`` controller. ``root`` stands for ``/``, for tests.
    """
    try:
        groups = (root / "proc/self/cgroup").read_text()
        mounts = (root / "proc/self/mountinfo").read_text()
    except OSError:
        return None
    quotas = [
        quota
        for directory, mount_point, v2 in _cpu_cgroup_dirs(groups, mounts, root)
        if (quota := _tightest_quota(directory, mount_point, v2)) is not None
    ]
    return min(quotas, default=None)


def _cpu_cgroup_dirs(groups: str, mounts: str, root: Path) -> list[tuple[Path, Path, bool]]:
    """The directories of this process's cgroups that can hold a CPU quota, each with the
    mount point it lies under and whether it is cgroup v2."""
    v2_path: str | None = None
    v1_path: str | None = None
    for line in groups.splitlines():
        # "hierarchy-id:controllers:path"; v2 is "0::path"; the path may contain ":".
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    found: list[tuple[Path, Path, bool]] = []
    for line in mounts.splitlines():
        # "id parent dev root mount-point options [optional...] - fstype source options"
        before, dash, after = line.partition(" - ")
        if not dash:
            continue
        fields = before.split()
        tail = after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        fstype, super_options = tail[0], tail[2].split(",")
        if fstype == "cgroup2" and v2_path is not None:
            path, v2 = v2_path, True
        elif fstype == "cgroup" and "cpu" in super_options and v1_path is not None:
            path, v2 = v1_path, False
        else:
            continue
        inside = _relative_to(path, mount_root)
        if inside is None:  # this mount shows another part of the hierarchy
            continue
        base = root / mount_point.lstrip("/")
        found.append((base / inside if inside else base, base, v2))
    return found


def _relative_to(path: str, mount_root: str) -> str | None:
    """``path`` (a cgroup) below ``mount_root`` (the part of the hierarchy mounted), as
    a relative path; None when it is not below it."""
    path = path.rstrip("/") or "/"
    mount_root = mount_root.rstrip("/") or "/"
    if mount_root == "/":
        return path.lstrip("/")
    if path == mount_root:
        return ""
    if path.startswith(mount_root + "/"):
        return path[len(mount_root) + 1 :]
    return None


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _tightest_quota(directory: Path, mount_point: Path, v2: bool) -> float | None:
    """The smallest quota from ``directory`` up to ``mount_point``, in CPUs."""
    tightest: float | None = None
    current = directory
    while True:
        quota = _read_v2(current) if v2 else _read_v1(current)
        if quota is not None and (tightest is None or quota < tightest):
            tightest = quota
        if current == mount_point or mount_point not in current.parents:
            return tightest
        current = current.parent


def _read_v2(directory: Path) -> float | None:
    """cgroup v2's ``cpu.max``: ``"max 100000"`` (none) or ``"200000 100000"``."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        if quota == "max":
            return None
        return _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _read_v1(directory: Path) -> float | None:
    """cgroup v1's ``cpu.cfs_quota_us`` (``-1``: none) over ``cpu.cfs_period_us``."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period
