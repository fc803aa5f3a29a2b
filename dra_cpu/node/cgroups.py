"""Where a process's cpuset lives (cgroup v1 or v2) and reading and writing it.

The pure part maps /proc/<pid>/cgroup and /proc/self/mountinfo to the directory holding cpuset.cpus: on v1 the
hierarchy the cpuset controller is mounted on, else the unified (v2) hierarchy. A hybrid machine (v1 controllers
plus a cgroup2 mount without cpuset) takes the v1 path, because a controller serves only one hierarchy at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError


class CgroupError(DraCpuError):
    pass


@dataclass(frozen=True)
class CgroupMount:
    root: str
    """The path inside the hierarchy that is mounted (not "/" inside a cgroup namespace)."""
    point: Path
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def parse_mountinfo(text: str) -> tuple[CgroupMount, ...]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 4 or fields[sep + 1] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            CgroupMount(
                root=_unescape(fields[3]),
                point=Path(_unescape(fields[4])),
                fstype=fields[sep + 1],
                options=frozenset(fields[sep + 3].split(",")),
            )
        )
    return tuple(mounts)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller -> cgroup path; the v2 line ("0::/path") is under the key ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"/proc/<pid>/cgroup line {line!r} is not ID:CONTROLLERS:PATH")
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def _inside(mount: CgroupMount, path: str) -> Path:
    relative = PurePosixPath(path).relative_to(mount.root) if path.startswith(mount.root) else PurePosixPath(path)
    return mount.point / str(relative).lstrip("/")


def cpuset_dir(proc_cgroup: str, mountinfo: str) -> Path:
    """The directory with cpuset.cpus and cpuset.mems for the process whose /proc/<pid>/cgroup is given."""
    paths = parse_proc_cgroup(proc_cgroup)
    mounts = _visible(parse_mountinfo(mountinfo))
    v1 = next((m for m in mounts if m.fstype == "cgroup" and "cpuset" in m.options), None)
    if v1 is not None and "cpuset" in paths:
        return _inside(v1, paths["cpuset"])
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None and "" in paths:
        return _inside(v2, paths[""])
    raise CgroupError(
        f"no cpuset cgroup found: the process is in {paths or 'no cgroup'} and cgroup mounts are "
        f"{[str(m.point) for m in mounts] or 'none'}"
    )


def _visible(mounts: tuple[CgroupMount, ...]) -> list[CgroupMount]:
    """Mounts not covered by a later one on the same point or above it (mountinfo lists mounts oldest first): in a
    namespace that mounted cgroup2 over /sys/fs/cgroup, the host's /sys/fs/cgroup/unified is still listed."""
    return [
        m
        for i, m in enumerate(mounts)
        if not any(later.point == m.point or later.point in m.point.parents for later in mounts[i + 1 :])
    ]


def cpuset_dir_of_pid(pid: int, proc: Path = Path("/proc")) -> Path:
    try:
        proc_cgroup = (proc / str(pid) / "cgroup").read_text()
        mountinfo = (proc / "self" / "mountinfo").read_text()
    except OSError as err:
        raise CgroupError(f"cannot read the cgroup of pid {pid}: {err.strerror}") from None
    return cpuset_dir(proc_cgroup, mountinfo)


@dataclass(frozen=True)
class Cpuset:
    cpus: CPUSet
    mems: CPUSet


def _read(path: Path) -> CPUSet:
    try:
        return CPUSet.parse(path.read_text().strip())
    except OSError as err:
        raise CgroupError(f"cannot read {path}: {err.strerror}") from None


def _first(directory: Path, *names: str) -> Path:
    return next((directory / n for n in names if (directory / n).exists()), directory / names[-1])


def read_cpuset(directory: Path) -> Cpuset:
    """What the cgroup grants: the effective sets where the kernel has them (v2 leaves cpuset.cpus empty to
    mean "the parent's"), else the configured ones."""
    return Cpuset(
        _read(_first(directory, "cpuset.effective_cpus", "cpuset.cpus.effective", "cpuset.cpus")),
        _read(_first(directory, "cpuset.effective_mems", "cpuset.mems.effective", "cpuset.mems")),
    )


def write_cpuset(directory: Path, cpus: CPUSet, mems: CPUSet | None = None) -> None:
    """Set cpuset.cpus (and cpuset.mems); the kernel refuses sets outside the parent's, and says so."""
    if not cpus:
        raise CgroupError(f"refusing to write an empty cpuset.cpus to {directory}: it would mean every CPU on v2")
    writes = [("cpuset.mems", mems)] if mems else []
    for name, value in [*writes, ("cpuset.cpus", cpus)]:
        write_value(directory / name, str(value))


# -- child cpusets of this process's own (the demo and the isolation bench) ----------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
# rmdir of a cgroup whose last task just exited can fail for a moment while the kernel finishes the exit.
RMDIR_TRIES = 50


@dataclass(frozen=True, slots=True)
class CpusetHierarchy:
    """Where this process's cpuset cgroup is, and which cgroup version holds it."""

    version: int
    parent: Path

    @property
    def name(self) -> str:
        return f"cgroup-v{self.version}"


def find_cpuset_hierarchy(root: Path, proc_cgroup: str) -> CpusetHierarchy | None:
    """A writable cpuset hierarchy, preferring v2 where cpuset is a v2 controller (hybrid hosts keep it in v1)."""
    paths = parse_proc_cgroup(proc_cgroup)
    v1, v2 = paths.get("cpuset"), paths.get("")
    controllers = root / "cgroup.controllers"
    if v2 is not None and controllers.exists() and "cpuset" in controllers.read_text().split():
        parent = root / v2.lstrip("/")
        return CpusetHierarchy(2, parent) if os.access(parent, os.W_OK) else None
    if v1 is not None and (root / "cpuset/cpuset.cpus").exists():
        parent = root / "cpuset" / v1.lstrip("/")
        return CpusetHierarchy(1, parent) if os.access(parent, os.W_OK) else None
    return None


class Cpusets:
    """Child cpusets of this process's own, created on demand and removed (with what was enabled) on close."""

    def __init__(self, hierarchy: CpusetHierarchy, tag: str) -> None:
        self.hierarchy = hierarchy
        self.tag = tag
        self.created: list[Path] = []
        self.enabled_controller = False
        if hierarchy.version == 2:
            control = hierarchy.parent / "cgroup.subtree_control"
            if "cpuset" not in control.read_text().split():
                write_value(control, "+cpuset")
                self.enabled_controller = True

    def place(self, name: str, cpus: CPUSet, pids: list[int]) -> None:
        group = self.hierarchy.parent / f"{self.tag}-{name}"
        if not group.exists():
            group.mkdir()
            self.created.append(group)
        # v1 refuses tasks until both cpus and mems are set; the parent's mems keep memory where it was allowed.
        mems = self.hierarchy.parent / ("cpuset.mems.effective" if self.hierarchy.version == 2 else "cpuset.mems")
        write_cpuset(group, cpus, CPUSet.parse(mems.read_text()))
        for pid in pids:
            write_value(group / "cgroup.procs", str(pid))

    def close(self) -> None:
        for group in reversed(self.created):
            for _ in range(RMDIR_TRIES):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                raise CgroupError(f"cgroup {group}: could not remove it; remove it by hand with rmdir")
        self.created.clear()
        if self.enabled_controller:
            write_value(self.hierarchy.parent / "cgroup.subtree_control", "-cpuset")


def write_value(path: Path, value: str) -> None:
    """One value into a cgroup file; CgroupError naming the file."""
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"cannot write {value} to {path}: {err.strerror}") from None
