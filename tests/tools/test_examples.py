"""hack/examples/*.yaml: what app developers copy. Each file holds ResourceClaims and a Pod using them; they must
pass the Kubernetes schemas, be accepted by a real API server, and be satisfiable on at least one real topology by
the chart's DeviceClasses (checked with `dra-cpu explain`'s allocator model and the driver's own CPU picker), with
the driver settings the example is written for (NODE_SETTINGS). Pods repeat their claims' amounts in their requests
exactly when the driver publishes no node-allocatable mapping.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.claims import ClaimRef, CPUConfig, parse_cpu_config
from dra_cpu.core.devices import DeviceConfig, GroupBy, build_devices, build_slices, device_index
from dra_cpu.core.quantity import parse_quantity
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.explain.model import DeviceClass
from dra_cpu.tools.explain.parse import parse_claim, parse_class, parse_slices
from dra_cpu.tools.explain.result import Explanation
from dra_cpu.tools.explain.search import explain
from tests.harness.cluster.helm import Helm
from tests.harness.cluster.objects import defaulted_from
from tests.harness.paths import EXAMPLES, FIXTURES, SYSFS_FIXTURES
from tests.harness.typed import as_dict

FILES = sorted(EXAMPLES.glob("*.yaml"))
DRIVER = "dra.cpu"
# The driver settings an example is written for, when not the defaults: any one of them must satisfy it.
NODE_SETTINGS: dict[str, list[dict[str, Any]]] = {
    "claim-cpu-distribute-numa": [{"group_by": GroupBy.SOCKET}, {"group_by": GroupBy.MACHINE}],
    "claim-node-allocatable": [{"node_allocatable": True}],
    "claim-cpu-gpu-pcie-root": [{"pcie_roots": True}],
}
# Another driver's DeviceClasses and ResourceSlices (on node "n") an example pairs our devices with.
EXTRA_DRIVERS: dict[str, Path] = {"claim-cpu-gpu-pcie-root": EXAMPLES / "pcie-root" / "gpu-example-com.yaml"}


def settings_of(path: Path) -> list[DeviceConfig]:
    return [DeviceConfig(node_name="n", **kwargs) for kwargs in NODE_SETTINGS.get(path.stem, [{}])]


def documents(path: Path) -> list[dict[str, Any]]:
    return [as_dict(doc, path.name) for doc in yaml.safe_load_all(path.read_text()) if doc]


def claims_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in documents(path) if d["kind"] == "ResourceClaim"]


def test_the_examples_exist() -> None:
    assert {f.stem for f in FILES} >= {
        "claim-cpu-capacity-4",
        "claim-cpu-capacity-10",
        "claim-cpu-capacity-20",
        "claim-cpu-numa-pinned",
        "claim-cpu-hugepages-2mi",
        "claim-cpu-memory-hugepages",
        "claim-isolated-cpus",
        "claim-whole-cores",
        "claim-node-allocatable",
        "claim-cpu-distribute-numa",
    }
    assert set(NODE_SETTINGS) <= {f.stem for f in FILES}


@pytest.mark.parametrize("stem", sorted(EXTRA_DRIVERS))
def test_other_drivers_objects_validate(stem: str) -> None:
    docs = documents(EXTRA_DRIVERS[stem])
    assert {d["kind"] for d in docs} == {"DeviceClass", "ResourceSlice"}
    for version in ("1.34.0", "1.37.0"):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_schema_and_pod_uses_the_claims(path: Path) -> None:
    docs = documents(path)
    for version in ("1.34.0", "1.37.0"):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    claims = {c["metadata"]["name"] for c in claims_of(path)}
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert claims and pods
    for pod in pods:
        refs = {r["name"]: r["resourceClaimName"] for r in pod["spec"]["resourceClaims"]}
        assert set(refs.values()) <= claims
        used = {c["name"] for ctr in pod["spec"]["containers"] for c in ctr["resources"].get("claims", [])}
        assert used == set(refs), f"{path.name}: containers use {used}, the pod declares {set(refs)}"
    assert claims == {ref for pod in pods for ref in (r["resourceClaimName"] for r in pod["spec"]["resourceClaims"])}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_claims_are_accepted_by_the_api_server(
    path: Path, kube_api: kubernetes.client.ApiClient, kube_namespace: str
) -> None:
    objects = kubernetes.client.CustomObjectsApi(kube_api)
    for claim in claims_of(path):
        created = as_dict(
            objects.create_namespaced_custom_object(
                "resource.k8s.io", "v1", kube_namespace, "resourceclaims", claim, field_validation="Strict"
            )
        )
        stored = as_dict(
            objects.get_namespaced_custom_object(
                "resource.k8s.io", "v1", kube_namespace, "resourceclaims", claim["metadata"]["name"]
            )
        )
        assert stored["metadata"]["uid"] == created["metadata"]["uid"]
        # Stored as written, plus the defaults the server fills in (allocationMode, count).
        assert defaulted_from(stored["spec"], claim["spec"]), stored["spec"]


def _isolated_copy(root: Path, name: str) -> Path:
    """A fixture with its last two cores of NUMA node 0 isolated, as `isolcpus=` makes the kernel report them."""
    tree = root / name
    shutil.copytree(FIXTURES / "sysfs" / name, tree, symlinks=True)
    topology = read_topology(tree)
    cores = topology.cores(topology.numa_nodes[0].cpus)
    isolated = sorted(cpu for core in cores[-2:] for cpu in core)
    (tree / "sys/devices/system/cpu/isolated").write_text(",".join(map(str, isolated)) + "\n")
    return tree


@pytest.fixture(scope="module")
def topologies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Topology]:
    """Every real-kernel capture, plus one with isolated CPUs (no capture has isolcpus set)."""
    trees = {name: FIXTURES / "sysfs" / name for name in SYSFS_FIXTURES}
    trees["dual-socket-smt2+isolcpus"] = _isolated_copy(tmp_path_factory.mktemp("isolated"), "dual-socket-smt2")
    return {name: read_topology(tree, pcie_roots=True) for name, tree in trees.items()}


@pytest.fixture(scope="module")
def classes(helm: Helm) -> dict[str, DeviceClass]:
    """The DeviceClasses the chart installs with its default values."""
    rendered = [o for o in helm.template() if o["kind"] == "DeviceClass"]
    return {c.name: c for c in (parse_class(o, "chart") for o in rendered)}


def _policies(claim: dict[str, Any]) -> Iterator[tuple[str, AllocationPolicy]]:
    """The driver's reading of the claim's opaque config, per request (what it applies at prepare time)."""
    for entry in claim["spec"]["devices"].get("config", []):
        opaque = entry["opaque"]
        if opaque["driver"] == DRIVER:
            ref = ClaimRef("default", claim["metadata"]["name"], "uid")
            config = parse_cpu_config(opaque["parameters"], "config.opaque.parameters", CPUConfig(), ref)
            for request in entry["requests"]:
                yield request, config.policy


def _preparable(claim: dict[str, Any], topology: Topology, explanation: Explanation, config: DeviceConfig) -> bool:
    """Whether the driver can pick the CPUs for the devices the scheduler model chose, under the claim's config."""
    devices = device_index(build_devices(topology, config))
    policies = dict(_policies(claim))
    requests = {r["name"]: r["exactly"] for r in claim["spec"]["devices"]["requests"]}
    for result in explanation.requests:
        name = result.request.name
        wanted = requests[name].get("capacity", {}).get("requests", {}).get(f"{DRIVER}/cpu")
        if wanted is None:
            continue
        (label,) = result.devices
        device = devices[label.rsplit("/", 1)[-1]]
        count = parse_quantity(wanted)
        assert count.denominator == 1
        try:
            choose_cpus(topology, device.cpus, int(count), policies.get(name, AllocationPolicy()), device.cpus)
        except AllocationError:
            return False
    return True


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_claims_fit_a_real_topology(
    path: Path, topologies: dict[str, Topology], classes: dict[str, DeviceClass]
) -> None:
    for claim in claims_of(path):
        assert _fits(claim, path, topologies, classes, settings_of(path)), (
            f"{path.name}: {claim['metadata']['name']} fits none of {sorted(topologies)}"
        )


