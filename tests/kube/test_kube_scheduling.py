"""The real kube-scheduler and kube-controller-manager allocate our devices: pods using the claims of hack/examples (the
files unchanged) are placed on a Node carrying the driver's slices, and the allocation the scheduler writes into each
claim's status is the one `dra-cpu explain` predicts. Everything is read back from the API server; no kubelet runs, so
pods stay bound and unstarted, and are deleted with a zero grace period."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from dra_cpu.core.devices import DeviceConfig, GroupBy, build_devices, build_slices
from dra_cpu.core.quantity import parse_quantity
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.explain.parse import parse_slices
from tests.harness.cluster.client import Kube, close_api_client
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import Helm
from tests.harness.cluster.objects import (
    busybox_pod,
    claim_path,
    cpu_claim,
    defaulted_from,
    delete_node,
    ensure,
    new_namespace,
    pinned_pod,
)
from tests.harness.cluster.pods import pod_scheduled_condition, wait_allocated, wait_scheduled
from tests.harness.nodes.published import PublishedNode, publish_node
from tests.harness.paths import REPO
from tests.harness.poll import wait_until

EXAMPLES = REPO / "hack" / "examples"
# Examples that pair our devices with another driver's have a test of their own (below).
GPU_EXAMPLE = EXAMPLES / "claim-cpu-gpu-pcie-root.yaml"
FILES = sorted(f for f in EXAMPLES.glob("*.yaml") if f != GPU_EXAMPLE)
FIXTURES = REPO / "tests" / "fixtures" / "sysfs"
DRIVER = "dra.cpu"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def classes_file(control_plane: ControlPlane, helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's DeviceClasses (default values) on the server, and in a file for `dra-cpu explain`."""
    classes = [o for o in helm.template() if o["kind"] == "DeviceClass"]
    api = control_plane.admin()
    try:
        ensure(Kube(api), classes)
    finally:
        close_api_client(api)
    path = tmp_path_factory.mktemp("classes") / "classes.yaml"
    path.write_text(yaml.safe_dump_all(classes))
    return path


@pytest.fixture
def namespace(admin: Kube) -> str:
    """A namespace of the control plane's, ready for pods."""
    return new_namespace(admin)


class NodeMaker(Protocol):
    """The `make_node` fixture: a Node carrying the driver's slices for a sysfs capture."""

    def __call__(self, sysfs_root: Path, group_by: GroupBy = ..., pcie_roots: bool = ...) -> PublishedNode: ...


@pytest.fixture
def make_node(control_plane: ControlPlane, admin: Kube) -> Iterator[NodeMaker]:
    """Makes Nodes for the test; deleted afterwards (the garbage collector then deletes their slices)."""
    made: list[str] = []

    def make(sysfs_root: Path, group_by: GroupBy = GroupBy.NUMA_NODE, pcie_roots: bool = False) -> PublishedNode:
        name = unique("node")
        made.append(name)
        config = DeviceConfig(node_name=name, group_by=group_by, pcie_roots=pcie_roots)
        return publish_node(control_plane.kubeconfig, admin.api, name, sysfs_root, config)

    yield make
    for name in made:
        delete_node(admin.api, name)


def isolated_copy(root: Path, name: str) -> Path:
    """A capture with the last two cores of NUMA node 0 isolated, as `isolcpus=` makes the kernel report them."""
    tree = root / f"{name}+isolcpus"
    shutil.copytree(FIXTURES / name, tree, symlinks=True)
    topology = read_topology(tree)
    cores = topology.cores(topology.numa_nodes[0].cpus)
    isolated = sorted(cpu for core in cores[-2:] for cpu in core)
    (tree / "sys/devices/system/cpu/isolated").write_text(",".join(map(str, isolated)) + "\n")
    return tree


