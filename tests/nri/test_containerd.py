"""The NRI plugin against a real containerd (each of containerd.sh's versions): cpusets read back inside the
containers and on the host.

Prepares run in-process through the Driver with a claim folder (StandaloneAPI); containers get the claim's CDI
device through CRI the way kubelet passes it. The machine may have only 2 CPUs: one claimed, one shared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import grpc
import pytest

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.sharing import ONE_POD_AT_A_TIME
from dra_cpu.errors import DraCpuError
from dra_cpu.node.hugetlb import find_hugetlb_hierarchy
from tests.harness.fixtures import started
from tests.harness.nodes.nri import ONLINE, NriNode
from tests.harness.poll import wait_until
from tests.harness.runtimes.containerd import Containerd, speaks_nri_0_12


def test_claimed_container_pinned_and_shared_pool_follows_claims(node: NriNode) -> None:
    cri = node.cri
    bystander = cri.create_container(cri.run_pod("bystander"), "plain")
    node.assert_allowed(bystander, ONLINE)

    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    claimed = node.cpus_of(ref)
    assert len(claimed) == 1
    # Prepare shrinks the running bystander at once, before any container of the claim exists.
    node.assert_allowed(bystander, ONLINE - claimed)

    pinned = node.claimed_container(pod, ref)
    node.assert_allowed(pinned, claimed, mems=node.driver.snapshot().view.topology.numa_nodes_of(claimed))
    env = cri.exec_sync(pinned, ["env"]).stdout.splitlines()
    assert f"DRA_CPUSET_{ref.uid}={claimed}" in env
    # A container of the same pod without the claim's device is shared.
    sidecar = cri.create_container(pod, "sidecar")
    node.assert_allowed(sidecar, ONLINE - claimed)

    cri.remove_pod(pod)
    assert node.driver.unprepare([ref]) == {ref.uid: ""}
    node.assert_allowed(bystander, ONLINE)


DEPRECATION_LINES = ("NRI plugin uses a deprecated interface", "uses deprecated StateChange")
"""containerd's deprecation warning (with its recorder, 2.3+) and NRI's own wording (runtimes without one)."""
EVENT_METHODS = ("StartContainer", "RemoveContainer", "StateChange")


def _logged_since(log: Path, offset: int) -> list[str]:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def test_container_events_come_by_their_own_rpcs_where_the_runtime_has_them(node: NriNode) -> None:
    """containerd 2.3+ (NRI 0.12) calls StartContainer and RemoveContainer, and would fall back to StateChange, with a
    deprecation warning in its log, had the plugin answered UNIMPLEMENTED; older ones send StateChange events."""
    cri, log = node.cri, node.containerd.log
    offset, before = log.stat().st_size, Counter(node.plugin.stub.calls)
    bystander = cri.create_container(cri.run_pod("bystander"), "plain")
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    claimed = node.cpus_of(ref)
    pinned = node.claimed_container(pod, ref)
    sidecar = cri.create_container(pod, "sidecar")
    node.assert_allowed(pinned, claimed)
    node.assert_allowed(sidecar, ONLINE - claimed)
    node.assert_allowed(bystander, ONLINE - claimed)

    cri.remove_pod(pod)
    assert node.driver.unprepare([ref]) == {ref.uid: ""}
    node.assert_allowed(bystander, ONLINE)
    delivered = {method: node.plugin.stub.calls[method] - before[method] for method in EVENT_METHODS}
    if speaks_nri_0_12(node.containerd.version):
        assert delivered == {"StartContainer": 3, "RemoveContainer": 2, "StateChange": 0}
        assert any("(with NRI version v0.12.3)" in line for line in _logged_since(log, 0))
    else:
        assert delivered == {"StartContainer": 0, "RemoveContainer": 0, "StateChange": 5}
    assert [line for line in _logged_since(log, offset) if any(d in line for d in DEPRECATION_LINES)] == []


def test_forged_env_gets_the_shared_pool_and_is_counted(node: NriNode) -> None:
    cri = node.cri
    owner = cri.run_pod("owner", uid=str(uuid.uuid4()))
    ref = node.claim([owner.uid])
    claimed = node.cpus_of(ref)
    forger = cri.run_pod("forger")
    before = node.plugin.counters.forged_env

    # A copy of the claim's exact variable looks like a pod that shares the claim (NRI does not say which CDI
    # devices a container got): refused, not run.
    with pytest.raises(grpc.RpcError, match=ONE_POD_AT_A_TIME):
        cri.create_container(forger, "copied", env={f"DRA_CPUSET_{ref.uid}": str(claimed)})
    forged = cri.create_container(forger, "forged", env={f"DRA_CPUSET_{ref.uid}": str(ONLINE)})
    node.assert_allowed(forged, ONLINE - claimed)
    assert node.plugin.counters.forged_env == before + 1
    # The right pod with the wrong cpuset in its env is no better.
    wrong = str(ONLINE - claimed)
    mismatched = cri.create_container(owner, "mismatched", env={f"DRA_CPUSET_{ref.uid}": wrong})
    node.assert_allowed(mismatched, ONLINE - claimed)
    assert node.plugin.counters.forged_env == before + 2


def test_someone_elses_update_does_not_unpin(node: NriNode) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    pinned = node.claimed_container(pod, ref)
    plain = cri.create_container(pod, "plain")
    node.assert_allowed(pinned, node.cpus_of(ref))

    cri.update_resources(pinned, cpuset_cpus=str(ONLINE))
    cri.update_resources(plain, cpuset_cpus=str(ONLINE))
    node.assert_allowed(pinned, node.cpus_of(ref))
    node.assert_allowed(plain, node.shared())


def test_plugin_restart_keeps_pins_and_reconciles(node: NriNode) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    pinned = node.claimed_container(pod, ref)
    node.assert_allowed(pinned, node.cpus_of(ref))

    node.plugin.stop()
    # While no plugin is connected the runtime creates containers unpinned ...
    missed = cri.create_container(cri.run_pod("while-down"), "missed")
    node.assert_allowed(missed, ONLINE)
    node.assert_allowed(pinned, node.cpus_of(ref))

    node.new_plugin()
    # ... and Synchronize puts them on the shared pool; the pinned one stays pinned.
    node.assert_allowed(missed, ONLINE - node.cpus_of(ref))
    node.assert_allowed(pinned, node.cpus_of(ref))


def test_containerd_restart_reconnects_and_resynchronizes(fresh_node: NriNode) -> None:
    node = fresh_node
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    first = node.claim([pod.uid])
    pinned = node.claimed_container(pod, first)
    plain = cri.create_container(cri.run_pod("plain"), "plain")
    node.assert_allowed(plain, ONLINE - node.cpus_of(first))

    node.containerd.restart()
    assert node.plugin.wait_ready(15), "the plugin did not reconnect to the restarted containerd"
    assert node.plugin.counters.connects == 2
    node.assert_allowed(pinned, node.cpus_of(first))
    # The reconnected plugin still follows claims: unprepare regrows the running container.
    cri.remove_pod(pod)
    assert node.driver.unprepare([first]) == {first.uid: ""}
    node.assert_allowed(plain, ONLINE)


def test_enforcement_down_fails_prepares_after_the_grace_period(fresh_node: NriNode) -> None:
    node = fresh_node
    node.plugin.stop()
    node.new_plugin(grace_seconds=0.0)
    os.kill(int((node.containerd.dir / "containerd.pid").read_text()), signal.SIGKILL)
    wait_until(lambda: not node.plugin.ready.is_set(), "the plugin should notice the runtime is gone")
    with pytest.raises(DraCpuError, match="not enforced"):
        node.plugin.check_ready()
    ref = ClaimRef("default", "late", str(uuid.uuid4()))
    assert "not enforced" in node.driver.prepare([ref])[ref.uid].error


def test_two_claims_never_overlap_and_an_empty_shared_pool_refuses_containers(
    containerd: Containerd, tmp_path: Path
) -> None:
    with started(NriNode(containerd, tmp_path, min_shared_cpus=0), "the NRI node") as node:
        cri = node.cri
        pods = [cri.run_pod(f"claimant-{i}", uid=str(uuid.uuid4())) for i in range(len(ONLINE))]
        refs = [node.claim([pod.uid]) for pod in pods]
        cpus = [node.cpus_of(ref) for ref in refs]
        assert CPUSet.union_all(cpus) == ONLINE and sum(map(len, cpus)) == len(ONLINE)
        for pod, ref, mine in zip(pods, refs, cpus, strict=True):
            node.assert_allowed(node.claimed_container(pod, ref), mine)
        with pytest.raises(grpc.RpcError, match="no shared CPU"):
            cri.create_container(pods[0], "unclaimed")


def test_containers_of_one_pod_share_its_claim_and_another_pod_is_refused(node: NriNode) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid])
    claimed = node.cpus_of(ref)
    # Both containers reference the claim: both run on its CPUs (one scheduling unit, like a VM and its helper).
    for name in ("app", "helper"):
        node.assert_allowed(node.claimed_container(pod, ref, name=name), claimed)
    # A second pod whose spec names the same claim gets the claim's CDI device (the kubelet does not prepare the
    # claim again for it), and is refused with the reason rather than silently put on the shared pool.
    before = node.plugin.counters.forged_env
    with pytest.raises(grpc.RpcError) as refused:
        node.claimed_container(cri.run_pod("second", uid=str(uuid.uuid4())), ref)
    assert f"claim {ref} is held by pod {pod.uid}" in str(refused.value)
    assert ONE_POD_AT_A_TIME in str(refused.value)
    assert (node.plugin.counters.shared_claim_refused, node.plugin.counters.forged_env) == (1, before)


HUGEPAGES_2MI = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages")


@contextlib.contextmanager
def _reserved_2mi_pages(count: int) -> Iterator[None]:
    before = HUGEPAGES_2MI.read_text().strip()
    HUGEPAGES_2MI.write_text(str(int(before) + count))
    try:
        if int(HUGEPAGES_2MI.read_text()) < int(before) + count:
            pytest.skip(f"the kernel did not reserve {count} more 2 MiB pages on node 0")
        yield
    finally:
        HUGEPAGES_2MI.write_text(before)


@contextlib.contextmanager
def _hugetlb_enabled(root: Path, cgroup: PurePosixPath) -> Iterator[None]:
    """Enable the v2 hugetlb controller on `cgroup`'s ancestors, as the kubelet does on pure v2 nodes; on a hybrid
    layout nobody enables it on the "unified" hierarchy, which holds nothing but hugetlb."""
    enabled = []
    try:
        for directory in [root, *(root / str(p) for p in reversed(cgroup.parents) if str(p) != ".")]:
            control = directory / "cgroup.subtree_control"
            if "hugetlb" not in control.read_text().split():
                control.write_text("+hugetlb")
                enabled.append(control)
        yield
    finally:
        for control in reversed(enabled):
            with contextlib.suppress(OSError):  # busy while another run's cgroups use it: it is harmless left on
                control.write_text("-hugetlb")


def test_hugepage_claim_limits_read_back_from_cgroupfs(containerd: Containerd, tmp_path: Path) -> None:
    """containerd drops the adjustment's hugepage limits while `disable_hugetlb_controller` is true (its default, and
    this test environment's), and runc 1.1.5 writes no reservation limit: the enforcer writes both itself."""
    hierarchy = find_hugetlb_hierarchy(Path("/sys/fs/cgroup"))
    if hierarchy is None or hierarchy.version != 2:
        pytest.skip("no cgroup v2 hugetlb controller on this machine")
    with _reserved_2mi_pages(2), started(NriNode(containerd, tmp_path), "the NRI node") as node:
        cri = node.cri
        pod = cri.run_pod("hugepages", uid=str(uuid.uuid4()))
        ref = node.claim([pod.uid], hugepages_2mi="4Mi")
        container_cgroup = PurePosixPath(pod.cgroup_parent.lstrip("/")) / "c"
        with _hugetlb_enabled(hierarchy.root, container_cgroup):
            pinned = node.claimed_container(pod, ref)
            node.assert_allowed(pinned, node.cpus_of(ref), mems=CPUSet.of([0]))
            directory = hierarchy.root / pod.cgroup_parent.lstrip("/") / pinned.id
            for name in ("hugetlb.2MB.max", "hugetlb.2MB.rsvd.max"):
                assert (directory / name).read_text().strip() == str(4 << 20), name
            assert node.plugin.counters.hugetlb_unenforced == 0
            cri.remove_pod(pod)
        assert node.driver.unprepare([ref]) == {ref.uid: ""}
