"""Which cpuset (and mems, memory policy, hugepage limits) each container gets. Pure: data in, decisions out.

A container is pinned to a claim only when three independent facts agree: the driver prepared the claim, the
container's env carries the claim's CDI variable with exactly the prepared cpuset, and the container's pod (as the
runtime reports it, not as the container says) is the pod the claim serves, one of its reservedFor pods. NRI does
not say which CDI devices a container got, so the env alone proves nothing: anyone can write DRA_CPUSET_<uid> into
a pod spec. Everything else runs on the shared pool.

A claim's CPUs are shared by the containers of the one pod it serves (core/sharing.py), never by two pods at once:
a container of another pod whose env names the claim with exactly its cpuset (the claim really is shared, by the
pod spec, not forged) is refused outright by NRI (ClaimSharedAcrossPods) rather than silently given the shared
pool, so that the kubelet retries it and it starts pinned once its pod holds the claim. Only the ledger says which
pod that is: DRA_PODS_<uid> in a container's env is what the claim's spec said when the container was created.

A claimed container's memory is bound to its strict claims' nodes, or, when none of its claims is strict, left on
every node with the claims' nodes preferred (`memory_placement`, core/memory.py says why).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dra_cpu.core import cdi_spec
from dra_cpu.core.capacity import SharedFloor
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, Ledger, PreparedClaim
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.sharing import not_held
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError


@dataclass(frozen=True)
class ContainerInfo:
    """What the plugin keeps of a container the runtime told it about."""

    id: str
    name: str
    pod_uid: str
    pod: str
    """namespace/name, for log lines."""
    env_claims: Mapping[str, str] = field(default_factory=dict)
    """claim uid -> the raw value of DRA_CPUSET_<uid> in the container's env."""


def container_info(container_id: str, name: str, pod_uid: str, pod: str, env: Iterable[str]) -> ContainerInfo:
    return ContainerInfo(container_id, name, pod_uid, pod, cdi_spec.claimed_cpusets(env))


@dataclass(frozen=True)
class MemoryPolicy:
    """The memory policy of a claimed container's tasks, where the runtime applies one (NRI 0.12+): MPOL_BIND to
    `nodes` (strict), or a preference for them (MPOL_PREFERRED, MPOL_PREFERRED_MANY for several)."""

    binding: MemoryBinding
    nodes: CPUSet


@dataclass(frozen=True)
class Pin:
    """The resources a container must have. Empty mems means "leave as is" (no memory node has been chosen)."""

    cpus: CPUSet
    mems: CPUSet = field(default_factory=CPUSet)
    hugepage_limits: tuple[tuple[str, int], ...] = ()
    """(OCI page size such as "2MB", bytes), for hugepage claims."""
    claims: tuple[str, ...] = ()
    """uids of the claims this container is pinned to; empty for the shared pool."""
    memory_policy: MemoryPolicy | None = None
    """None for the shared pool (the kernel's default)."""


@dataclass(frozen=True)
class Rejection:
    claim_uid: str
    reason: str


@dataclass(frozen=True)
class Decision:
    pin: Pin
    rejected: tuple[Rejection, ...] = ()


class NoSharedCpus(DraCpuError):
    """The shared pool is empty: a container without a claim would run nowhere (or, worse, everywhere)."""


class ClaimSharedAcrossPods(DraCpuError):
    """A container uses a claim that serves another pod (or none yet): refused, with a message naming both."""

    def __init__(self, message: str, claim_uid: str) -> None:
        super().__init__(message)
        self.claim_uid = claim_uid


@dataclass(frozen=True)
class Pools:
    """The node-wide facts every container's pin needs, computed once per change of the ledger or the topology."""

    ledger: Ledger
    topology: Topology
    shared: CPUSet
    shared_mems: CPUSet


def pools(ledger: Ledger, topology: Topology, reserved: CPUSet | None = None, strict_reserved: bool = False) -> Pools:
    """The shared pool: online CPUs minus claimed, isolated and (with strict_reserved) reserved CPUs."""
    floor = SharedFloor(excluded=reserved if strict_reserved and reserved else CPUSet())
    shared = floor.pool(topology, ledger.allocated_cpus)
    memory_nodes = CPUSet.of(n.id for n in topology.numa_nodes if n.memory_bytes > 0)
    return Pools(ledger, topology, shared, memory_nodes)


def oci_page_size(size_kib: int) -> str:
    """The OCI runtime spec's hugepage size names: 64KB, 2MB, 1GB."""
    for unit, scale in (("GB", 1 << 20), ("MB", 1 << 10)):
        if size_kib % scale == 0:
            return f"{size_kib // scale}{unit}"
    return f"{size_kib}KB"


def _hugepage_limits(grants: Iterable[HugePageGrant]) -> tuple[tuple[str, int], ...]:
    limits: dict[str, int] = {}
    for grant in grants:
        key = oci_page_size(grant.page_size_kib)
        limits[key] = limits.get(key, 0) + grant.bytes
    return tuple(sorted(limits.items()))