def explain(
    claim_file: Path, claim: str, classes_file: Path, slices: Sequence[Mapping[str, Any]], tmp_path: Path
) -> dict[str, Any]:
    """`dra-cpu explain -o json` of the claim in `claim_file` against `slices`."""
    slices_file = tmp_path / f"slices-{uuid.uuid4().hex[:8]}.yaml"
    slices_file.write_text(yaml.safe_dump_all([dict(s) for s in slices]))
    done = subprocess.run(
        [sys.executable, "-m", "dra_cpu", "explain", "--claim", str(claim_file), "--claim-name", claim,
         "--class", str(classes_file), "--slices", str(slices_file), "-o", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def explain_claim(claim: Mapping[str, Any], classes_file: Path, node: PublishedNode, tmp_path: Path) -> dict[str, Any]:
    """`explain` of a claim object against the node's slices (written to a file of its name first)."""
    name = claim["metadata"]["name"]
    claim_file = tmp_path / f"{name}.yaml"
    claim_file.write_text(yaml.safe_dump(dict(claim)))
    return explain(claim_file, name, classes_file, node.slices, tmp_path)


def consumption(node: PublishedNode, device: str, request: Mapping[str, Any]) -> dict[str, Fraction]:
    """What a request takes of each capacity of `device` under its requestPolicy (the explain model's rounding):
    the amount asked for rounded up to a valid one, or the policy's default for capacities not asked for."""
    [found] = [d for d in parse_slices(node.slices, node.name) if d.name == device]
    asked = request.get("capacity", {}).get("requests", {})
    taken: dict[str, Fraction] = {}
    for key, capacity in found.capacity.items():
        amount = capacity.rounded(parse_quantity(asked[key])) if key in asked else capacity.unrequested
        assert amount is not None, f"{key}: {asked[key]} fits no valid amount"
        taken[key] = amount
    return taken


def quantities(consumed: Mapping[str, str]) -> dict[str, Fraction]:
    return {key: parse_quantity(value) for key, value in consumed.items()}


def run_pod(admin: Kube, namespace: str, pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    admin.create(pinned_pod(pod, node), namespace)
    bound = wait_scheduled(admin, namespace, pod["metadata"]["name"])
    assert bound["spec"]["nodeName"] == node
    return bound


def results_by_request(claim: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["request"]: r for r in claim["status"]["allocation"]["devices"]["results"]}


def check_allocation(
    claim: Mapping[str, Any], predicted: Mapping[str, Any], node: PublishedNode, pod: Mapping[str, Any]
) -> None:
    """The scheduler's allocation is what explain predicted: the same device for each request, the capacity the
    requestPolicy rounds to, a share ID per allocation of a shareable device, and the pod reserving the claim."""
    assert predicted["satisfiable"], predicted["reason"]
    requests = {r["name"]: r["exactly"] for r in claim["spec"]["devices"]["requests"]}
    results = results_by_request(claim)
    assert set(results) == set(requests)
    for entry in predicted["requests"]:
        result = results[entry["name"]]
        assert (result["driver"], result["pool"]) == (DRIVER, node.name)
        assert [result["device"]] == entry["allocated"]["devices"], entry["name"]
        assert quantities(result["consumedCapacity"]) == consumption(node, result["device"], requests[entry["name"]])
        uuid.UUID(result["shareID"])  # grouped devices allow multiple allocations: each gets its own share
    node_terms = claim["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"]
    assert {"key": "metadata.name", "operator": "In", "values": [node.name]} in node_terms[0].get("matchFields", [])
    reserved = claim["status"]["reservedFor"]
    assert reserved == [{"resource": "pods", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}]


def node_for(
    path: Path, claims: list[dict[str, Any]], pod: Mapping[str, Any], classes_file: Path, tmp_path: Path
) -> tuple[Path, GroupBy]:
    """The first sysfs capture and device grouping (by NUMA node first) on which explain predicts every claim of the
    example fits and which has the CPUs the pod's containers request (the examples repeat the claim's CPUs in
    requests)."""
    wanted = sum(
        parse_quantity(c.get("resources", {}).get("requests", {}).get("cpu", "0")) for c in pod["spec"]["containers"]
    )
    candidates = [FIXTURES / n for n in sorted(p.name for p in FIXTURES.iterdir())]
    candidates.append(isolated_copy(tmp_path, "dual-socket-smt2"))
    for group_by, root in itertools.product(GroupBy, candidates):
        topology = read_topology(root)
        if len(topology.online_cpus) < wanted:
            continue
        config = DeviceConfig(node_name="probe", group_by=group_by)
        offline = build_slices(build_devices(topology, config), config)
        if all(explain(path, c["metadata"]["name"], classes_file, offline, tmp_path)["satisfiable"] for c in claims):
            return root, group_by
    raise AssertionError(f"{path.name}: no capture fits")


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_example_pods_get_the_allocation_explain_predicts(
    path: Path, make_node: NodeMaker, admin: Kube, classes_file: Path, namespace: str, tmp_path: Path
) -> None:
    docs = documents(path)
    claims = [d for d in docs if d["kind"] == "ResourceClaim"]
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    node = make_node(*node_for(path, claims, pod, classes_file, tmp_path))
    predicted = {
        c["metadata"]["name"]: explain(path, c["metadata"]["name"], classes_file, node.slices, tmp_path) for c in claims
    }
    for claim in claims:
        admin.create(claim, namespace)
    bound = run_pod(admin, namespace, pod, node.name)
    for claim in claims:
        name = claim["metadata"]["name"]
        stored = wait_allocated(admin, namespace, name)
        assert stored["spec"]["devices"]["requests"][0]["name"] == claim["spec"]["devices"]["requests"][0]["name"]
        check_allocation(stored, predicted[name], node, bound)
    admin.delete(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}", force=True)


def test_half_a_cpu_takes_one_under_the_request_policy(
    make_node: NodeMaker, admin: Kube, classes_file: Path, namespace: str, tmp_path: Path
) -> None:
    node = make_node(FIXTURES / "dual-socket-smt2")
    claim = cpu_claim("half", "500m")
    predicted = explain_claim(claim, classes_file, node, tmp_path)
    admin.create(claim, namespace)
    bound = run_pod(admin, namespace, busybox_pod("half", {"cpus": "half"}), node.name)
    stored = wait_allocated(admin, namespace, "half")
    check_allocation(stored, predicted, node, bound)
    # The scheduler rounded 500m up to the policy's step: one whole CPU, as explain says.
    assert results_by_request(stored)["cpus"]["consumedCapacity"] == {f"{DRIVER}/cpu": "1"}
    assert "requests 0.5, rounded up to 1" in json.dumps(predicted)


def test_a_claim_that_fits_no_device_leaves_the_pod_pending_with_the_reason(
    make_node: NodeMaker, admin: Kube, classes_file: Path, namespace: str, tmp_path: Path
) -> None:
    node = make_node(FIXTURES / "multi-l3-per-node")  # 16 CPUs per NUMA node
    claim = cpu_claim("too-big", "17")
    predicted = explain_claim(claim, classes_file, node, tmp_path)
    assert not predicted["satisfiable"]
    assert "above the requestPolicy (max 16)" in json.dumps(predicted)
    admin.create(claim, namespace)
    admin.create(pinned_pod(busybox_pod("too-big", {"cpus": "too-big"}), node.name), namespace)
    path = f"/api/v1/namespaces/{namespace}/pods/too-big"

    def unschedulable() -> dict[str, Any] | None:
        condition = pod_scheduled_condition(admin.get(path))
        return condition if condition and condition.get("reason") == "Unschedulable" else None

    condition = wait_until(unschedulable, "the scheduler to give up on the pod")
    assert condition["status"] == "False"
    # One node matches the pod's node selector, and the DRA plugin cannot allocate the claim there.
    assert "cannot allocate all claims" in condition["message"], condition["message"]
    assert admin.get(path)["spec"].get("nodeName") is None
    assert "allocation" not in admin.get(claim_path(namespace, "too-big")).get("status", {})


def test_twenty_cpus_over_two_numa_nodes_take_ten_of_each(make_node: NodeMaker, admin: Kube, namespace: str) -> None:
    node = make_node(FIXTURES / "multi-l3-per-node")  # 2 NUMA nodes of 16 CPUs
    docs = documents(EXAMPLES / "claim-cpu-capacity-20.yaml")
    [claim] = [d for d in docs if d["kind"] == "ResourceClaim"]
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    admin.create(claim, namespace)
    run_pod(admin, namespace, pod, node.name)
    results = results_by_request(wait_allocated(admin, namespace, claim["metadata"]["name"]))
    assert {name: (r["device"], r["consumedCapacity"]) for name, r in results.items()} == {
        "numa0-cpus": ("cpu-numa0", {f"{DRIVER}/cpu": "10"}),
        "numa1-cpus": ("cpu-numa1", {f"{DRIVER}/cpu": "10"}),
    }
    assert results["numa0-cpus"]["shareID"] != results["numa1-cpus"]["shareID"]


def test_a_claim_template_gets_a_claim_per_pod_released_with_the_pod(
    make_node: NodeMaker, admin: Kube, classes_file: Path, namespace: str
) -> None:
    node = make_node(FIXTURES / "snc-4numa")  # 4 NUMA nodes of 4 CPUs
    [example] = [d for d in documents(EXAMPLES / "claim-cpu-capacity-4.yaml") if d["kind"] == "ResourceClaim"]
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "four-cpus"},
        "spec": {"spec": example["spec"]},
    }
    admin.create(template, namespace)
    pods_path = f"/api/v1/namespaces/{namespace}/pods"

    def generated_claim(pod: str) -> str | None:
        statuses = admin.get(f"{pods_path}/{pod}").get("status", {}).get("resourceClaimStatuses", [])
        return next((s.get("resourceClaimName") for s in statuses if s["name"] == "cpus"), None)

    def allocated_device(pod: str) -> str:
        bound = run_pod(admin, namespace, busybox_pod(pod, {"cpus": "four-cpus"}, template=True), node.name)
        name = wait_until(lambda: generated_claim(pod), f"the claim of pod {pod}")
        claim = wait_allocated(admin, namespace, name)
        # Made by the resourceclaim controller for this pod, and owned by it.
        assert claim["metadata"]["annotations"]["resource.kubernetes.io/pod-claim-name"] == "cpus"
        assert [o["uid"] for o in claim["metadata"]["ownerReferences"]] == [bound["metadata"]["uid"]]
        assert defaulted_from(claim["spec"], example["spec"]), claim["spec"]
        [result] = claim["status"]["allocation"]["devices"]["results"]
        assert result["consumedCapacity"] == {f"{DRIVER}/cpu": "4"}
        device: str = result["device"]
        return device

    # Three pods fill the node: each claim takes a whole NUMA node's 4 CPUs; node 0 publishes 3 (CPU 0 stays shared).
    devices = [allocated_device(f"pod-{i}") for i in range(3)]
    assert sorted(devices) == [f"cpu-numa{i}" for i in range(1, 4)]
    first_claim = generated_claim("pod-0")
    assert first_claim
    admin.delete(f"{pods_path}/pod-0", force=True)
    wait_until(lambda: admin.find(claim_path(namespace, first_claim)) is None, "the first pod's claim to be deleted")
    # Its CPUs are free again, and only those: the next pod gets the first one's device.
    assert allocated_device("pod-3") == devices[0]
    for i in range(1, 4):
        admin.delete(f"{pods_path}/pod-{i}", force=True)


def test_cpus_and_a_gpu_on_the_same_pcie_root(
    make_node: NodeMaker,
    admin: Kube,
    classes_file: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    """hack/examples/claim-cpu-gpu-pcie-root.yaml with the real scheduler (DRAListTypeAttributes on): our slices of
    the expander capture with publishPcieRoots (cpu-numa0 lists pci0000:00 and pci0000:10, cpu-numa1 pci0000:00 and
    pci0000:20) beside the example GPU driver's slice (gpu-0 on pci0000:30, a node without CPUs; gpu-1 on
    pci0000:20). The scheduler passes over gpu-0, first in its slice, and gives the pod gpu-1 with CPUs of
    cpu-numa1, the allocation explain predicts."""
    node = make_node(FIXTURES / "pcie-expander-3numa", pcie_roots=True)
    name = node.name
    roots = {
        d["name"]: d["attributes"].get("resource.kubernetes.io/pcieRoot")
        for s in node.slices
        for d in s["spec"]["devices"]
    }
    assert roots["cpu-numa1"] == {"strings": ["pci0000:00", "pci0000:20"]}, "stored as sent: the gate is on"
    gpu_docs = documents(EXAMPLES / "pcie-root" / "gpu-example-com.yaml")
    gpu_class = [d for d in gpu_docs if d["kind"] == "DeviceClass"]
    [gpu_slice] = [d for d in gpu_docs if d["kind"] == "ResourceSlice"]
    gpu_slice = {
        **gpu_slice,
        "metadata": {"name": f"{name}-gpu.example.com"},
        "spec": {**gpu_slice["spec"], "nodeName": name, "pool": {**gpu_slice["spec"]["pool"], "name": name}},
    }
    ensure(admin, gpu_class)
    admin.create(gpu_slice)
    try:
        gpu_file = tmp_path / "gpu.yaml"
        gpu_file.write_text(yaml.safe_dump_all([*gpu_class]))
        both = tmp_path / "classes.yaml"
        both.write_text(classes_file.read_text() + "\n---\n" + gpu_file.read_text())
        predicted = explain(GPU_EXAMPLE, "claim-cpu-gpu-pcie-root", both, [*node.slices, gpu_slice], tmp_path)
        assert predicted["satisfiable"], predicted["reason"]
        assert [r["allocated"]["devices"] for r in predicted["requests"]] == [
            [f"{name}/cpu-numa1"],
            [f"{name}/gpu-1"],
        ]
        docs = documents(GPU_EXAMPLE)
        [claim] = [d for d in docs if d["kind"] == "ResourceClaim"]
        [pod] = [d for d in docs if d["kind"] == "Pod"]
        admin.create(claim, namespace)
        run_pod(admin, namespace, pod, name)
        stored = wait_allocated(admin, namespace, claim["metadata"]["name"])
        results = results_by_request(stored)
        assert {r: (v["driver"], v["pool"], v["device"]) for r, v in results.items()} == {
            "cpus": (DRIVER, name, "cpu-numa1"),
            "gpu": ("gpu.example.com", name, "gpu-1"),
        }
        assert results["cpus"]["consumedCapacity"] == {f"{DRIVER}/cpu": "2"}
        admin.delete(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}", force=True)
    finally:
        admin.delete(f"/apis/resource.k8s.io/v1/resourceslices/{gpu_slice['metadata']['name']}")
