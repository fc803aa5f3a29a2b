"""core/claims.py: the opaque CPUConfig and what grant() makes of it on socket and machine devices."""

from __future__ import annotations

import pytest

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.claims import (
    ClaimError,
    ClaimRef,
    CPUConfig,
    allocated_claim_object,
    allocation_result,
    parse_claim,
    parse_cpu_config,
)
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, GroupBy
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import Ledger
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

REF = ClaimRef("default", "c", "uid-1")
BIG = read_topology(SYSFS / "big-8numa")  # 4 sockets x 2 NUMA nodes x 8 CPUs; siblings (2k, 2k+1)


def params(**fields: object) -> dict[str, object]:
    return {"apiVersion": "dra.cpu/v1alpha1", "kind": "CPUConfig", **fields}


def test_distribute_across_numa_is_a_cpu_config_key() -> None:
    config = parse_cpu_config(params(distributeAcrossNUMA=True, wholeCores=True), "p", CPUConfig(), REF)
    assert config == CPUConfig(AllocationPolicy(whole_cores=True, distribute_across_numa=True))
    # Every other key combines with it: each NUMA node's share is placed under the rest of the policy.
    both = parse_cpu_config(params(distributeAcrossNUMA=True, alignL3=True), "p", CPUConfig(), REF).policy
    assert both.align_l3 and both.distribute_across_numa
    with pytest.raises(ClaimError, match=r"p.distributeAcrossNUMA must be true or false, not 'yes'"):
        parse_cpu_config(params(distributeAcrossNUMA="yes"), "p", CPUConfig(), REF)
    with pytest.raises(ClaimError, match=r"known: alignL3, distributeAcrossNUMA, memoryBinding, spread, wholeCores"):
        parse_cpu_config(params(distributeCPUs=True), "p", CPUConfig(), REF)


def test_memory_binding_is_a_cpu_config_key() -> None:
    strict = parse_cpu_config(params(memoryBinding="strict", wholeCores=True), "p", CPUConfig(), REF)
    assert strict == CPUConfig(AllocationPolicy(whole_cores=True), MemoryBinding.STRICT)
    # The claim's own config overrides the class's, key by key.
    assert parse_cpu_config(params(spread=True), "p", strict, REF).memory_binding is MemoryBinding.STRICT
    assert parse_cpu_config(params(memoryBinding="preferred"), "p", strict, REF).memory_binding is (
        MemoryBinding.PREFERRED
    )
    with pytest.raises(ClaimError, match=r"p.memoryBinding must be 'strict' or 'preferred', not 'hard'"):
        parse_cpu_config(params(memoryBinding="hard"), "p", CPUConfig(), REF)
    with pytest.raises(ClaimError, match=r"p.memoryBinding must be 'strict' or 'preferred', not True"):
        parse_cpu_config(params(memoryBinding=True), "p", CPUConfig(), REF)


def _decide(state: Ledger, device: str, cpus: int, uid: str, **config: object) -> tuple[Ledger, CPUSet]:
    # Nothing held back for the shared pool, which the other sockets hold anyway: socket 0 is whole.
    view = NodeView.of(BIG, NodeSettings(DeviceConfig(node_name="n", group_by=GroupBy.SOCKET, min_shared_cpus=0)))
    entries = [{"opaque": {"driver": "dra.cpu", "parameters": params(**config)}, "requests": []}] if config else []
    obj = allocated_claim_object(
        "default",
        uid,
        [allocation_result("dra.cpu", "n", device, consumed={"dra.cpu/cpu": str(cpus)})],
        uid=uid,
        config=entries,
    )
    ref = ClaimRef("default", uid, uid)
    request = parse_claim(obj, ref, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())
    claim = grant(state, request, view)
    return state.with_claim(claim), claim.cpus


def test_socket_device_claims() -> None:
    state, cpus = _decide(Ledger(), "cpu-socket0", 4, "a")
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


def _configured(entries: list[dict[str, object]], written: list[dict[str, object]]) -> dict[str, object]:
    """A claim as the scheduler leaves it: spec.devices.config as the user wrote it, status.allocation.devices.config
    as the allocator copies it (class entries first, then the claim's own)."""
    requests: list[dict[str, object]] = [
        {"name": "cpus", "exactly": {"deviceClassName": "dra.cpu"}},
        {"name": "pick", "firstAvailable": [{"name": "big", "deviceClassName": "dra.cpu.big"}]},
    ]
    obj = allocated_claim_object(
        "default",
        "c",
        [allocation_result("dra.cpu", "n", "cpu-numa0", consumed={"dra.cpu/cpu": "2"})],
        uid=REF.uid,
        config=entries,
        requests=requests,
    )
    obj["spec"]["devices"]["config"] = written
    return obj


def _opaque(**fields: object) -> dict[str, object]:
    return {"driver": "dra.cpu", "parameters": params(**fields)}


@pytest.mark.parametrize(
    ("entries", "written", "message"),
    [
        (
            # The user's second config entry: named as spec.devices.config[1], where they wrote it.
            [
                {"source": "FromClass", "requests": ["cpus"], "opaque": _opaque(spread=True)},
                {"source": "FromClaim", "requests": ["cpus"], "opaque": _opaque(wholeCores=True)},
                {"source": "FromClaim", "requests": [], "opaque": _opaque(wholeCore=True)},
            ],
            [
                {"requests": ["cpus"], "opaque": _opaque(wholeCores=True)},
                {"opaque": _opaque(wholeCore=True)},
            ],
            "claim default/c: spec.devices.config[1].opaque.parameters.wholeCore is not a known field",
        ),
        (
            [
                {"source": "FromClass", "requests": ["cpus"], "opaque": _opaque(spread=True)},
                {"source": "FromClass", "requests": ["pick/big"], "opaque": _opaque(alignL3="yes")},
            ],
            [],
            "claim default/c: DeviceClass dra.cpu.big spec.config[0].opaque.parameters.alignL3 must be true or "
            "false, not 'yes'",
        ),
        (
            [{"source": "FromClaim", "requests": [], "opaque": {"driver": "dra.cpu", "parameters": "x"}}],
            [{"opaque": {"driver": "dra.cpu", "parameters": "x"}}],
            "claim default/c: spec.devices.config[0].opaque.parameters must be an object, not 'x'",
        ),
        (
            # No spec to find it in: the copy's place.
            [{"source": "FromClaim", "requests": [], "opaque": _opaque(wholeCore=True)}],
            [],
            "claim default/c: status.allocation.devices.config[0].opaque.parameters.wholeCore is not a known field",
        ),
    ],
)
def test_config_errors_name_where_the_user_wrote_it(
    entries: list[dict[str, object]], written: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(ClaimError) as err:
        parse_claim(_configured(entries, written), REF, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())
    assert str(err.value).startswith(message)