@dataclass(frozen=True)
class Entitlement:
    """What the driver prepared for one claim, as far as enforcement needs it: from its ledger (NRI) or from its
    CDI spec (the createRuntime hook)."""

    cpus: CPUSet
    mems: CPUSet
    pod_uids: tuple[str, ...]
    binding: MemoryBinding = MemoryBinding.PREFERRED
    hugepage_nodes: CPUSet = field(default_factory=CPUSet)


def entitlement(claim: PreparedClaim, topology: Topology) -> Entitlement:
    return Entitlement(claim.cpus, claim.mems(topology), claim.pod_uids, claim.binding, claim.hugepage_nodes)


def memory_placement(claims: Sequence[Entitlement], wide: CPUSet) -> tuple[CPUSet, MemoryPolicy | None]:
    """cpuset.mems and the memory policy of a container with `claims`. With a strict claim: bound to the strict
    claims' nodes, and to every claim's hugepage nodes (its pages come from there). Without: `wide` (every node
    with memory; empty: leave as is), preferring the claims' nodes."""
    strict = [c for c in claims if c.binding is MemoryBinding.STRICT]
    if strict:
        nodes = CPUSet.union_all(c.mems for c in strict) | CPUSet.union_all(c.hugepage_nodes for c in claims)
        return nodes, MemoryPolicy(MemoryBinding.STRICT, nodes)
    preferred = CPUSet.union_all(c.mems for c in claims)
    return wide, MemoryPolicy(MemoryBinding.PREFERRED, preferred) if preferred else None


def refusal(value: str, pod_uid: str, prepared: Entitlement | None) -> str:
    """Why DRA_CPUSET_<uid>=value in a container of pod `pod_uid` does not entitle it to the claim the driver
    prepared as `prepared` (None: not prepared here), or "" when it does. The one rule of NRI and the CDI hook. An
    empty pod_uid means the runtime did not name the pod (an OCI hook under podman): then only the cpuset can be
    checked; NRI always names it."""
    if prepared is None:
        return "no such claim is prepared on this node"
    try:
        cpus = CPUSet.parse(value)
    except DraCpuError:
        return f"cpuset {value!r} is not a cpu list"
    if cpus != prepared.cpus:
        return f"cpuset {value!r} is not the claim's ({prepared.cpus})"
    if pod_uid and pod_uid not in prepared.pod_uids:
        return f"pod {pod_uid} is not the pod the claim serves ({', '.join(prepared.pod_uids) or 'none'})"
    return ""


def _check(container: ContainerInfo, uid: str, value: str, pools: Pools, refuse_shared: bool) -> str:
    claim = pools.ledger.claims.get(uid)
    prepared = None if claim is None else entitlement(claim, pools.topology)
    reason = refusal(value, container.pod_uid, prepared)
    if reason and refuse_shared and claim is not None and _same_cpuset(value, claim.cpus) and container.pod_uid:
        # The env is the claim's own (the CDI device was given to this container), only the pod is another one.
        raise ClaimSharedAcrossPods(
            not_held(claim.ref, claim.pod_uids, container.name, container.pod, container.pod_uid), uid
        )
    return reason


def _same_cpuset(value: str, cpus: CPUSet) -> bool:
    try:
        return CPUSet.parse(value) == cpus
    except DraCpuError:
        return False


def pin_for(container: ContainerInfo, pools: Pools, refuse_shared: bool = False) -> Decision:
    """The pin for one container. NoSharedCpus when it should run on the shared pool and the pool is empty;
    with `refuse_shared` (a container being created), ClaimSharedAcrossPods when it uses a claim that serves
    another pod. Without it (containers already running: a claim handed over from their pod) that claim is
    rejected like a forged one: they move to the shared pool."""
    granted, rejected = [], []
    for uid, value in sorted(container.env_claims.items()):
        reason = _check(container, uid, value, pools, refuse_shared)
        if reason:
            rejected.append(Rejection(uid, reason))
        else:
            granted.append(pools.ledger.claims[uid])
    if granted:
        cpus = CPUSet.union_all(c.cpus for c in granted)
        mems, policy = memory_placement([entitlement(c, pools.topology) for c in granted], pools.shared_mems)
        hugepages = _hugepage_limits(h for c in granted for h in c.hugepages)
        if not cpus:
            # A claim of hugepages or memory only holds no CPUs: the container runs on the shared pool.
            cpus = pools.shared
        if cpus:
            return Decision(Pin(cpus, mems, hugepages, tuple(c.uid for c in granted), policy), tuple(rejected))
    if not pools.shared:
        raise NoSharedCpus(
            f"container {container.name} of pod {container.pod} needs the shared pool, and no shared CPU is left"
        )
    return Decision(Pin(pools.shared, pools.shared_mems), tuple(rejected))
