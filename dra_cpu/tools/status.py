"""`dra-cpu status`: per node and NUMA node, the CPUs, memory and hugepages the driver publishes, what allocated
claims hold of them (their consumedCapacity) and which claims those are. The view before placing a big NUMA-bound
workload. Totals are what the slices publish (the daemon's own count: core/memory.allocatable_memory for memory),
held amounts are counted as the scheduler counts them (explain/model.held_amount).

Pure: ResourceSlices + ResourceClaims in, a report out (cli/status.py reads them from the API server).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dra_cpu.core.quantity import format_bytes
from dra_cpu.tools.explain.model import SliceDevice, Usage, held_amount, number


@dataclass(frozen=True)
class Amount:
    total: Fraction
    allocated: Fraction

    @property
    def free(self) -> Fraction:
        return self.total - self.allocated


_NONE = Amount(Fraction(0), Fraction(0))


@dataclass(frozen=True)
class Holding:
    claim: str
    device: str
    what: str


@dataclass(frozen=True)
class NumaStatus:
    node: str
    numa: int
    cpus: Amount
    isolated: Amount
    # Page size ("2Mi") -> bytes.
    hugepages: tuple[tuple[str, Amount], ...]
    claims: tuple[Holding, ...]
    # numa -1: a socket or machine device over several NUMA nodes, these ("0-1"); "" when unknown.
    numa_nodes: str = ""
    # Bytes of the node's memory device.
    memory: Amount = _NONE

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "numaNode": self.numa,
            **({"numaNodes": self.numa_nodes} if self.numa_nodes else {}),
            "cpus": _cpus(self.cpus),
            "isolatedCpus": _cpus(self.isolated),
            "memory": _bytes(self.memory),
            "hugepages": {size: _bytes(a) for size, a in self.hugepages},
            "claims": [{"claim": h.claim, "device": h.device, "holds": h.what} for h in self.claims],
        }


def _cpus(amount: Amount) -> dict[str, int]:
    return {"total": int(amount.total), "allocated": int(amount.allocated), "free": int(amount.free)}


def _bytes(amount: Amount) -> dict[str, str]:
    return {
        k: format_bytes(int(v))
        for k, v in (("total", amount.total), ("allocated", amount.allocated), ("free", amount.free))
    }


@dataclass
class _Tally:
    cpus: Amount = _NONE
    isolated: Amount = _NONE
    hugepages: dict[str, Amount] = field(default_factory=dict)
    memory: Amount = _NONE
    claims: list[Holding] = field(default_factory=list)


def _add(a: Amount, total: Fraction, allocated: Fraction) -> Amount:
    return Amount(a.total + total, a.allocated + allocated)


def _numa(device: SliceDevice) -> int:
    for key in (f"{device.driver}/numaNodeID", "resource.kubernetes.io/numaNode"):
        value = device.attributes.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return -1


def cluster_status(
    devices: Iterable[SliceDevice], usage: Mapping[tuple[str, str, str], Usage], driver: str
) -> tuple[NumaStatus, ...]:
    """One row per (node, NUMA node) of `driver`'s devices. A device with capacity counts its capacity and what
    claims consumed of it; an individual-mode CPU device (no capacity) counts 1, allocated when any claim holds it."""
    tallies: dict[tuple[str, int, str], _Tally] = {}
    for device in devices:
        if device.driver != driver:
            continue
        kind = device.attributes.get(f"{driver}/type")
        held = usage.get(device.key, Usage())
        numa = _numa(device)
        span = str(device.attributes.get(f"{driver}/numaNodes", "")) if numa < 0 else ""
        tally = tallies.setdefault((device.node or device.pool, numa, span), _Tally())
        if kind == "cpu":
            key = f"{driver}/cpu"
            total = device.capacity[key].value if key in device.capacity else Fraction(1)
            taken = held_amount(device, held, key) if key in device.capacity else Fraction(1 if held.holders else 0)
            if device.attributes.get(f"{driver}/isolated") is True:
                tally.isolated = _add(tally.isolated, total, taken)
            else:
                tally.cpus = _add(tally.cpus, total, taken)
            unit = "CPU(s)"
        elif kind in ("hugepages", "memory") and f"{driver}/memory" in device.capacity:
            key = f"{driver}/memory"
            total, taken = device.capacity[key].value, held_amount(device, held, key)
            if kind == "memory":
                tally.memory = _add(tally.memory, total, taken)
                unit = "of memory"
            else:
                size = str(device.attributes.get(f"{driver}/pageSize", "?"))
                tally.hugepages[size] = _add(tally.hugepages.get(size, _NONE), total, taken)
                unit = f"of {size} hugepages"
        else:
            continue
        for claim in held.holders:
            what = number(held_amount(device, held, key, claim)) if key in device.capacity else "1"
            tally.claims.append(Holding(claim, device.name, f"{what} {unit}"))
    return tuple(
        NumaStatus(node, numa, t.cpus, t.isolated, tuple(sorted(t.hugepages.items())), tuple(t.claims), span, t.memory)
        for (node, numa, span), t in sorted(tallies.items())
    )


_COLUMNS = (
    ("NODE", "<20"),
    ("NUMA", ">4"),
    ("CPUS", ">5"),
    ("ALLOC", ">5"),
    ("FREE", ">5"),
    ("ISOLATED(A/T)", ">13"),
    ("MEMORY(A/T)", ">15"),
    ("HUGEPAGES(A/T)", "<24"),
    ("CLAIMS", ""),
)


def _line(cells: Iterable[object]) -> str:
    return " ".join(f"{cell!s:{fmt}}" for cell, (_, fmt) in zip(cells, _COLUMNS, strict=True)).rstrip()


def _of(amount: Amount) -> str:
    """allocated/total in bytes."""
    return f"{format_bytes(int(amount.allocated)) if amount.allocated else '0'}/{format_bytes(int(amount.total))}"


def render_table(rows: tuple[NumaStatus, ...]) -> str:
    lines = [_line(name for name, _ in _COLUMNS)]
    for row in rows:
        pages = ", ".join(f"{size} {_of(a)}" for size, a in row.hugepages)
        cpus = _cpus(row.cpus)
        lines.append(
            _line(
                (
                    row.node,
                    row.numa_nodes or row.numa,
                    cpus["total"],
                    cpus["allocated"],
                    cpus["free"],
                    f"{int(row.isolated.allocated)}/{int(row.isolated.total)}",
                    _of(row.memory) if row.memory.total else "-",
                    pages or "-",
                    ", ".join(f"{h.claim} ({h.what})" for h in row.claims) or "-",
                )
            )
        )
    return "\n".join(lines) + "\n"