def _fits(
    claim: dict[str, Any],
    path: Path,
    topologies: dict[str, Topology],
    classes: dict[str, DeviceClass],
    configs: list[DeviceConfig],
) -> list[str]:
    """The topologies (with the setting) on which the scheduler model allocates the claim and the driver prepares it."""
    model = parse_claim(claim, path.name)
    extra = documents(EXTRA_DRIVERS[path.stem]) if path.stem in EXTRA_DRIVERS else []
    classes = {**classes, **{c.name: c for c in (parse_class(o, "extra") for o in extra if o["kind"] == "DeviceClass")}}
    fits = []
    for config in configs:
        others = [_on_node(o, config.node_name) for o in extra if o["kind"] == "ResourceSlice"]
        for name, topology in topologies.items():
            slices = build_slices(build_devices(topology, config), config) + others
            explanation = explain(model, classes, parse_slices(slices, name), {})
            if explanation.satisfiable and _preparable(claim, topology, explanation, config):
                fits.append(f"{name} {config.group_by}")
    return fits


def _on_node(obj: dict[str, Any], node: str) -> dict[str, Any]:
    """Another driver's slice moved to `node` (its pool named after it), as that driver would publish it there."""
    spec = {**obj["spec"], "nodeName": node, "pool": {**obj["spec"]["pool"], "name": node}}
    return {**obj, "spec": spec}


