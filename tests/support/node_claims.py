"""What the real-node tests (tests/e2e/test_node_*.py) share: hack/examples fitted to the machine, pods run to
Running or to their end, and what a claim looks like from the cluster, the driver's files and inside containers."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from dra_cpu.core.cdi_spec import ENV_CPUSET, ENV_MEMS
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from tests.support.cluster import CPU_CAPACITY, DRIVER, Kube, wait_for
from tests.support.real_node import RealNode, container_id

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


# ----------------------------------------------------------------------------------------------------------------
# Pods.


def create_all(kube: Kube, namespace: str, docs: Iterable[Mapping[str, Any]]) -> None:
    for doc in docs:
        kube.create(doc, namespace)


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def events(kube: Kube, namespace: str, name: str) -> list[str]:
    """`reason: message` of the pod's events, oldest first."""
    listed = kube.list(f"/api/v1/namespaces/{namespace}/events", field_selector=f"involvedObject.name={name}")
    listed.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return [f"{e.get('reason')}: {e.get('message')}" for e in listed]


def running(kube: Kube, namespace: str, name: str, timeout: float = RUNNING_SECONDS) -> dict[str, Any]:
    """The pod once Running with every container started; on timeout the failure shows its phase and events."""

    def check() -> dict[str, Any] | None:
        pod: dict[str, Any] = kube.get(pod_path(namespace, name))
        statuses = pod.get("status", {}).get("containerStatuses", [])
        started = statuses and all(s.get("state", {}).get("running") for s in statuses)
        return pod if pod.get("status", {}).get("phase") == "Running" and started else None

    try:
        return wait_for(check, f"pod {namespace}/{name} to run", timeout, interval=0.3)
    except AssertionError as err:
        pod = kube.find(pod_path(namespace, name)) or {}
        status = json.dumps(pod.get("status", {}), indent=1)[:3000]
        raise AssertionError(f"{err}\nstatus: {status}\nevents: {events(kube, namespace, name)}") from None


def delete_pod(kube: Kube, namespace: str, name: str, timeout: float = 90.0) -> None:
    """Deletes with a 1 s grace period and waits until the kubelet has finished with it (the object is gone only
    after its containers stopped and its claims were unprepared)."""
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 1}
    try:
        kube.request("DELETE", pod_path(namespace, name), body)
    except client.ApiException as err:
        if err.status != 404:
            raise
    wait_for(lambda: kube.find(pod_path(namespace, name)) is None, f"pod {namespace}/{name} to be gone", timeout)


# ----------------------------------------------------------------------------------------------------------------
# A claim seen from the driver's files and from inside containers.


def checkpoint_claims(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Claim UID -> record, from the driver's checkpoint on the host."""
    path = state_dir / "checkpoint.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {str(c["uid"]): c for c in doc.get("claims", [])}


def cdi_spec_uids(cdi_dir: Path) -> set[str]:
    """Claim UIDs of the driver's CDI specs on the host."""
    prefix = f"{DRIVER}-cpu_claim-"
    return {p.name.removeprefix(prefix).removesuffix(".json") for p in cdi_dir.glob(f"{prefix}*.json")}


@dataclass(frozen=True)
class Pinning:
    """One container's CPUs and memory nodes, every way they can be seen."""

    claimed: dict[str, CPUSet]  # claim UID -> DRA_CPUSET_<uid> in the container's environment
    mems_env: dict[str, CPUSet]  # claim UID -> DRA_MEMS_<uid>
    inside: tuple[CPUSet, CPUSet]  # Cpus_allowed_list, Mems_allowed_list of a new process in the container
    init: tuple[CPUSet, CPUSet]  # the same of the container's first process, from the host's /proc
    cgroup: tuple[CPUSet, CPUSet]  # cpuset.cpus, cpuset.mems of its cgroup on the host


def pinning(node: RealNode, pod: Mapping[str, Any], container: str | None = None) -> Pinning:
    cid = container_id(pod, container)
    env = dict(line.split("=", 1) for line in node.exec(cid, ["env"]).splitlines() if "=" in line)
    claimed = {k.removeprefix(ENV_CPUSET): CPUSet.parse(v) for k, v in env.items() if k.startswith(ENV_CPUSET)}
    mems = {k.removeprefix(ENV_MEMS): CPUSet.parse(v) for k, v in env.items() if k.startswith(ENV_MEMS)}
    inside = node.allowed_inside(cid)
    pid = int(node.container_info(cid)["pid"])
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    cpus, mems_text = node.host_cpuset(cid)
    return Pinning(
        claimed,
        mems,
        (inside.cpus, inside.mems),
        (CPUSet.parse(fields["Cpus_allowed_list"].strip()), CPUSet.parse(fields["Mems_allowed_list"].strip())),
        (CPUSet.parse(cpus), CPUSet.parse(mems_text)),
    )


def wait_cpus(
    node: RealNode, pod: Mapping[str, Any], want: CPUSet, what: str, timeout: float = 30.0, container: str | None = None
) -> Pinning:
    """The container's pinning (the first one's, or `container`'s) once a new process in it, its first process and its
    cgroup all have `want`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = pinning(node, pod, container)
        if seen.inside[0] == want and seen.init[0] == want and seen.cgroup[0] == want:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: CPUs {want} expected, seen {seen}")
        time.sleep(0.3)
