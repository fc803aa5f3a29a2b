"""Finding and writing a process's cpuset: parsing on recorded layouts, and a real v1 (or v2) cgroup as root."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.node.cgroups import (
    CgroupError,
    cpuset_dir,
    cpuset_dir_of_pid,
    parse_proc_cgroup,
    read_cpuset,
    write_cpuset,
)
from tests.harness.runtimes.cri import Allowed

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
NAMESPACED_MOUNTS = "29 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def test_hybrid_layout_takes_the_v1_cpuset_hierarchy() -> None:
    proc = "3:cpuset:/kubepods/pod1/c1\n1:cpu:/kubepods/pod1/c1\n0::/\n"
    assert cpuset_dir(proc, HYBRID_MOUNTS) == Path("/sys/fs/cgroup/cpuset/kubepods/pod1/c1")


def test_v2_layout_takes_the_unified_path() -> None:
    assert cpuset_dir("0::/kubepods.slice/c1\n", V2_MOUNTS) == Path("/sys/fs/cgroup/kubepods.slice/c1")


def test_a_cgroup_namespace_mount_root_is_stripped() -> None:
    assert cpuset_dir("0::/kubepods/pod1/c1\n", NAMESPACED_MOUNTS) == Path("/sys/fs/cgroup/c1")


def test_bad_input_names_the_value() -> None:
    with pytest.raises(CgroupError, match="'garbage'"):
        parse_proc_cgroup("garbage")
    with pytest.raises(CgroupError, match="no cpuset cgroup found"):
        cpuset_dir("3:cpuset:/x\n", V2_MOUNTS.replace("cgroup2 cgroup2", "tmpfs tmpfs"))


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    """A fresh cgroup in the machine's cpuset hierarchy (v1 or v2), with a sleeping process in it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    parent = cpuset_dir_of_pid(os.getpid())
    if not (parent / "cpuset.cpus").exists():
        pytest.skip(f"no cpuset controller at {parent}")
    child = parent / f"dra-cpu-test-{uuid.uuid4().hex[:8]}"
    child.mkdir()
    # v1 children start with empty sets and take no task until both are set.
    write_cpuset(child, read_cpuset(parent).cpus, read_cpuset(parent).mems)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (child / "cgroup.procs").write_text(str(sleeper.pid))
        yield child
    finally:
        sleeper.kill()
        sleeper.wait()
        for _ in range(50):
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_write_cpuset_moves_a_running_process(child_cgroup: Path) -> None:
    pid = int((child_cgroup / "cgroup.procs").read_text().split()[0])
    assert cpuset_dir_of_pid(pid) == child_cgroup
    last = CPUSet.of([max(os.sched_getaffinity(0))])
    mems = Allowed.of_pid(pid).mems
    write_cpuset(child_cgroup, last, mems)
    assert Allowed.of_pid(pid) == Allowed(last, mems)
    assert read_cpuset(child_cgroup).cpus == last


def test_write_outside_the_parent_is_a_clear_error(child_cgroup: Path) -> None:
    with pytest.raises(CgroupError, match=f"cannot write 4095 to {child_cgroup}/cpuset.cpus"):
        write_cpuset(child_cgroup, CPUSet.of([4095]))
    with pytest.raises(CgroupError, match="empty"):
        write_cpuset(child_cgroup, CPUSet())


def test_a_cgroup2_mount_over_sys_fs_cgroup_hides_the_hosts_unified_mount() -> None:
    """Inside a namespace that mounted cgroup2 on /sys/fs/cgroup, mountinfo still lists the covered host mounts."""
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "40 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    assert cpuset_dir("0::/kubepods/pod1/c1\n", mountinfo) == Path("/sys/fs/cgroup/kubepods/pod1/c1")
