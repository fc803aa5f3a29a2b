"""Text for people: the `discover` table. Pure: values in, a string out."""

from __future__ import annotations

import json
from typing import Any

import yaml

from dra_cpu.core.topology import Topology


def dump(data: Any, output: str) -> str:
    """Machine output in the format named by --output (json or yaml)."""
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def dump_objects(objects: list[dict[str, Any]], output: str) -> str:
    """Kubernetes objects as kubectl takes them: a YAML stream, or a JSON v1 List."""
    if output == "json":
        return dump({"apiVersion": "v1", "kind": "List", "items": objects}, "json")
    return yaml.safe_dump_all(objects, sort_keys=False)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def topology_table(topo: Topology) -> str:
    lines = [
        f"CPU model:    {topo.cpu_model or 'unknown'}",
        f"Sockets:      {len(topo.sockets)} ({', '.join(map(str, topo.sockets)) or '-'})",
        f"CPUs:         {len(topo.cpus)} present, online {topo.online_cpus or '-'}, offline {topo.offline_cpus or '-'}",
        f"SMT:          {'on' if topo.smt_active else 'off'}, {topo.threads_per_core} thread(s) per core, "
        f"{len(topo.cores())} physical cores online",
        f"Isolated:     {topo.isolated_cpus or '-'}",
        "L3 groups:    " + ("  ".join(f"{k}:{v}" for k, v in topo.l3_groups().items() if k >= 0) or "none"),
        "",
        f"{'NODE':<5} {'CPUS':<20} {'CORES':>5} {'MEMORY':>11} {'HUGEPAGES (total/free)':<32} DISTANCES",
    ]
    for node in topo.numa_nodes:
        pages = ", ".join(f"{p.quantity} {p.total}/{p.free}" for p in node.hugepages) or "-"
        distances = " ".join(str(d) for _, d in node.distances)
        cpus = str(node.cpus) if node.cpus else "(memory only)"
        cores = len(topo.cores(node.cpus)) if node.cpus else 0
        lines.append(
            f"{node.id:<5} {cpus:<20} {cores:>5} {_human_bytes(node.memory_bytes):>11} {pages:<32} {distances}"
        )
    if topo.hugepages:
        lines.append("")
        lines.append("Hugepages (machine): " + ", ".join(f"{p.quantity} {p.total}/{p.free}" for p in topo.hugepages))
    if topo.pcie_roots:
        lines.append("")
        lines.append(
            "PCIe roots:   "
            + "  ".join(f"{r.name}:{'any' if r.numa_node is None else f'node{r.numa_node}'}" for r in topo.pcie_roots)
        )
    return "\n".join(lines) + "\n"
