"""The NRI 0.12 memory policy adjustment against the real runtimes, read back from the kernel.

containerd 2.3 and later vendor NRI 0.12, which passes a plugin's LinuxMemoryPolicy into the OCI spec
(`linux.memoryPolicy`); runc 1.4 and later apply it with set_mempolicy(2) in the container's init and exec'd
processes. hack/testenv/containerd.sh builds such a pair (containerd 2.4 with runc 1.5); Debian's containerd 2.1
and 1.7 predate it. The policy shows in /proc/<pid>/numa_maps: a mapping without a policy of its own lists its
task's ("bind:0" after MPOL_BIND to node 0, "prefer:0" after MPOL_PREFERRED, "default" without one).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from dra_cpu.bench.numa_maps import parse_numa_maps
from dra_cpu.core.cpuset import CPUSet
from tests.harness.nodes.nri import NriNode
from tests.harness.poll import wait_until
from tests.harness.runtimes.containerd import offers_memory_policy
from tests.harness.runtimes.cri import Container

NOT_OFFERED = "the runtime's NRI cannot set a memory policy"
"""The start of the enforcer's warning where the runtime's NRI is older than 0.12."""


def policies(numa_maps: str) -> set[str]:
    return {entry.policy for entry in parse_numa_maps(numa_maps)}


def policies_on_host(node: NriNode, container: Container) -> set[str]:
    return policies(Path(f"/proc/{node.cri.pid(container)}/numa_maps").read_text())


def policies_inside(node: NriNode, container: Container) -> set[str]:
    return policies(node.cri.exec_sync(container, ["cat", "/proc/self/numa_maps"]).stdout)


def spec_memory_policy(node: NriNode, container: Container) -> object:
    """`linux.memoryPolicy` of the OCI spec that the runtime handed runc, None where it has none."""
    spec = node.cri.info(container)["runtimeSpec"]
    assert isinstance(spec, dict)
    linux = spec.get("linux")
    assert isinstance(linux, dict)
    return linux.get("memoryPolicy")


def warnings_not_offered(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    # The plugin connects while the fixture is set up: its Configure is logged in the setup phase.
    records = caplog.get_records("setup") + caplog.get_records("call")
    return [r for r in records if r.name == "dra_cpu.nri" and r.getMessage().startswith(NOT_OFFERED)]


@pytest.mark.parametrize(
    ("memory", "mode", "numa_maps"),
    [
        # A claim with memory is bound to it: the memory comes from its node or the container is OOM-killed.
        ("8Mi", "MPOL_BIND", "bind"),
        # A CPU-only claim counted no memory: its node is preferred, the memory spills elsewhere when it is full.
        ("", "MPOL_PREFERRED", "prefer"),
    ],
)
def test_claimed_container_gets_its_claims_memory_policy_where_the_runtime_offers_it(
    node: NriNode, memory: str, mode: str, numa_maps: str
) -> None:
    cri = node.cri
    pod = cri.run_pod("claimant", uid=str(uuid.uuid4()))
    ref = node.claim([pod.uid], memory=memory)
    topology = node.driver.snapshot().view.topology
    nodes = topology.numa_nodes_of(node.cpus_of(ref))
    pinned = node.claimed_container(pod, ref)
    plain = cri.create_container(cri.run_pod("plain"), "plain")
    # cpuset.mems: only the claim's nodes when bound, every node with memory when preferred.
    wide = CPUSet.of(n.id for n in topology.numa_nodes if n.memory_bytes > 0)
    node.assert_allowed(pinned, node.cpus_of(ref), mems=nodes if memory else wide)

    offered = offers_memory_policy(node.containerd.version)
    assert node.plugin.memory_policy == offered
    if offered:
        assert spec_memory_policy(node, pinned) == {"mode": mode, "nodes": str(nodes)}
        # Both the container's init process and a process exec'd into it later run under the policy.
        assert policies_on_host(node, pinned) == policies_inside(node, pinned) == {f"{numa_maps}:{nodes}"}
    else:
        # The older runtime drops the field: the memory is bound by cpuset.mems alone (asserted above).
        assert spec_memory_policy(node, pinned) is None
        assert policies_on_host(node, pinned) == policies_inside(node, pinned) == {"default"}
    # A container without a claim gets no policy from the plugin on any runtime.
    assert spec_memory_policy(node, plain) is None
    assert policies_on_host(node, plain) == {"default"}


def test_a_runtime_without_memory_policy_is_said_once_across_reconnects(
    fresh_node: NriNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = fresh_node
    daemon = node.containerd
    daemon.restart()
    # A second Configure, from the restarted runtime, has been answered.
    wait_until(lambda: node.plugin.counters.connects == 2 and node.plugin.ready.is_set(), "the plugin reconnects")

    said = warnings_not_offered(caplog)
    if offers_memory_policy(daemon.version):
        assert node.plugin.memory_policy and said == []
    else:
        assert not node.plugin.memory_policy
        assert len(said) == 1, [r.getMessage() for r in said]
        assert getattr(said[0], "runtime", None) == "containerd"
        assert getattr(said[0], "runtimeVersion", "").lstrip("v").startswith(daemon.version)
