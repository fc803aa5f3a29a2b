"""The hugetlb limits of containers the runtime created (NRI enforcement): where the hugetlb controller is, a
container's cgroup from the cgroupsPath the runtime reports, and both limit files of each page size written.

Why the driver writes them itself (runc versions, containerd's disable_hugetlb_controller): nri/enforcer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dra_cpu.node.cgroups import CgroupError, write_value


def expand_slice(slice_name: str) -> PurePosixPath:
    """systemd's slice naming: "kubepods-burstable-pod1.slice" lives in kubepods.slice/kubepods-burstable.slice/."""
    if slice_name in ("", "-.slice"):
        return PurePosixPath()
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise CgroupError(f"{slice_name!r} is not a systemd slice name")
    path, prefix = PurePosixPath(), ""
    for part in slice_name.removesuffix(".slice").split("-"):
        if not part:
            raise CgroupError(f"{slice_name!r} is not a systemd slice name")
        prefix = f"{prefix}-{part}" if prefix else part
        path /= f"{prefix}.slice"
    return path


def container_cgroup(cgroups_path: str) -> PurePosixPath:
    """The container's cgroup, relative to a hierarchy's root, from the OCI cgroupsPath the runtime reports:
    "/kubepods/pod<uid>/<id>" (cgroupfs driver) or "slice:prefix:name" (systemd driver: a scope in the slice)."""
    if not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        slice_name, prefix, name = cgroups_path.split(":")
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return expand_slice(slice_name or "system.slice") / unit
    relative = PurePosixPath(cgroups_path.lstrip("/"))
    if not cgroups_path or ".." in relative.parts:
        raise CgroupError(f"cgroups path {cgroups_path!r} is not a cgroup path")
    return relative


@dataclass(frozen=True, slots=True)
class HugetlbHierarchy:
    """Where the hugetlb controller is: a cgroup2 mount (pure v2, or the "unified" mount of a hybrid layout) or the
    v1 hugetlb hierarchy. The limit files differ: v2 `hugetlb.<size>.max` and `.rsvd.max`, v1
    `hugetlb.<size>.limit_in_bytes` and `.rsvd.limit_in_bytes`."""

    root: Path
    version: int

    def files(self, page_size: str) -> tuple[str, str]:
        """(fault limit, reservation limit) file names for an OCI page size such as "2MB"."""
        suffix = "max" if self.version == 2 else "limit_in_bytes"
        return f"hugetlb.{page_size}.{suffix}", f"hugetlb.{page_size}.rsvd.{suffix}"


def find_hugetlb_hierarchy(cgroup_root: Path) -> HugetlbHierarchy | None:
    for base in (cgroup_root, cgroup_root / "unified"):
        try:
            if "hugetlb" in (base / "cgroup.controllers").read_text().split():
                return HugetlbHierarchy(base, 2)
        except OSError:
            continue
    if (cgroup_root / "hugetlb" / "cgroup.procs").exists():
        return HugetlbHierarchy(cgroup_root / "hugetlb", 1)
    return None


@dataclass(frozen=True)
class HugetlbResult:
    written: tuple[str, ...]
    """Files whose value was changed (those already right are left alone)."""
    no_reservation_limit: tuple[str, ...] = ()
    """Page sizes whose rsvd file does not exist (kernels before 5.7): only faults are limited."""


def set_hugetlb_limits(
    hierarchy: HugetlbHierarchy, cgroup: PurePosixPath, limits: tuple[tuple[str, int], ...]
) -> HugetlbResult:
    """Make both the fault and the reservation limit of each page size hold `limit` bytes in the container's
    cgroup. CgroupError when the cgroup has no hugetlb files (the controller is not enabled for it)."""
    directory = hierarchy.root / str(cgroup)
    written, missing = [], []
    for page_size, limit in limits:
        fault, reservation = hierarchy.files(page_size)
        if not (directory / fault).exists():
            raise CgroupError(
                f"{directory} has no {fault}: the hugetlb controller is not enabled for the container's cgroup"
            )
        for name in (fault, reservation):
            path = directory / name
            if name == reservation and not path.exists():
                missing.append(page_size)
                continue
            if path.read_text().strip() != str(limit):
                write_value(path, str(limit))
                written.append(name)
    return HugetlbResult(tuple(written), tuple(missing))


class HugetlbWriter:
    """Sets the hugetlb limits of containers under one cgroup root, finding the controller's hierarchy once."""

    def __init__(self, cgroup_root: Path) -> None:
        self.cgroup_root = cgroup_root
        self._hierarchy: HugetlbHierarchy | None = None

    def set_limits(self, cgroups_path: str, limits: tuple[tuple[str, int], ...]) -> HugetlbResult:
        """The container whose OCI cgroupsPath is `cgroups_path` gets `limits` ((OCI page size, bytes)); CgroupError
        when there is no hugetlb controller, or the container's cgroup has no hugetlb files."""
        if self._hierarchy is None:
            self._hierarchy = find_hugetlb_hierarchy(self.cgroup_root)
        if self._hierarchy is None:
            raise CgroupError(f"no hugetlb controller under {self.cgroup_root}")
        return set_hugetlb_limits(self._hierarchy, container_cgroup(cgroups_path), limits)
