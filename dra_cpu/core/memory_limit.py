"""Can a claimed container use more memory than its claim binds it to? Pure.

A container bound strictly to a claim's memory nodes (core/memory.py) has only those nodes: beyond the claim's
memory it takes what other claims were granted there, or is OOM-killed while other nodes have memory free. So
prepare refuses a pod whose container uses such a claim and may use more than it: a memory limit (as
core/pod_limits.py reads it) above the bytes the claim binds it to, or no limit at all. The shape of the CFS check
(core/cpu_quota.py), in the same place. A preferred binding spills to other nodes instead, and is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import PreparedClaim
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.node_view import NodeView
from dra_cpu.core.pod_limits import claim_containers
from dra_cpu.core.quantity import format_bytes

MEMORY = "memory"
_ADVICE = "or set memoryBinding: preferred in the claim's CPUConfig"


@dataclass(frozen=True)
class BoundMemory:
    """What a strict claim binds its containers' memory to: `bytes` on NUMA nodes `nodes`."""

    bytes: int
    nodes: CPUSet


def bound_memory(claim: PreparedClaim, view: NodeView) -> BoundMemory | None:
    """The memory a strict claim binds its containers to: its memory, or, for a claim without memory opted into
    strict, what its nodes have for claims; None for a claim whose binding is preferred."""
    if claim.binding is not MemoryBinding.STRICT:
        return None
    nodes = claim.mems(view.topology)
    if claim.memory:
        return BoundMemory(sum(m.bytes for m in claim.memory), nodes)
    return BoundMemory(sum(view.memory_capacity.get(node, 0) for node in nodes), nodes)


def _bytes(value: Fraction) -> str:
    return format_bytes(math.ceil(value))


def unbounded(pod: Mapping[str, Any], claim: str, memory: BoundMemory) -> list[str]:
    """One message per container of `pod` that uses the ResourceClaim named `claim` (binding its memory to
    `memory`) and may use more; empty when none may."""
    bound = memory.bytes
    where = f"{format_bytes(bound)} on NUMA node(s) {memory.nodes}"
    problems = []
    for container in claim_containers(pod, claim):
        limit = container.limit(MEMORY)
        if limit is None:
            problems.append(
                f"{container.source}: container {container.name!r} has no memory limit, and claim {claim!r} binds its "
                f"memory to {where}: set resources.limits.memory to at most {format_bytes(bound)}, {_ADVICE}"
            )
        elif limit.amount > bound:
            room = bound - limit.mapped
            fix = (
                f"lower that limit to at most {_bytes(room)}"
                if room > 0
                else "remove that limit and set the pod's spec.resources.limits.memory to at most "
                f"{format_bytes(bound)} (the kubelet adds the claim's memory to a container's own limit)"
            )
            problems.append(
                f"{container.source}: container {container.name!r} may use {_bytes(limit.amount)} of memory "
                f"({limit.describe(_bytes)}), more than the {where} claim {claim!r} binds it to; {fix}, {_ADVICE}"
            )
    return problems
