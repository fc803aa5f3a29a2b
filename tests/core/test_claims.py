"""core/claims.py: the opaque CPUConfig and what decide() makes of it on socket and machine devices."""

from __future__ import annotations

import pytest

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.claims import (
    ClaimError,
    ClaimRef,
    ClaimRequest,
    allocated_claim,
    allocation_result,
    parse_claim,
    parse_cpu_config,
)
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, GroupBy, build_devices, device_index
from dra_cpu.core.state import PreparedClaim, State, decide
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

REF = ClaimRef("default", "c", "uid-1")
BIG = read_topology(SYSFS / "big-8numa")  # 4 sockets x 2 NUMA nodes x 8 CPUs; siblings (2k, 2k+1)


def params(**fields: object) -> dict[str, object]:
    return {"apiVersion": "dra.cpu/v1alpha1", "kind": "CPUConfig", **fields}


def test_distribute_across_numa_is_a_cpu_config_key() -> None:
    policy = parse_cpu_config(params(distributeAcrossNUMA=True, wholeCores=True), "p", AllocationPolicy(), REF)
    assert policy == AllocationPolicy(whole_cores=True, distribute_across_numa=True)
    # Every other key combines with it: each NUMA node's share is placed under the rest of the policy.
    both = parse_cpu_config(params(distributeAcrossNUMA=True, alignL3=True), "p", AllocationPolicy(), REF)
    assert both.align_l3 and both.distribute_across_numa
    with pytest.raises(ClaimError, match=r"p.distributeAcrossNUMA must be true or false, not 'yes'"):
        parse_cpu_config(params(distributeAcrossNUMA="yes"), "p", AllocationPolicy(), REF)
    with pytest.raises(ClaimError, match=r"known: alignL3, distributeAcrossNUMA, spread, wholeCores"):
        parse_cpu_config(params(distributeCPUs=True), "p", AllocationPolicy(), REF)


def _decide(state: State, device: str, cpus: int, uid: str, **config: object) -> tuple[State, CPUSet]:
    devices = device_index(build_devices(BIG, DeviceConfig(node_name="n", group_by=GroupBy.SOCKET)))
    entries = [{"opaque": {"driver": "dra.cpu", "parameters": params(**config)}, "requests": []}] if config else []
    obj = allocated_claim(
        "default",
        uid,
        [allocation_result("dra.cpu", "n", device, consumed={"dra.cpu/cpu": str(cpus)})],
        uid=uid,
        config=entries,
    )
    ref = ClaimRef("default", uid, uid)
    request = parse_claim(obj, ref, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())
    claim = decide(state, request, BIG, devices, cpu_capacity="dra.cpu/cpu", memory_capacity="dra.cpu/memory")
    return state.with_claim(claim), claim.cpus


def test_socket_device_claims() -> None:
    state, cpus = _decide(State(), "cpu-socket0", 4, "a")
    # A plain claim on a socket device stays on one NUMA node and one L3.
    assert cpus == CPUSet.parse("0-3")
    # distributeAcrossNUMA: 3 CPUs on each of the socket's NUMA nodes, from what is free.
    state, cpus = _decide(state, "cpu-socket0", 6, "b", distributeAcrossNUMA=True)
    assert cpus == CPUSet.parse("4-6,8-10")
    # Node 0 has 1 free CPU (7) left: a share of 2 does not fit, and the error names the request and the device.
    with pytest.raises(ClaimError, match=r"request 'cpus' on cpu-socket0: distributeAcrossNUMA: NUMA node 0 has 1"):
        _decide(state, "cpu-socket0", 4, "c", distributeAcrossNUMA=True)
    with pytest.raises(ClaimError, match=r"5 CPUs do not divide into equal shares over the device's 2 NUMA nodes"):
        _decide(state, "cpu-socket1", 5, "d", distributeAcrossNUMA=True)
    # The next plain claim avoids the split NUMA node 0 and fills node 1 from its free whole cores.
    assert _decide(state, "cpu-socket0", 4, "e")[1] == CPUSet.parse("12-15")


def test_a_claim_reserved_for_several_pods_is_refused_at_first_prepare_and_kept_on_a_repeat() -> None:
    devices = device_index(build_devices(BIG, DeviceConfig(node_name="n")))
    results = [allocation_result("dra.cpu", "n", "cpu-numa0", consumed={"dra.cpu/cpu": "2"})]

    def request(*pods: str) -> ClaimRequest:
        obj = allocated_claim("default", "c", results, uid=REF.uid, pod_uids=pods)
        return parse_claim(obj, REF, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())

    def prepare(state: State, claim: ClaimRequest) -> PreparedClaim:
        return decide(state, claim, BIG, devices, cpu_capacity="dra.cpu/cpu", memory_capacity="dra.cpu/memory")

    with pytest.raises(ClaimError) as refused:
        prepare(State(), request("pod-b", "pod-a"))
    assert str(refused.value) == (
        "claim default/c is reserved for 2 pods (pod-a, pod-b); dra-cpu does not share a claim's CPUs across pods "
        "(use one claim per pod, e.g. a ResourceClaimTemplate)"
    )
    # The kubelet does not prepare a claim again for a second pod once it is prepared; if it repeats the prepare
    # anyway, the claim stays the first pod's and enforcement refuses the second pod's containers.
    first = prepare(State(), request("pod-a"))
    again = prepare(State().with_claim(first), request("pod-a", "pod-b"))
    assert again == first and again.pod_uids == ("pod-a",)
