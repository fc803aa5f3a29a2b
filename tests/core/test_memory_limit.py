"""The memory limit the kubelet would give a claimed container, against the memory a strict claim binds it to."""

from __future__ import annotations

import pytest

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig
from dra_cpu.core.ledger import MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.memory_limit import BoundMemory, bound_memory, unbounded
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.core.pod_limits import PodLimitsError
from dra_cpu.node.sysfs import read_topology
from tests.core.pods import Pods
from tests.harness.paths import SYSFS

CLAIM = "db-memory"
NODE0 = CPUSet.of([0])
# dual-socket-smt2 has 305Mi for claims on node 0 and 412Mi on node 1.
VIEW = NodeView.of(read_topology(SYSFS / "dual-socket-smt2"), NodeSettings(DeviceConfig(node_name="n")))


def bound(mib: int, nodes: CPUSet) -> BoundMemory:
    return BoundMemory(mib << 20, nodes)


PODS = Pods("memory", "db", CLAIM, "mem")
container, pod, mapped = PODS.container, PODS.pod, PODS.mapped


@pytest.mark.parametrize("limit", ["400Mi", "419430400", "100Mi"])
def test_a_limit_within_the_bound_memory_is_fine(limit: str) -> None:
    assert unbounded(pod(container(limit=limit)), CLAIM, bound(400, NODE0)) == []


def test_a_limit_above_the_bound_memory_is_named_with_the_most_it_may_be() -> None:
    [message] = unbounded(pod(container(limit="1Gi")), CLAIM, bound(400, NODE0))
    assert message == (
        "pod ns/db: container 'app' may use 1Gi of memory (spec.containers[0].resources.limits.memory 1Gi), more "
        "than the 400Mi on NUMA node(s) 0 claim 'db-memory' binds it to; lower that limit to at most 400Mi, or set "
        "memoryBinding: preferred in the claim's CPUConfig"
    )


def test_no_limit_at_all_is_refused() -> None:
    [message] = unbounded(pod(container()), CLAIM, bound(400, CPUSet.parse("0-1")))
    assert message == (
        "pod ns/db: container 'app' has no memory limit, and claim 'db-memory' binds its memory to 400Mi on NUMA "
        "node(s) 0-1: set resources.limits.memory to at most 400Mi, or set memoryBinding: preferred in the claim's "
        "CPUConfig"
    )
    # A pod-level limit is the container's when it has none of its own.
    assert unbounded(pod(container(), pod_limit="300Mi"), CLAIM, bound(400, NODE0)) == []


def test_only_containers_using_the_claim_are_checked() -> None:
    sidecar = container("sidecar", claims=())
    assert unbounded(pod(container(limit="400Mi"), sidecar), CLAIM, bound(400, NODE0)) == []
    assert unbounded(pod(container()), "another-claim", bound(400, NODE0)) == []


def test_the_kubelet_adds_mapped_memory_to_an_explicit_limit() -> None:
    """KEP-5517: the claim's memory is added to a container's own limit, which then exceeds the claim: the pod
    states its limit at pod level instead, where nothing is added."""
    [message] = unbounded(pod(container(limit="1Mi"), status=mapped("400Mi", "app")), CLAIM, bound(400, NODE0))
    assert "(spec.containers[0].resources.limits.memory 1Mi + 400Mi node-allocatable)" in message
    assert "remove that limit and set the pod's spec.resources.limits.memory to at most 400Mi" in message
    assert unbounded(pod(container(), pod_limit="400Mi", status=mapped("400Mi", "app")), CLAIM, bound(400, NODE0)) == []


def test_a_malformed_limit_names_the_field() -> None:
    with pytest.raises(PodLimitsError, match=r"pod ns/db: spec.containers\[0\].resources.limits.memory must be a"):
        unbounded(pod(container(limit="lots")), CLAIM, bound(1, NODE0))


def _claim(*devices: PreparedDevice, binding: MemoryBinding | None = None) -> PreparedClaim:
    return PreparedClaim(ClaimRef("ns", CLAIM, "u"), devices).with_binding(binding)


CPUS_NODE0 = PreparedDevice(("cpus",), "n", "cpu-numa0", cpus=CPUSet.parse("2-3"))
MEMORY = PreparedDevice(("mem",), "n", "memory-numa1", memory=MemoryGrant(1, 300 << 20))


def test_what_a_claim_binds_its_containers_to() -> None:
    # Its memory (strict by default), wherever its CPUs are.
    assert bound_memory(_claim(CPUS_NODE0, MEMORY), VIEW) == bound(300, CPUSet.of([1]))
    # CPUs only, strict on request: what its CPUs' node has for claims, none of it accounted to the claim.
    assert bound_memory(_claim(CPUS_NODE0, binding=MemoryBinding.STRICT), VIEW) == bound(305, NODE0)
    # Preferred (the default without memory, or on request): nothing to check.
    assert bound_memory(_claim(CPUS_NODE0), VIEW) is None
    assert bound_memory(_claim(CPUS_NODE0, MEMORY, binding=MemoryBinding.PREFERRED), VIEW) is None