def _claimed(pod: dict[str, Any], claims: dict[str, dict[str, Any]]) -> dict[str, Fraction]:
    """What the claims a container uses ask for, as node resources: cpu, memory and hugepages-<size>."""
    pages = {"dra.hugepages-2mi": "hugepages-2Mi", "dra.hugepages-1gi": "hugepages-1Gi", f"{DRIVER}.memory": "memory"}
    refs = {r["name"]: r["resourceClaimName"] for r in pod["spec"]["resourceClaims"]}
    totals: dict[str, Fraction] = {}
    for container in pod["spec"]["containers"]:
        for use in container["resources"].get("claims", []):
            for request in claims[refs[use["name"]]]["spec"]["devices"]["requests"]:
                exact = request["exactly"]
                if exact["deviceClassName"] not in (DRIVER, f"{DRIVER}.isolated", *pages):
                    continue  # another driver's device (a GPU) is no node resource of ours
                asked = exact.get("capacity", {}).get("requests", {})
                resource = pages.get(exact["deviceClassName"], "cpu")
                amount = asked.get(f"{DRIVER}/memory" if resource != "cpu" else f"{DRIVER}/cpu", exact.get("count", 1))
                totals[resource] = totals.get(resource, Fraction(0)) + parse_quantity(str(amount))
    return totals


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_pods_repeat_their_claims_exactly_when_nothing_is_mapped(path: Path) -> None:
    """Unmapped: requests and limits carry the claims' CPUs, pages and memory (the scheduler and kubelet see nothing
    else; a strict claim's memory is the container's limit). Mapped (KEP-5517): they carry none of them (they would
    count twice). Memory a pod asks for without claiming any is its own business."""
    mapped = any(c.node_allocatable for c in settings_of(path))
    claims = {c["metadata"]["name"]: c for c in claims_of(path)}
    for pod in (d for d in documents(path) if d["kind"] == "Pod"):
        claimed = _claimed(pod, claims)
        for field in ("requests", "limits"):
            given: dict[str, Fraction] = {}
            for container in pod["spec"]["containers"]:
                for resource, value in container["resources"].get(field, {}).items():
                    if resource == "cpu" or resource.startswith("hugepages-") or resource in claimed:
                        given[resource] = given.get(resource, Fraction(0)) + parse_quantity(str(value))
            assert given == ({} if mapped else claimed), f"{path.name}: {pod['metadata']['name']} {field}"


