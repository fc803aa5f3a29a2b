"""The NRI enforcement tests of test_nri_containerd.py on cgroup v2, against containerd 2.1 and 1.7.

Production nodes are mostly pure cgroup v2. On a hybrid machine this module moves the cpuset and cpu controllers to
cgroup v2 with hack/testenv/cgroupv2.sh for its own duration only and runs containerd in a mount namespace where
cgroup2 is on /sys/fs/cgroup, as runc expects; the teardown moves them back (and fails loudly if it cannot), so the
rest of the suite keeps the original layout whatever order it runs in. A pure v2 host runs the same tests as it is.
Where the controllers cannot be moved (a v1 cpuset or cpu cgroup holds processes, ...) the tests skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.node.cgroups import Cpuset, cpuset_dir_of_pid, parse_mountinfo, parse_proc_cgroup, read_cpuset
from tests.nri import test_containerd as nri
from tests.support.nri_node import Node, nri_node
from tests.support.paths import REPO
from tests.support.testenv_containerd import VERSIONS, Containerd, _start, _stop

CGROUPV2 = REPO / "hack" / "testenv" / "cgroupv2.sh"

pytestmark = [pytest.mark.containerd, pytest.mark.root]


def _cgroupv2(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CGROUPV2), command], capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def v2_namespace() -> Iterator[tuple[str, ...]]:
    """The command prefix that runs a program where cgroup2, with cpuset and cpu, is on /sys/fs/cgroup."""
    if os.geteuid() != 0:
        pytest.skip("moving cgroup controllers needs root")
    check = _cgroupv2("check")
    if check.returncode != 0:
        reasons = check.stderr.strip().splitlines()
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        pytest.skip(f"cpuset and cpu cannot be moved to cgroup v2 here: {'; '.join(reasons[:3])}{more}")
    try:
        enter = _cgroupv2("enter")
        if enter.returncode == 3:
            pytest.skip(f"cpuset and cpu cannot be moved to cgroup v2 now: {enter.stderr.strip().splitlines()[0]}")
        assert enter.returncode == 0, f"cgroupv2.sh enter failed although check passed:\n{enter.stderr}"
        namespace = enter.stdout.strip()
        yield ("nsenter", f"--mount={namespace}") if namespace else ()
    finally:
        leave = _cgroupv2("leave")
        assert leave.returncode == 0, f"cgroupv2.sh leave could not restore the cgroup layout:\n{leave.stderr}"


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def containerd_v2(request: pytest.FixtureRequest, v2_namespace: tuple[str, ...]) -> Iterator[Containerd]:
    daemon = _start(str(request.param), wrap=v2_namespace)
    try:
        yield daemon
    finally:
        _stop(daemon)


@pytest.fixture
def node(containerd_v2: Containerd, tmp_path: Path) -> Iterator[Node]:
    try:
        yield from nri_node(containerd_v2, tmp_path)
    finally:
        containerd_v2.clean()


ENFORCEMENT_TESTS: list[Callable[[Node], None]] = [
    nri.test_claimed_container_pinned_and_shared_pool_follows_claims,
    nri.test_forged_env_gets_the_shared_pool_and_is_counted,
    nri.test_someone_elses_update_does_not_unpin,
    nri.test_plugin_restart_keeps_pins_and_reconciles,
]


@pytest.mark.parametrize("scenario", ENFORCEMENT_TESTS, ids=lambda t: t.__name__.removeprefix("test_"))
def test_enforcement_on_cgroup_v2(node: Node, scenario: Callable[[Node], None]) -> None:
    scenario(node)


def _v2_path(pid: int) -> str:
    """The container's cgroup path, after checking that it has no v1 cpuset or cpu cgroup."""
    paths = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    assert not {"cpuset", "cpu"} & paths.keys(), f"pid {pid} still has v1 cpu controllers: {paths}"
    return paths[""]


def _in_namespace(wrap: tuple[str, ...], pid: int) -> tuple[Path, Cpuset]:
    """cpuset_dir_of_pid and read_cpuset as a process sees them where cgroup2 is /sys/fs/cgroup (as in production)."""
    code = (
        "import sys; from dra_cpu.node.cgroups import cpuset_dir_of_pid, read_cpuset\n"
        f"d = cpuset_dir_of_pid({pid}); c = read_cpuset(d); print(d, c.cpus, c.mems, sep='\\n')"
    )
    out = subprocess.run([*wrap, sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    directory, cpus, mems = out.stdout.splitlines()
    return Path(directory), Cpuset(CPUSet.parse(cpus), CPUSet.parse(mems))


def test_cgroups_module_reads_a_v2_container_cgroup(node: Node, v2_namespace: tuple[str, ...]) -> None:
    cri = node.cri
    bystander = cri.create_container(cri.run_pod("bystander"), "plain")
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    claimed = node.cpus_of(ref)
    mems = node.driver.topology.numa_nodes_of(claimed)
    pinned = node.claimed_container(pod, ref)
    node.assert_allowed(pinned, claimed, mems=mems)
    node.assert_allowed(bystander, node.shared())

    own_v2 = next(m.point for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()) if m.fstype == "cgroup2")
    for container, cpus in ((pinned, claimed), (bystander, node.shared())):
        pid = cri.pid(container)
        path = _v2_path(pid)
        assert path.startswith(f"{container.pod.cgroup_parent}/") and path.endswith(container.id), path
        # This process's view: cpuset lives in the cgroup2 mount it has (/sys/fs/cgroup/unified on a hybrid host).
        directory = cpuset_dir_of_pid(pid)
        assert directory == own_v2 / path.lstrip("/")
        # The cgroup itself is what enforces it: configured and effective sets, not just the task's affinity.
        assert CPUSet.parse((directory / "cpuset.cpus").read_text()) == cpus
        assert read_cpuset(directory).cpus == cpus
        # The production view, cgroup2 on /sys/fs/cgroup, finds the same cgroup with the same sets.
        inside, cpuset = _in_namespace(v2_namespace, pid)
        assert inside == Path("/sys/fs/cgroup") / path.lstrip("/")
        assert cpuset == read_cpuset(directory)
    assert read_cpuset(cpuset_dir_of_pid(cri.pid(pinned))).mems == mems
