"""The NRI enforcement scenarios of tests/nri/test_containerd.py on a pure cgroup v2 node, against containerd 2.1, 1.7
and 2.4 inside the test guest: only cgroup2 is mounted, on /sys/fs/cgroup, as on most production nodes. The driver is
`dra-cpu run --enforcement nri`; what each container may use is read from the guest's /proc and its cgroup."""

from __future__ import annotations

import uuid

import pytest

from dra_cpu.bench.numa_maps import parse_numa_maps
from dra_cpu.core.sharing import ONE_POD_AT_A_TIME
from tests.harness.guest.vm import SPEC, GuestError
from tests.harness.nodes.guest_standin import GuestStandinNode, cpulist, format_cpulist, result
from tests.harness.runtimes.containerd import offers_memory_policy


def test_claimed_container_pinned_and_shared_pool_follows_claims(guest_node: GuestStandinNode) -> None:
    node = guest_node
    general = node.shared()
    bystander = node.create_container(node.run_pod("bystander"), "plain")
    node.assert_allowed(bystander, general)

    pod = node.run_pod("claimant", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa0", cpus=1)], [pod.uid])
    claimed = node.granted(claim)
    assert len(claimed) == 1
    # Prepare shrinks the running bystander at once, before any container of the claim exists.
    node.assert_allowed(bystander, general - claimed)

    pinned = node.create_container(pod, "pinned", claims=[claim])
    node.assert_allowed(pinned, claimed, mems=SPEC.memory_nodes)
    env = node.exec(pinned, ["env"])["stdout"].splitlines()
    assert f"DRA_CPUSET_{claim.uid}={format_cpulist(claimed)}" in env
    node.assert_sidecar_shared_then_released(pod, claim, bystander, general)


def test_forged_env_gets_the_shared_pool_and_is_counted(guest_node: GuestStandinNode) -> None:
    node = guest_node
    owner = node.run_pod("owner", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa1", cpus=1)], [owner.uid])
    claimed = node.granted(claim)
    shared = node.shared()
    before = node.metric("dra_cpu_forged_env")

    env = f"DRA_CPUSET_{claim.uid}"
    forger = node.run_pod("forger")
    # A copy of the claim's exact variable looks like a pod that shares the claim (NRI does not say which CDI
    # devices a container got): refused, not run.
    with pytest.raises(GuestError, match=ONE_POD_AT_A_TIME):
        node.create_container(forger, "copied", env={env: format_cpulist(claimed)})
    assert node.metric("dra_cpu_shared_claim_refused") >= 1
    forged = node.create_container(forger, "forged", env={env: format_cpulist(node.online())})
    node.assert_allowed(forged, shared)
    assert node.metric("dra_cpu_forged_env") == before + 1
    # The right pod with the wrong cpuset in its env is no better.
    mismatched = node.create_container(owner, "mismatched", env={env: format_cpulist(shared)})
    node.assert_allowed(mismatched, shared)
    assert node.metric("dra_cpu_forged_env") == before + 2


def test_someone_elses_update_does_not_unpin(guest_node: GuestStandinNode) -> None:
    node = guest_node
    pod = node.run_pod("claimant", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa0", cpus=2)], [pod.uid])
    pinned = node.create_container(pod, "pinned", claims=[claim])
    plain = node.create_container(pod, "plain")
    node.assert_allowed(pinned, node.granted(claim))

    everything = format_cpulist(node.online())
    node.update_resources(pinned, cpuset_cpus=everything)
    node.update_resources(plain, cpuset_cpus=everything)
    node.assert_allowed(pinned, node.granted(claim))
    node.assert_allowed(plain, node.shared())


def test_plugin_restart_keeps_pins_and_reconciles(guest_node: GuestStandinNode) -> None:
    node = guest_node
    pod = node.run_pod("claimant", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa1", cpus=2)], [pod.uid])
    claimed = node.granted(claim)
    pinned = node.create_container(pod, "pinned", claims=[claim])
    node.assert_allowed(pinned, claimed)

    assert node.stop_driver() == 0
    try:
        # While no plugin is connected the runtime creates containers unpinned: the kernel gives them every CPU
        # of the cgroup root, the isolated one too.
        missed = node.create_container(node.run_pod("while-down"), "missed")
        assert node.allowed(missed).cpus.ids >= node.online() - set(SPEC.isolated_cpus)
        node.assert_allowed(pinned, claimed)
    finally:
        node.start_driver()
    # Synchronize puts them on the shared pool; the pinned one stays pinned (the checkpoint kept the claim).
    node.assert_allowed(missed, node.shared())
    node.assert_allowed(pinned, claimed)


def test_container_cgroup_is_a_v2_cgroup_under_the_pod_parent(guest_node: GuestStandinNode) -> None:
    node = guest_node
    bystander = node.create_container(node.run_pod("bystander"), "plain")
    pod = node.run_pod("claimant", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa0", cpus=1)], [pod.uid])
    claimed = node.granted(claim)
    pinned = node.create_container(pod, "pinned", claims=[claim])
    node.assert_allowed(pinned, claimed, mems=SPEC.memory_nodes)
    node.assert_allowed(bystander, node.shared())

    for container, cpus in ((pinned, claimed), (bystander, node.shared())):
        # One line, "0::<path>": no v1 hierarchy holds the process.
        [line] = node.guest.read(f"/proc/{node.pid(container)}/cgroup").splitlines()
        path = line.removeprefix("0::")
        assert path.startswith(f"{node.cgroup_parent}/pod{container.pod.uid}/") and path.endswith(container.id), path
        directory = f"/sys/fs/cgroup{path}"
        assert node.cgroup(container) == directory
        # The cgroup itself is what enforces it: configured and effective sets, not only the task's affinity.
        assert cpulist(node.guest.read(f"{directory}/cpuset.cpus")) == cpus
        assert cpulist(node.guest.read(f"{directory}/cpuset.cpus.effective")) == cpus
        assert {"cpuset", "cpu"} <= set(node.guest.read(f"{directory}/cgroup.controllers").split())
    assert cpulist(node.cgroup_file(pinned, "cpuset.mems")) == SPEC.memory_nodes


def test_memory_policy_prefers_a_claim_over_two_nodes_where_the_runtime_offers_it(guest_node: GuestStandinNode) -> None:
    """The NRI 0.12 LinuxMemoryPolicy on a multi-NUMA kernel: a claim of CPUs only on nodes 0 and 1 prefers its memory
    there (MPOL_PREFERRED_MANY, "prefer (many):0-1" in numa_maps) with every node with memory allowed (containerd 2.4
    with its runc 1.5); the older runtimes leave the task's policy "default". Strict binding: test_guest_memory.py."""
    node = guest_node
    pod = node.run_pod("claimant", uid=str(uuid.uuid4()))
    claim = node.prepared([result("cpu-numa0", "numa0", cpus=1), result("cpu-numa1", "numa1", cpus=1)], [pod.uid])
    pinned = node.create_container(pod, "pinned", claims=[claim])
    node.assert_allowed(pinned, node.granted(claim), mems=SPEC.memory_nodes)
    plain = node.create_container(node.run_pod("plain"), "plain")

    def policies(numa_maps: str) -> set[str]:
        return {entry.policy for entry in parse_numa_maps(numa_maps)}

    expected = "prefer (many):0-1" if offers_memory_policy(node.version) else "default"
    assert policies(node.guest.read(f"/proc/{node.pid(pinned)}/numa_maps")) == {expected}
    assert policies(node.exec(pinned, ["cat", "/proc/self/numa_maps"])["stdout"]) == {expected}
    assert policies(node.guest.read(f"/proc/{node.pid(plain)}/numa_maps")) == {"default"}
