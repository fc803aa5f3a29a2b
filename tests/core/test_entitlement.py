"""The pure decision: which cpus, mems, memory policy and hugepage limits a container gets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dra_cpu.core import entitlement
from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.entitlement import ContainerInfo, MemoryPolicy, NoSharedCpus, Pin
from dra_cpu.core.ledger import HugePageGrant, Ledger, MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.sharing import not_held
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

TOPOLOGY = read_topology(SYSFS / "dual-socket-smt2")
POD = "pod-uid-1"


def claim(
    uid: str,
    cpus: str,
    pods: tuple[str, ...] = (POD,),
    hugepages: HugePageGrant | None = None,
    memory: tuple[MemoryGrant, ...] = (),
    binding: MemoryBinding | None = None,
) -> PreparedClaim:
    devices = [PreparedDevice(("cpus",), "node", "cpu-numa0", cpus=CPUSet.parse(cpus))]
    if hugepages is not None:
        devices.append(PreparedDevice(("pages",), "node", "hugepages-2Mi-numa1", hugepages=hugepages))
    devices += [PreparedDevice(("mem",), "node", f"memory-numa{m.numa_node}", memory=m) for m in memory]
    return PreparedClaim(ClaimRef("ns", f"c-{uid}", uid), tuple(devices), pods).with_binding(binding)


def container(env: list[str], pod_uid: str = POD) -> ContainerInfo:
    return entitlement.container_info("cid", "app", pod_uid, "ns/pod", env)


STATE = Ledger({"a": claim("a", "2-3"), "b": claim("b", "8-9", pods=("other-pod",))})
POOLS = entitlement.pools(STATE, TOPOLOGY)


def prefer(nodes: str) -> MemoryPolicy:
    return MemoryPolicy(MemoryBinding.PREFERRED, CPUSet.parse(nodes))


def bind(nodes: str) -> MemoryPolicy:
    return MemoryPolicy(MemoryBinding.STRICT, CPUSet.parse(nodes))


def test_claimed_container_gets_the_claims_cpus_and_prefers_their_numa_nodes() -> None:
    """A claim without memory is no OOM trap: every memory node stays allowed, the claim's CPUs' node preferred."""
    decision = entitlement.pin_for(container(["PATH=/bin", "DRA_CPUSET_a=2-3"]), POOLS)
    assert decision.pin == Pin(CPUSet.parse("2-3"), CPUSet.parse("0-1"), claims=("a",), memory_policy=prefer("0"))
    assert decision.rejected == ()


def test_a_claim_with_memory_is_bound_to_its_memory_nodes() -> None:
    """Bound to the nodes of its memory (accounted there), not of its CPUs: here CPUs on node 0, memory on 1."""
    state = Ledger({"m": claim("m", "2-3", memory=(MemoryGrant(1, 64 << 20),))})
    pin = entitlement.pin_for(container(["DRA_CPUSET_m=2-3"]), entitlement.pools(state, TOPOLOGY)).pin
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("1"), bind("1"))
    # Over two nodes, as the Memory Manager's groups.
    state = Ledger({"m": claim("m", "2-3", memory=(MemoryGrant(0, 1 << 20), MemoryGrant(1, 1 << 20)))})
    pin = entitlement.pin_for(container(["DRA_CPUSET_m=2-3"]), entitlement.pools(state, TOPOLOGY)).pin
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("0-1"), bind("0-1"))


def test_strict_and_preferred_are_opt_in_either_way() -> None:
    strict = Ledger({"s": claim("s", "2-3", binding=MemoryBinding.STRICT)})
    pin = entitlement.pin_for(container(["DRA_CPUSET_s=2-3"]), entitlement.pools(strict, TOPOLOGY)).pin
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("0"), bind("0"))
    soft = Ledger({"p": claim("p", "2-3", memory=(MemoryGrant(1, 1 << 20),), binding=MemoryBinding.PREFERRED)})
    pin = entitlement.pin_for(container(["DRA_CPUSET_p=2-3"]), entitlement.pools(soft, TOPOLOGY)).pin
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("0-1"), prefer("1"))


def test_a_strict_claim_binds_the_container_with_every_claims_hugepage_nodes() -> None:
    """A container of a strict claim and of a preferred one with pages on node 1: bound to the strict claim's node
    and to node 1, whose pool its pages come from."""
    pages = HugePageGrant(numa_node=1, page_size_kib=2048, bytes=4 << 20)
    state = Ledger({"s": claim("s", "2", memory=(MemoryGrant(0, 1 << 20),)), "h": claim("h", "3", hugepages=pages)})
    pin = entitlement.pin_for(container(["DRA_CPUSET_s=2", "DRA_CPUSET_h=3"]), entitlement.pools(state, TOPOLOGY)).pin
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("0-1"), bind("0-1"))


def test_unclaimed_container_gets_the_shared_pool_and_every_memory_node() -> None:
    decision = entitlement.pin_for(container(["PATH=/bin"]), POOLS)
    assert decision.pin == Pin(CPUSet.parse("0-1,4-7,10-15"), CPUSet.parse("0-1"))


@pytest.mark.parametrize(
    ("env", "pod_uid", "reason"),
    [
        (["DRA_CPUSET_a=2-3"], "forger", "pod forger is not the pod the claim serves (pod-uid-1)"),
        (["DRA_CPUSET_a=2"], POD, "cpuset '2' is not the claim's (2-3)"),
        (["DRA_CPUSET_a=all"], POD, "cpuset 'all' is not a cpu list"),
        (["DRA_CPUSET_zzz=2-3"], POD, "no such claim is prepared on this node"),
        (["DRA_CPUSET_b=8-9"], POD, "pod pod-uid-1 is not the pod the claim serves (other-pod)"),
    ],
)
def test_env_that_does_not_prove_a_claim_gives_the_shared_pool(env: list[str], pod_uid: str, reason: str) -> None:
    decision = entitlement.pin_for(container(env, pod_uid), POOLS)
    assert decision.pin == Pin(POOLS.shared, POOLS.shared_mems)
    assert [r.reason for r in decision.rejected] == [reason]


def test_a_forged_entry_beside_a_real_claim_is_rejected_alone() -> None:
    decision = entitlement.pin_for(container(["DRA_CPUSET_a=2-3", "DRA_CPUSET_b=8-9"]), POOLS)
    assert decision.pin.cpus == CPUSet.parse("2-3")
    assert [r.claim_uid for r in decision.rejected] == ["b"]


def test_two_claims_of_one_container_are_united() -> None:
    state = Ledger({"a": claim("a", "2-3"), "c": claim("c", "12")})
    decision = entitlement.pin_for(
        container(["DRA_CPUSET_a=2-3", "DRA_CPUSET_c=12"]), entitlement.pools(state, TOPOLOGY)
    )
    assert (decision.pin.cpus, decision.pin.mems, decision.pin.claims, decision.pin.memory_policy) == (
        CPUSet.parse("2-3,12"),
        CPUSet.parse("0-1"),
        ("a", "c"),
        prefer("0-1"),
    )


def test_hugepage_claim_sets_limits_and_prefers_its_memory_nodes() -> None:
    grant = HugePageGrant(numa_node=1, page_size_kib=2048, bytes=64 << 20)
    state = Ledger({"h": claim("h", "2-3", hugepages=grant)})
    pin = entitlement.pin_for(container(["DRA_CPUSET_h=2-3"]), entitlement.pools(state, TOPOLOGY)).pin
    assert pin.hugepage_limits == (("2MB", 64 << 20),)
    assert (pin.mems, pin.memory_policy) == (CPUSet.parse("0-1"), prefer("0-1"))


@pytest.mark.parametrize(("kib", "name"), [(64, "64KB"), (2048, "2MB"), (1 << 20, "1GB"), (32768, "32MB")])
def test_oci_page_size_names(kib: int, name: str) -> None:
    assert entitlement.oci_page_size(kib) == name


def test_reserved_cpus_stay_shared_unless_strict() -> None:
    reserved = CPUSet.parse("0-1")
    assert reserved.issubset(entitlement.pools(STATE, TOPOLOGY, reserved).shared)
    assert reserved.isdisjoint(entitlement.pools(STATE, TOPOLOGY, reserved, strict_reserved=True).shared)


def test_isolated_cpus_are_not_shared() -> None:
    cpus = tuple(replace(c, isolated=c.id in (14, 15)) for c in TOPOLOGY.cpus)
    topology = replace(TOPOLOGY, cpus=cpus)
    assert entitlement.pools(Ledger(), topology).shared == CPUSet.parse("0-13")


def test_no_shared_cpu_left_is_an_error_naming_the_container() -> None:
    everything = Ledger({"a": claim("a", "0-15")})
    with pytest.raises(NoSharedCpus, match="container app of pod ns/pod"):
        entitlement.pin_for(container([]), entitlement.pools(everything, TOPOLOGY))
    # The claim's own container still gets its CPUs.
    assert entitlement.pin_for(
        container(["DRA_CPUSET_a=0-15"]), entitlement.pools(everything, TOPOLOGY)
    ).pin.claims == ("a",)


def test_env_parsing_ignores_lookalikes() -> None:
    info = container(["DRA_CPUSET_=1", "DRA_CPUSET_x", "XDRA_CPUSET_y=1", "DRA_CPUSET_z=1=2"])
    assert info.env_claims == {"z": "1=2"}


def test_a_claim_used_by_another_pod_is_refused_at_creation_naming_claim_and_pod() -> None:
    # The env is exactly the claim's (the pod spec shares the claim, the CDI device was given): not a forgery.
    other = container(["DRA_CPUSET_a=2-3"], pod_uid="second-pod")
    with pytest.raises(entitlement.ClaimSharedAcrossPods) as refused:
        entitlement.pin_for(other, POOLS, refuse_shared=True)
    assert str(refused.value) == not_held(ClaimRef("ns", "c-a", "a"), (POD,), "app", "ns/pod", "second-pod")
    # Running containers (synchronize, updates) are not refused: they get the shared pool, as before.
    assert entitlement.pin_for(other, POOLS).pin == Pin(POOLS.shared, POOLS.shared_mems)


@pytest.mark.parametrize(("env", "pod_uid"), [(["DRA_CPUSET_a=2"], "second-pod"), (["DRA_CPUSET_zzz=2-3"], POD)])
def test_env_matching_no_prepared_claim_is_still_forged_at_creation(env: list[str], pod_uid: str) -> None:
    decision = entitlement.pin_for(container(env, pod_uid), POOLS, refuse_shared=True)
    assert decision.pin == Pin(POOLS.shared, POOLS.shared_mems)
    assert len(decision.rejected) == 1


def test_containers_of_the_claims_pod_share_its_cpus() -> None:
    first, second = (
        entitlement.pin_for(replace(container(["DRA_CPUSET_a=2-3"]), id=cid, name=cid), POOLS, refuse_shared=True).pin
        for cid in ("app", "sidecar")
    )
    assert first == second == Pin(CPUSet.parse("2-3"), CPUSet.parse("0-1"), claims=("a",), memory_policy=prefer("0"))


UID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


def test_the_shell_twins_of_a_claims_variables_carry_the_same_values_and_entitle_nothing() -> None:
    """Each variable of a claim's CDI spec is there twice: the upstream name with the UID's dashes, and the same
    value under the UID with underscores, which POSIX shells keep. Enforcement reads only the first."""
    from dra_cpu.core.cdi_spec import env_for

    prepared = replace(claim(UID, "2-3"), ref=ClaimRef("ns", "web", UID))
    env = env_for(prepared, CPUSet.parse("0"))
    twin = UID.replace("-", "_")
    values = dict(item.split("=", 1) for item in env)
    for prefix, value in (("CPUSET", "2-3"), ("MEMS", "0"), ("CLAIM", "ns/web"), ("PODS", POD)):
        assert values[f"DRA_{prefix}_{UID}"] == values[f"DRA_{prefix}_{twin}"] == value
    pools = entitlement.pools(Ledger({UID: prepared}), TOPOLOGY)
    decision = entitlement.pin_for(container(env), pools)
    assert decision.pin.claims == (UID,) and decision.rejected == ()
    # A twin written into a pod spec by hand is no claim: the shared pool, and nothing to report.
    forged = entitlement.pin_for(container([f"DRA_CPUSET_{twin}=2-3"]), pools)
    assert forged.pin == Pin(pools.shared, pools.shared_mems) and forged.rejected == ()


def test_every_variable_a_claim_gives_its_containers_is_documented() -> None:
    """docs/user.md names each DRA_*_<uid> variable the CDI spec writes, and the shell-readable form beside it."""
    from dra_cpu.core.cdi_spec import env_for
    from tests.harness.paths import REPO

    user = (REPO / "docs" / "user.md").read_text()
    prepared = claim(UID, "2-3", hugepages=HugePageGrant(0, 2048, 2 << 20), memory=(MemoryGrant(0, 64 << 20),))
    names = [item.split("=", 1)[0] for item in env_for(prepared, CPUSet.parse("0"))]
    prefixes = {name.removesuffix(UID) for name in names if name.endswith(UID)}
    assert prefixes == {
        "DRA_CPUSET_",
        "DRA_MEMS_",
        "DRA_HUGEPAGES_",
        "DRA_MEMORY_",
        "DRA_MEMORY_BINDING_",
        "DRA_CLAIM_",
        "DRA_PODS_",
    }
    undocumented = [p for p in sorted(prefixes) if f"`{p}<uid>`" not in user]
    assert not undocumented, f"docs/user.md does not describe {undocumented}"
    assert "the UID with `_` for `-`" in user
