"""A NUMA node's memory for claims, and how a claim's memory is bound. Pure.

What claims may get of a node's memory (its allocatable memory) is its MemTotal less its hugepage pools (hugepages
are counted in MemTotal, and published as devices of their own) and less what the admin reserves there for the
kernel, the system daemons and every container without a memory claim (`reservedMemory`, per NUMA node). It is
published in whole steps of `MEMORY_STEP`, the requestPolicy step of every memory device.

How a claimed container's memory is bound (`MemoryBinding`, the claim's `memoryBinding`):
- strict: cpuset.mems holds only the claim's memory nodes, and MPOL_BIND to them where the runtime applies memory
  policies: the memory comes from there or the container is OOM-killed. The default of a claim with memory, whose
  bytes are counted per node, so that what it is bound to is really there for it;
- preferred: cpuset.mems stays wide (every node with memory, as for containers without claims) and the memory policy
  prefers the claim's nodes (MPOL_PREFERRED / MPOL_PREFERRED_MANY); with pinned CPUs the kernel's local allocation
  prefers them anyway. When they are full, the memory spills to other nodes instead of OOM-killing the container.
  The default of a claim without memory (CPUs only, or with hugepages), whose regular memory nobody counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction

from dra_cpu.core.quantity import QuantityError, parse_quantity
from dra_cpu.core.topology import NumaNode
from dra_cpu.errors import DraCpuError, shown

MEMORY_STEP = 1 << 20
"""Memory is published, requested (requestPolicy step and default) and granted in whole MiB."""
DEFAULT_RESERVED_MEMORY = "5%"
_ITEM = re.compile(r"^(?:(\d+):)?(.+)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


class MemoryBinding(StrEnum):
    STRICT = "strict"
    PREFERRED = "preferred"


class ReservedMemoryError(DraCpuError):
    """A `reservedMemory` setting that does not say how much to reserve."""


@dataclass(frozen=True)
class Reservation:
    """An amount reserved on a NUMA node: bytes, or a share of its MemTotal."""

    bytes: int = 0
    percent: Fraction = Fraction(0)

    def of(self, mem_total: int) -> int:
        return self.bytes + int(mem_total * self.percent / 100)


@dataclass(frozen=True)
class ReservedMemory:
    """`reservedMemory`: comma-separated amounts, each a quantity ("512Mi") or a share of the node's MemTotal ("5%");
    `<node>:<amount>` for NUMA node <node>, a bare amount for every node not named. As the kubelet's
    --reserved-memory, a node named nowhere (no bare amount) has nothing reserved. "" reserves nothing."""

    text: str = DEFAULT_RESERVED_MEMORY
    default: Reservation = field(default_factory=lambda: Reservation(percent=Fraction(5)))
    nodes: tuple[tuple[int, Reservation], ...] = ()

    def on(self, node: int) -> Reservation:
        return dict(self.nodes).get(node, self.default)


def parse_reserved_memory(text: str) -> ReservedMemory:
    """ReservedMemoryError naming the item when `text` is not a list of amounts."""
    default = Reservation()
    nodes: dict[int, Reservation] = {}
    bare = False
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _ITEM.match(item)
        assert match is not None  # .+ matches any item
        node, amount = match.groups()
        reservation = _reservation(text, item, amount)
        if node is None:
            if bare:
                raise ReservedMemoryError(f"reservedMemory {shown(text)}: two amounts for every node")
            bare, default = True, reservation
        elif int(node) in nodes:
            raise ReservedMemoryError(f"reservedMemory {shown(text)}: NUMA node {node} named twice")
        else:
            nodes[int(node)] = reservation
    return ReservedMemory(text, default, tuple(sorted(nodes.items())))


def _reservation(text: str, item: str, amount: str) -> Reservation:
    percent = _PERCENT.match(amount)
    if percent:
        share = Fraction(percent.group(1))
        if share > 100:
            raise ReservedMemoryError(f"reservedMemory {shown(text)}: {item!r} reserves more than the whole node")
        return Reservation(percent=share)
    try:
        value = parse_quantity(amount)
    except QuantityError as err:
        raise ReservedMemoryError(
            f"reservedMemory {shown(text)}: {item!r} is neither a quantity nor a percentage ({err})"
        ) from None
    if value < 0 or value.denominator != 1:
        raise ReservedMemoryError(f"reservedMemory {shown(text)}: {item!r} must be a whole number of bytes, at least 0")
    return Reservation(bytes=int(value))


def allocatable_memory(node: NumaNode, reserved: ReservedMemory) -> int:
    """What claims may get of `node`'s memory, in whole MEMORY_STEPs (0 when the reservation takes it all)."""
    hugepages = sum(pool.total * pool.size_bytes for pool in node.hugepages)
    left = node.memory_bytes - hugepages - reserved.on(node.id).of(node.memory_bytes)
    return max(0, left) // MEMORY_STEP * MEMORY_STEP