@pytest.mark.parametrize("group_by", [GroupBy.SOCKET, GroupBy.MACHINE])
def test_claims_written_for_upstream_work_in_every_grouping(
    group_by: GroupBy, topologies: dict[str, Topology], classes: dict[str, DeviceClass]
) -> None:
    """Claims that ask only `dra.cpu/cpu` of class dra.cpu fit socket and machine devices as they fit NUMA devices;
    a selector on the standard NUMA attribute fits a socket that is one NUMA node and nothing that spans several."""
    config = DeviceConfig(node_name="n", group_by=group_by)
    for stem in ("claim-cpu-capacity-4", "claim-cpu-capacity-10", "claim-whole-cores"):
        path = EXAMPLES / f"{stem}.yaml"
        (claim,) = claims_of(path)
        assert "big-8numa" in " ".join(_fits(claim, path, topologies, classes, [config])), stem
    pinned_path = EXAMPLES / "claim-cpu-numa-pinned.yaml"
    (pinned,) = claims_of(pinned_path)
    # Sockets that are NUMA node 1 and nothing else: the second socket of cxl-memoryless, dual-socket-smt2 and
    # pcie-expander-3numa.
    one_node = [
        "cxl-memoryless socket",
        "dual-socket-smt2 socket",
        "dual-socket-smt2+isolcpus socket",
        "pcie-expander-3numa socket",
    ]
    fits = _fits(pinned, pinned_path, topologies, classes, [config])
    assert sorted(fits) == (one_node if group_by is GroupBy.SOCKET else [])
    slices = build_slices(build_devices(topologies["big-8numa"], config), config)
    explanation = explain(parse_claim(pinned, "pinned"), classes, parse_slices(slices, "big"), {})
    assert not explanation.satisfiable
    assert "attribute resource.kubernetes.io/numaNode is missing" in explanation.reason


def test_the_check_can_fail(topologies: dict[str, Topology], classes: dict[str, DeviceClass]) -> None:
    """The same checks reject what no topology has: more CPUs than any NUMA node, hugepages of the wrong size, more
    memory than a NUMA node has."""
    too_big = claims_of(EXAMPLES / "claim-cpu-capacity-4.yaml")[0]
    too_big["spec"]["devices"]["requests"][0]["exactly"]["capacity"]["requests"][f"{DRIVER}/cpu"] = "1000"
    gigantic = claims_of(EXAMPLES / "claim-cpu-hugepages-2mi.yaml")[0]
    gigantic["spec"]["devices"]["requests"][1]["exactly"]["deviceClassName"] = "dra.hugepages-1gi"
    hungry = claims_of(EXAMPLES / "claim-cpu-memory-hugepages.yaml")[0]
    hungry["spec"]["devices"]["requests"][1]["exactly"]["capacity"]["requests"][f"{DRIVER}/memory"] = "1Ti"
    for claim in (too_big, gigantic, hungry):
        model = parse_claim(claim, "test")
        for name, topology in topologies.items():
            config = DeviceConfig(node_name="n")
            slices = build_slices(build_devices(topology, config), config)
            assert not explain(model, classes, parse_slices(slices, name), {}).satisfiable
    # The driver's own picker refuses an odd whole-core count on SMT-2 nodes.
    whole = claims_of(EXAMPLES / "claim-whole-cores.yaml")[0]
    ((_, policy),) = _policies(whole)
    smt = topologies["dual-socket-smt2"]
    with pytest.raises(AllocationError, match="wholeCores"):
        choose_cpus(smt, smt.numa_nodes[0].cpus, 3, policy)
