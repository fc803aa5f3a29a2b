"""The sharing rule: which pod a prepared claim serves, and when that changes. Pure.

A claim's CPUs, NUMA nodes and hugepages serve the containers of one pod at a time, its holder: every container of
that pod that references the claim is pinned to all of it (a pod is one scheduling and QoS unit, as for the
kubelet's CPU manager). Kubernetes lets several pods reserve one claim (`status.reservedFor`); of those the holder is

- chosen when the claim is prepared: the first pod reservedFor lists (the scheduler appends each pod as it reserves
  the claim for it) whose limits fit the claim: CPU limits that let its containers use the claim's CPUs
  (core/cpu_quota.py), memory limits within what a strict claim binds them to (core/memory_limit.py);
- kept while reservedFor lists it. The resource claim controller drops a pod from reservedFor once it has ended
  (Succeeded or Failed) or is deleted and its containers are gone;
- then handed over, by the same rule, to the next pod reservedFor lists. The kubelet prepares a claim once however
  many pods use it, so the driver re-reads the claim itself (handover.py) when a waiting pod's container is refused.

A container of any other pod that uses the claim is refused when the runtime creates it (enforcement names the
holder); the kubelet retries it, and the first retry after its pod became the holder starts it pinned. Nothing is
restarted and no pod has to be deleted: the waiting pod starts when the holder ends.

Why one pod and not every pod reservedFor lists: hugepage limits are per pod, so each sharing pod could fault in the
claim's pages again (the node accounts them once); the scheduler counts each pod's CPU requests for the same CPUs;
the scheduler refuses to share a claim with KEP-5517 mapped devices across pods at all; and the upstream driver
allows one container per claim. What the rule still allows covers the uses of a claim named by several pods: a
replacement pod (a StatefulSet's, a Job's next try, a Deployment's with the Recreate strategy) takes its
predecessor's CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpu_quota import throttled
from dra_cpu.core.ledger import PreparedClaim
from dra_cpu.core.memory_limit import BoundMemory, unbounded

ONE_POD_AT_A_TIME = "a claim serves one pod at a time"
"""The words every refusal of a claim to a pod that does not hold it carries (docs/user.md)."""
SHARING_ADVICE = "pods that must run side by side need a claim each (e.g. from a ResourceClaimTemplate)"


def holder(current: Sequence[str], reserved: Sequence[str], unfit: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The pod a claim serves (one uid, or none): `current` (the pod it served) while `reserved` (the uids of
    status.reservedFor, in order) lists it, else the first pod of `reserved` that `unfit` (uid -> why that pod cannot
    hold the claim) does not name. The current holder is not checked again: it passed when it got the claim."""
    kept = [pod for pod in current if pod in reserved]
    if kept:
        return (kept[0],)
    return next(((pod,) for pod in reserved if pod not in (unfit or {})), ())


@dataclass(frozen=True)
class Holding:
    """`claim` serving the pod the rule chose, and why the pods that cannot hold it cannot (uid -> reason)."""

    claim: PreparedClaim
    unfit: Mapping[str, str]


def hold(
    claim: PreparedClaim,
    reserved: Sequence[str],
    pods: Iterable[Mapping[str, Any]],
    memory: BoundMemory | None = None,
) -> Holding:
    """`claim` given to the pod the rule picks from `reserved`. `pods` are the objects of the reserving pods that
    could be read (a pod that is gone has no container to check): a pod whose CPU limit would CFS-throttle a
    container below the claim's CPUs cannot hold it, nor one with a container whose memory may outgrow `memory`,
    what a strict claim binds it to (core/memory_limit.bound_memory; None: the claim's binding is preferred)."""
    unfit = {}
    for pod in pods:
        problems = throttled(pod, claim.ref.name, len(claim.cpus)) if claim.cpus else []
        if memory is not None:
            problems += unbounded(pod, claim.ref.name, memory)
        if problems:
            unfit[str(pod.get("metadata", {}).get("uid"))] = "; ".join(problems)
    return Holding(replace(claim, pod_uids=holder(claim.pod_uids, reserved, unfit)), unfit)


def not_held(claim: ClaimRef, holders: Sequence[str], container: str, pod: str, pod_uid: str) -> str:
    """Why a container of pod `pod` (namespace/name) cannot use `claim`, whose holder is `holders` (or none)."""
    who = f"container {container} of pod {pod} ({pod_uid})"
    if not holders:
        return (
            f"claim {claim} is held by no pod; {who} can use it once its pod holds it ({ONE_POD_AT_A_TIME}: the "
            "first pod its reservedFor lists whose limits fit the claim)"
        )
    return (
        f"claim {claim} is held by pod {', '.join(holders)}; {who} can use it once that pod has ended "
        f"({ONE_POD_AT_A_TIME}; {SHARING_ADVICE})"
    )
