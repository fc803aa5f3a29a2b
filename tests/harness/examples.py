"""hack/examples fitted to a machine: an example's objects unchanged where they fit, scaled down where they do not
(fewer CPUs, NUMA node 0), and refused where no scaling makes them fit (isolated CPUs, hugepages, NUMA nodes)."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.core.topology import Topology
from tests.harness.cluster.objects import CPU_CAPACITY

NUMA_SELECTOR = re.compile(r'(numaNodeID|\["resource\.kubernetes\.io"\]\.numaNode)\s*==\s*(\d+)')
NUMA_COUNT = re.compile(r"numaNodeCount\s*==\s*(\d+)")
RUNNING_SECONDS = 120.0


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@dataclass(frozen=True)
class Fitted:
    docs: list[dict[str, Any]]
    changes: tuple[str, ...]
    """What was changed to fit the machine; empty when the example is applied unchanged."""


class DoesNotFit(Exception):
    """An example this machine cannot run even scaled down (isolated CPUs, hugepages, several NUMA nodes)."""


def _requests(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["spec"] if doc["kind"] == "ResourceClaimTemplate" else doc["spec"]
    found: list[dict[str, Any]] = []
    for request in spec.get("devices", {}).get("requests", []):
        found.extend([request["exactly"]] if "exactly" in request else request.get("firstAvailable", []))
    return found


def fit(docs: Sequence[Mapping[str, Any]], topology: Topology, min_shared_cpus: int = 1) -> Fitted:
    """The example's objects as this machine can run them: unchanged when they fit; otherwise CPU amounts scaled
    down to what claims may take (all CPUs but `min_shared_cpus`) and NUMA selectors moved to node 0. Raises
    DoesNotFit for what no scaling gives (isolated CPUs, hugepages not reserved, more NUMA nodes, another driver's
    devices)."""
    out = [copy.deepcopy(dict(d)) for d in docs]
    nodes = [n.id for n in topology.numa_nodes if n.cpus]
    claimable = len(topology.online_cpus) - len(topology.isolated_cpus) - min_shared_cpus
    reserved_sizes = {p.quantity for n in topology.numa_nodes for p in n.hugepages if p.total}
    cpu_requests: list[dict[str, Any]] = []
    for doc in out:
        if doc["kind"] not in ("ResourceClaim", "ResourceClaimTemplate"):
            continue
        for request in _requests(doc):
            cls = request.get("deviceClassName", "")
            if not cls.startswith(("dra.cpu", "dra.hugepages-")):
                raise DoesNotFit(f"needs a device of another driver (DeviceClass {cls}); this node has none")
            if cls == "dra.cpu.isolated" and not topology.isolated_cpus:
                raise DoesNotFit("needs isolated CPUs (isolcpus=); this machine has none")
            if cls.startswith("dra.hugepages-"):
                size = cls.removeprefix("dra.hugepages-").replace("mi", "Mi").replace("gi", "Gi")
                if size not in reserved_sizes:
                    raise DoesNotFit(f"needs {size} hugepages reserved on a NUMA node; none are")
            for selector in request.get("selectors", []):
                count = NUMA_COUNT.search(selector["cel"]["expression"])
                if count and int(count.group(1)) > len(nodes):
                    raise DoesNotFit(f"needs a device of {count.group(1)} NUMA nodes; this machine has {len(nodes)}")
            if CPU_CAPACITY in request.get("capacity", {}).get("requests", {}):
                cpu_requests.append(request)
    changes: list[str] = []
    named = {
        int(m.group(2))
        for r in cpu_requests
        for s in r.get("selectors", [])
        for m in NUMA_SELECTOR.finditer(s["cel"]["expression"])
    }
    if len(named) > len(nodes):
        raise DoesNotFit(f"needs CPUs on NUMA nodes {sorted(named)}; this machine has {nodes}")
    if named - set(nodes):
        for request in cpu_requests:
            for selector in request.get("selectors", []):
                old = selector["cel"]["expression"]
                selector["cel"]["expression"] = NUMA_SELECTOR.sub(lambda m: f"{m.group(1)} == {nodes[0]}", old)
        changes.append(f"NUMA node {sorted(named)} -> {nodes[0]}")
    wanted = sum(int(r["capacity"]["requests"][CPU_CAPACITY]) for r in cpu_requests)
    if wanted > claimable:
        if len(cpu_requests) > claimable:
            raise DoesNotFit(f"needs {len(cpu_requests)} CPU requests; {claimable} CPU(s) can be claimed here")
        for request in cpu_requests:
            request["capacity"]["requests"][CPU_CAPACITY] = "1"
        total = str(len(cpu_requests))
        for doc in out:
            if doc["kind"] == "Pod":
                for container in doc["spec"]["containers"]:
                    for part in ("requests", "limits"):
                        if "cpu" in container.get("resources", {}).get(part, {}):
                            container["resources"][part]["cpu"] = total
        changes.append(f"{wanted} CPUs -> {total}")
    return Fitted(out, tuple(changes))
