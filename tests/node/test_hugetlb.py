"""The hugetlb limits of a container: its cgroup from the runtime's cgroupsPath, the controller's hierarchy in every
layout, and both limit files written only where they differ."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from dra_cpu.node import hugetlb
from dra_cpu.node.cgroups import CgroupError


@pytest.mark.parametrize(
    ("cgroups_path", "relative"),
    [
        ("/kubepods/burstable/pod1/abc", "kubepods/burstable/pod1/abc"),
        (
            "kubepods-burstable-pod1.slice:cri-containerd:abc",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope",
        ),
        ("kubepods-pod2.slice:crio:def", "kubepods.slice/kubepods-pod2.slice/crio-def.scope"),
        (":crio:def", "system.slice/crio-def.scope"),
        ("-.slice::x", "x.scope"),
    ],
)
def test_container_cgroup_of_both_drivers(cgroups_path: str, relative: str) -> None:
    assert str(hugetlb.container_cgroup(cgroups_path)) == relative


@pytest.mark.parametrize("bad", ["", "/a/../b", "a-.slice:p:n", "a/b.slice:p:n"])
def test_container_cgroup_refuses_what_is_no_cgroup(bad: str) -> None:
    with pytest.raises(CgroupError):
        hugetlb.container_cgroup(bad)


def test_hugetlb_hierarchy_pure_v2_hybrid_and_v1(tmp_path: Path) -> None:
    assert hugetlb.find_hugetlb_hierarchy(tmp_path) is None
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    hybrid = hugetlb.find_hugetlb_hierarchy(tmp_path)
    assert hybrid == hugetlb.HugetlbHierarchy(tmp_path / "unified", 2)
    assert hybrid.files("2MB") == ("hugetlb.2MB.max", "hugetlb.2MB.rsvd.max")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu hugetlb\n")
    assert hugetlb.find_hugetlb_hierarchy(tmp_path) == hugetlb.HugetlbHierarchy(tmp_path, 2)
    v1 = tmp_path / "v1"
    (v1 / "hugetlb").mkdir(parents=True)
    (v1 / "hugetlb" / "cgroup.procs").write_text("")
    found = hugetlb.find_hugetlb_hierarchy(v1)
    assert found is not None and found.files("1GB") == ("hugetlb.1GB.limit_in_bytes", "hugetlb.1GB.rsvd.limit_in_bytes")


def test_set_hugetlb_limits_writes_only_what_differs(tmp_path: Path) -> None:
    hierarchy = hugetlb.HugetlbHierarchy(tmp_path, 2)
    (tmp_path / "pod" / "c").mkdir(parents=True)
    for name, value in [("hugetlb.2MB.max", "max"), ("hugetlb.2MB.rsvd.max", "4194304"), ("hugetlb.1GB.max", "max")]:
        (tmp_path / "pod" / "c" / name).write_text(value + "\n")
    result = hugetlb.set_hugetlb_limits(hierarchy, PurePosixPath("pod/c"), (("1GB", 1 << 30), ("2MB", 4 << 20)))
    assert result == hugetlb.HugetlbResult(("hugetlb.1GB.max", "hugetlb.2MB.max"), ("1GB",))
    assert (tmp_path / "pod" / "c" / "hugetlb.2MB.max").read_text() == "4194304"
