"""hack/testenv/cgroupv2.sh on a real v1 hierarchy that nothing else uses: net_cls, mounted by the test itself.

The cpuset and cpu hierarchies are shared with the machine's other test runs, so the script's refusal, its removal
of leftovers and its repair of a half-done move are exercised here on net_cls. net_cls has no cgroup2 counterpart,
so `enter` fails where it enables the controller on cgroup2: the point where only leave's repair can put the
hierarchy back.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_cpu.node.cgroups import parse_mountinfo
from tests.support.paths import TESTENV

SCRIPT = TESTENV / "cgroupv2.sh"
UNIFIED = Path("/sys/fs/cgroup/unified")

pytestmark = pytest.mark.root


def _net_cls_mounts() -> list[tuple[Path, frozenset[str]]]:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [(m.point, m.options) for m in mounts if m.fstype == "cgroup" and "net_cls" in m.options]


@pytest.fixture
def net_cls(tmp_path: Path) -> Iterator[Path]:
    """A v1 net_cls hierarchy of this test's own."""
    if os.geteuid() != 0:
        pytest.skip("mounting a cgroup hierarchy needs root")
    if not UNIFIED.is_dir() or _net_cls_mounts():
        pytest.skip("needs the hybrid layout with net_cls unmounted")
    point = tmp_path / "net_cls"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "cgroup", "-o", "net_cls", "cgroup", str(point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a v1 net_cls hierarchy: {mounted.stderr.decode().strip()}")
    try:
        yield point
    finally:
        for child in sorted((d for d in point.rglob("*") if d.is_dir()), reverse=True):
            _rmdir(child)
        subprocess.run(["umount", str(point)], check=True)


def _rmdir(cgroup: Path) -> None:
    # A cgroup empties a moment after its last task was killed.
    deadline = time.monotonic() + 5
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _script(command: str, state: Path) -> subprocess.CompletedProcess[str]:
    # net_cls never becomes a cgroup2 controller: no point waiting for the kernel to release it.
    env = {
        **os.environ,
        "CGROUPV2_CONTROLLERS": "net_cls",
        "CGROUPV2_STATE": str(state),
        "CGROUPV2_RELEASE_SECONDS": "2",
    }
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, env=env, timeout=60)


def test_refuses_busy_hierarchies_removes_leftovers_and_repairs_a_failed_enter(net_cls: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    leftover = net_cls / "dra-cpu-leftover" / "child"
    leftover.mkdir(parents=True)
    busy = net_cls / "dra-cpu-busy"
    busy.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (busy / "cgroup.procs").write_text(str(sleeper.pid))
        refused = _script("check", state)
        assert refused.returncode == 1
        assert f"{busy} holds processes (1, e.g. pid {sleeper.pid}: sleep 60 )" in refused.stderr
        assert "leftover" not in refused.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    _rmdir(busy)
    unexpected = net_cls / "someone-elses"
    unexpected.mkdir()
    assert f"{unexpected} is an empty cgroup this script did not expect" in _script("check", state).stderr
    unexpected.rmdir()

    checked = _script("check", state)
    assert checked.returncode == 0, checked.stderr
    assert f"would remove these empty leftovers: {net_cls / 'dra-cpu-leftover'}" in checked.stdout
    before, subtree = _net_cls_mounts(), (UNIFIED / "cgroup.subtree_control").read_text()

    entered = _script("enter", state)
    assert entered.returncode != 0
    assert "enter failed; moving back" in entered.stderr
    # Back as it was, from a fresh hierarchy: same place and options, no leftover, no state, cgroup2 untouched.
    assert _net_cls_mounts() == before
    assert not (net_cls / "dra-cpu-leftover").exists()
    assert not state.exists()
    assert (UNIFIED / "cgroup.subtree_control").read_text() == subtree
    left = _script("leave", state)
    assert left.returncode == 0 and not left.stderr
