"""core/sharing.py: the one pod a claim serves, chosen from its reservedFor and handed over when that pod is gone;
and what grant() and enforcement make of it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dra_cpu.core import entitlement
from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.claims import ClaimRef, ClaimRequest, allocated_claim_object, allocation_result, parse_claim
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig
from dra_cpu.core.entitlement import ClaimSharedAcrossPods, Pin
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import Ledger, PreparedClaim
from dra_cpu.core.memory_limit import BoundMemory
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.core.sharing import ONE_POD_AT_A_TIME, hold, holder, not_held
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS

REF = ClaimRef("default", "c", "uid-1")
VIEW = NodeView.of(read_topology(SYSFS / "big-8numa"), NodeSettings(DeviceConfig(node_name="n")))
RESULTS = [allocation_result("dra.cpu", "n", "cpu-numa0", consumed={"dra.cpu/cpu": "2"})]


def request(*pods: str) -> ClaimRequest:
    obj = allocated_claim_object("default", "c", RESULTS, uid=REF.uid, pod_uids=pods)
    return parse_claim(obj, REF, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())


def pod(uid: str, limit: str | None = None, memory: str | None = None) -> dict[str, Any]:
    """A pod whose container `app` uses claim `c`, with limits.cpu `limit` and limits.memory `memory`."""
    resources: dict[str, Any] = {"claims": [{"name": "cpus"}]}
    limits = {k: v for k, v in (("cpu", limit), ("memory", memory)) if v is not None}
    if limits:
        resources["limits"] = limits
    return {
        "metadata": {"namespace": "default", "name": f"pod-{uid}", "uid": uid},
        "spec": {
            "resourceClaims": [{"name": "cpus", "resourceClaimName": "c"}],
            "containers": [{"name": "app", "resources": resources}],
        },
    }


@pytest.mark.parametrize(
    ("current", "reserved", "unfit", "expected"),
    [
        # First prepare: the first pod reservedFor lists, whatever order the kubelet starts them in.
        ((), ("a", "b"), {}, ("a",)),
        # The holder keeps the claim while reservedFor lists it, wherever it stands.
        (("b",), ("a", "b"), {}, ("b",)),
        # ... even when its limits would not let it take the claim now (it passed when it got it).
        (("a",), ("a", "b"), {"a": "throttled"}, ("a",)),
        # Gone from reservedFor (deleted, or ended): the next pod reservedFor lists.
        (("a",), ("b", "c"), {}, ("b",)),
        # ... that can use the claim's CPUs.
        (("a",), ("b", "c"), {"b": "throttled"}, ("c",)),
        # No pod can: no pod holds it, nothing is left of the one that did.
        (("a",), ("b",), {"b": "throttled"}, ()),
        (("a",), (), {}, ()),
        ((), (), {}, ()),
    ],
)
def test_the_holder(
    current: tuple[str, ...], reserved: tuple[str, ...], unfit: dict[str, str], expected: tuple[str, ...]
) -> None:
    assert holder(current, reserved, unfit) == expected


PODS = st.lists(st.sampled_from("abcdef"), unique=True, max_size=4).map(tuple)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(PODS, PODS, st.lists(st.sampled_from("abcdef"), unique=True, max_size=3))
def test_a_claim_never_serves_a_pod_reservedfor_does_not_list_nor_two_pods(
    current: tuple[str, ...], reserved: tuple[str, ...], unfit_pods: list[str]
) -> None:
    unfit = dict.fromkeys(unfit_pods, "throttled")
    now = holder(current, reserved, unfit)
    assert len(now) <= 1 and set(now) <= set(reserved)
    if set(current) & set(reserved):
        assert now == (next(p for p in current if p in reserved),), "the holder keeps it"
    else:
        assert not set(now) & set(unfit), "a pod that cannot use the CPUs is not given them"
        assert now or all(p in unfit for p in reserved), "a free claim goes to a pod that can use it"
    # Following reservedFor again changes nothing: the rule is settled.
    assert holder(now, reserved, unfit) == now


def test_a_prepare_serves_the_first_pod_that_reserved_the_claim_and_a_repeat_follows_reservedfor() -> None:
    first = hold(grant(Ledger(), request("pod-a", "pod-b"), VIEW), ("pod-a", "pod-b"), []).claim
    assert first.pod_uids == ("pod-a",)
    # The kubelet repeats a prepare after pod-a ended: the same CPUs, now pod-b's.
    ledger = Ledger().with_claim(first)
    repeated = grant(ledger, request("pod-b"), VIEW)
    assert repeated == first, "grant keeps the grant and the pod; sharing hands it over"
    after = hold(repeated, ("pod-b",), [pod("pod-b")]).claim
    assert after == replace(first, pod_uids=("pod-b",))


def test_a_pod_whose_limit_would_throttle_it_is_passed_over_and_says_why() -> None:
    claim = grant(Ledger(), request("pod-a", "pod-b"), VIEW)
    held = hold(claim, ("pod-a", "pod-b"), [pod("pod-a", limit="1"), pod("pod-b", limit="2")])
    assert held.claim.pod_uids == ("pod-b",)
    assert held.unfit == {
        "pod-a": "pod default/pod-pod-a: container 'app' would be CFS-throttled to 1 CPU "
        "(spec.containers[0].resources.limits.cpu 1) on the 2 CPUs claim 'c' pins it to; raise that limit to at "
        "least 2, or remove it"
    }
    # A pod that could not be read (gone meanwhile) has no container to check.
    assert hold(claim, ("pod-a",), []).claim.pod_uids == ("pod-a",)


def test_a_hugepages_only_claim_checks_no_cpu_limit() -> None:
    pages = PreparedClaim(REF, ())
    assert hold(pages, ("pod-a",), [pod("pod-a", limit="1")]).claim.pod_uids == ("pod-a",)


def test_the_refusal_names_the_holder_or_says_no_pod_holds_the_claim() -> None:
    assert not_held(REF, ("pod-a",), "app", "default/second", "pod-b") == (
        "claim default/c is held by pod pod-a; container app of pod default/second (pod-b) can use it once that "
        f"pod has ended ({ONE_POD_AT_A_TIME}; pods that must run side by side need a claim each (e.g. from a "
        "ResourceClaimTemplate))"
    )
    assert not_held(REF, (), "app", "default/second", "pod-b") == (
        "claim default/c is held by no pod; container app of pod default/second (pod-b) can use it once its pod "
        f"holds it ({ONE_POD_AT_A_TIME}: the first pod its reservedFor lists whose limits fit the claim)"
    )


def _container(pod_uid: str, cpus: CPUSet, cid: str = "cid") -> entitlement.ContainerInfo:
    return entitlement.container_info(cid, "app", pod_uid, f"default/{pod_uid}", [f"DRA_CPUSET_{REF.uid}={cpus}"])


def test_enforcement_follows_the_hand_over() -> None:
    first = hold(grant(Ledger(), request("pod-a", "pod-b"), VIEW), ("pod-a", "pod-b"), []).claim
    before = entitlement.pools(Ledger().with_claim(first), VIEW.topology)
    waiting = _container("pod-b", first.cpus)
    with pytest.raises(ClaimSharedAcrossPods) as refused:
        entitlement.pin_for(waiting, before, refuse_shared=True)
    assert refused.value.claim_uid == REF.uid
    assert str(refused.value) == not_held(REF, ("pod-a",), "app", "default/pod-b", "pod-b")
    running = _container("pod-a", first.cpus, "old")
    assert entitlement.pin_for(running, before).pin.cpus == first.cpus

    after = entitlement.pools(Ledger().with_claim(replace(first, pod_uids=("pod-b",))), VIEW.topology)
    # The kubelet's retry of the waiting container starts it pinned ...
    assert entitlement.pin_for(waiting, after, refuse_shared=True).pin.claims == (REF.uid,)
    # ... and a container of the pod that held it, if it still runs (a force-deleted pod), moves to the shared pool.
    moved = entitlement.pin_for(running, after)
    assert moved.pin == Pin(after.shared, after.shared_mems)
    assert [r.reason for r in moved.rejected] == ["pod pod-a is not the pod the claim serves (pod-b)"]


def test_a_pod_whose_memory_may_outgrow_a_strict_claim_is_passed_over_and_says_why() -> None:
    """The memory check is the CFS check's twin, in the same rule: a pod that cannot hold the claim is passed over,
    at prepare and at a hand-over alike; a preferred claim (None) checks no memory limit."""
    claim = grant(Ledger(), request("pod-a", "pod-b"), VIEW)
    bound = BoundMemory(256 << 20, CPUSet.of([0]))
    pods = [pod("pod-a", memory="1Gi"), pod("pod-b", memory="256Mi")]
    held = hold(claim, ("pod-a", "pod-b"), pods, bound)
    assert held.claim.pod_uids == ("pod-b",)
    assert list(held.unfit) == ["pod-a"]
    assert "may use 1Gi of memory" in held.unfit["pod-a"] and "256Mi on NUMA node(s) 0" in held.unfit["pod-a"]
    assert hold(claim, ("pod-a", "pod-b"), pods).claim.pod_uids == ("pod-a",)
    # A hand-over checks the next holder the same way: no pod fits, none holds it.
    handed = hold(held.claim, ("pod-a",), pods[:1], bound)
    assert handed.claim.pod_uids == () and list(handed.unfit) == ["pod-a"]
