"""The test API server (kube-apiserver): resource.k8s.io/v1 objects written through the typed client and read back."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.cluster.client import unparsed
from tests.harness.cluster.control_plane import ApiServer
from tests.harness.typed import as_dict, present

MERGE_PATCH = "application/merge-patch+json"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def cpu_device(name: str, numa_node: int) -> client.V1Device:
    return client.V1Device(
        name=name,
        allow_multiple_allocations=True,
        attributes={
            "resource.kubernetes.io/numaNode": client.V1DeviceAttribute(int=numa_node),
            "socket": client.V1DeviceAttribute(int=0),
            "smt": client.V1DeviceAttribute(bool=True),
            "model": client.V1DeviceAttribute(string="AMD EPYC"),
            "driverVersion": client.V1DeviceAttribute(version="0.1.0"),
        },
        capacity={
            "cpus": client.V1DeviceCapacity(
                value="8",
                request_policy=client.V1CapacityRequestPolicy(
                    default="1", valid_range=client.V1CapacityRequestPolicyRange(min="1", max="8", step="1")
                ),
            ),
            "memory": client.V1DeviceCapacity(value="16Gi"),
        },
    )


def resource_slice(name: str, node: str, driver: str, devices: list[client.V1Device]) -> client.V1ResourceSlice:
    return client.V1ResourceSlice(
        api_version="resource.k8s.io/v1",
        kind="ResourceSlice",
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ResourceSliceSpec(
            driver=driver,
            node_name=node,
            pool=client.V1ResourcePool(name=node, generation=1, resource_slice_count=1),
            devices=devices,
        ),
    )


def test_fixture_describes_the_server(apiserver: ApiServer, kube_api: client.ApiClient) -> None:
    assert apiserver.url.startswith("https://127.0.0.1:")
    assert apiserver.kubeconfig.is_file()
    assert (apiserver.state_dir / "kube-apiserver.log").is_file()
    assert client.VersionApi(kube_api).get_code().git_version.startswith("v1.")


def test_discovery_and_core_types_are_served(kube_api: client.ApiClient, kube_namespace: str) -> None:
    groups = {g.name: [v.version for v in g.versions] for g in client.ApisApi(kube_api).get_api_versions().groups}
    assert "v1" in groups["resource.k8s.io"]
    resources = {r.name for r in client.ResourceV1Api(kube_api).get_api_resources().resources}
    assert {"resourceslices", "resourceclaims", "resourceclaims/status", "deviceclasses"} <= resources
    # kube_namespace made a real Namespace.
    core = client.CoreV1Api(kube_api)
    assert present(core.read_namespace(kube_namespace).status).phase == "Active"


def test_resource_slice_round_trip_and_field_selectors(kube_api: client.ApiClient) -> None:
    api = client.ResourceV1Api(kube_api)
    driver = f"{unique('cpu')}.example.com"
    node, other_node = unique("node"), unique("node")
    name = unique("slice")
    api.create_resource_slice(resource_slice(name, node, driver, [cpu_device("numa0", 0), cpu_device("numa1", 1)]))
    api.create_resource_slice(resource_slice(unique("slice"), other_node, driver, [cpu_device("numa0", 0)]))

    stored = api.read_resource_slice(name)
    assert stored.spec.driver == driver
    assert stored.spec.node_name == node
    assert stored.spec.pool == client.V1ResourcePool(name=node, generation=1, resource_slice_count=1)
    devices = present(stored.spec.devices, "spec.devices")
    assert [d.name for d in devices] == ["numa0", "numa1"]
    numa1 = devices[1]
    assert numa1.allow_multiple_allocations is True
    attributes = present(numa1.attributes, "attributes")
    assert attributes["resource.kubernetes.io/numaNode"].int == 1
    assert attributes["smt"].bool is True
    assert attributes["model"].string == "AMD EPYC"
    assert attributes["driverVersion"].version == "0.1.0"
    capacity = present(numa1.capacity, "capacity")
    assert capacity["memory"].value == "16Gi"
    policy = present(capacity["cpus"].request_policy, "requestPolicy")
    valid_range = present(policy.valid_range, "requestPolicy.validRange")
    assert (policy.default, valid_range.min, valid_range.max, valid_range.step) == (
        "1",
        "1",
        "8",
        "1",
    )

    on_node = api.list_resource_slice(field_selector=f"spec.nodeName={node}")
    assert [present(s.metadata).name for s in on_node.items] == [name]
    of_driver = api.list_resource_slice(field_selector=f"spec.driver={driver}")
    assert sorted(present(s.spec.node_name) for s in of_driver.items) == sorted([node, other_node])

    # _preload_content=False: the typed client's result of a DELETE is not needed here.
    for stored_slice in of_driver.items:
        slice_name = present(present(stored_slice.metadata).name)
        assert unparsed(api.delete_resource_slice(slice_name, _preload_content=False)).status == 200
    assert api.list_resource_slice(field_selector=f"spec.driver={driver}").items == []


def test_unknown_fields_are_refused_and_list_attributes_follow_the_gate(
    kube_api: client.ApiClient, apiserver: ApiServer
) -> None:
    api = client.ResourceV1Api(kube_api)
    objects = client.CustomObjectsApi(kube_api)
    body = resource_slice(unique("slice"), unique("node"), "cpu.example.com", [client.V1Device(name="numa0")])
    raw = as_dict(kube_api.sanitize_for_serialization(body))  # type: ignore[no-untyped-call]
    raw["spec"]["devices"][0]["cpuList"] = "0-3"
    with pytest.raises(ApiException) as strict:
        objects.create_cluster_custom_object("resource.k8s.io", "v1", "resourceslices", raw, field_validation="Strict")
    assert strict.value.status == 400 and "cpuList" in str(strict.value.body)

    device = client.V1Device(name="numa0", attributes={"cpus": client.V1DeviceAttribute(ints=[0, 1])})
    stored = api.create_resource_slice(resource_slice(unique("slice"), unique("node"), "cpu.example.com", [device]))
    gate_on = apiserver.feature_gates.get("DRAListTypeAttributes", False)
    assert present(present(stored.spec.devices)[0].attributes)["cpus"].ints == ([0, 1] if gate_on else None)
    api.delete_resource_slice(present(present(stored.metadata).name), _preload_content=False)


def test_resource_claim_allocation_through_the_status_subresource(
    kube_api: client.ApiClient, kube_namespace: str
) -> None:
    api = client.ResourceV1Api(kube_api)
    name = unique("claim")
    request = client.V1DeviceRequest(name="cpus", exactly=client.V1ExactDeviceRequest(device_class_name="cpu"))
    claim = client.ResourceV1ResourceClaim(
        api_version="resource.k8s.io/v1",
        kind="ResourceClaim",
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ResourceClaimSpec(devices=client.V1DeviceClaim(requests=[request])),
    )
    created = api.create_namespaced_resource_claim(kube_namespace, claim)
    assert created.status is None or created.status.allocation is None

    share_id = str(uuid.uuid4())
    allocation = {
        "devices": {
            "results": [
                {
                    "request": "cpus",
                    "driver": "cpu.example.com",
                    "pool": "node-a",
                    "device": "numa0",
                    "shareID": share_id,
                    "consumedCapacity": {"cpus": "4"},
                }
            ],
            "config": [
                {
                    "source": "FromClass",
                    "requests": ["cpus"],
                    "opaque": {"driver": "cpu.example.com", "parameters": {"fullCores": True}},
                }
            ],
        },
        "allocationTimestamp": "2026-01-02T03:04:05Z",
    }
    # The main resource ignores status, as the scheduler's own writes go to the subresource.
    api.patch_namespaced_resource_claim(
        name, kube_namespace, {"status": {"allocation": allocation}}, _content_type=MERGE_PATCH
    )
    assert present(api.read_namespaced_resource_claim(name, kube_namespace).status).allocation is None

    api.patch_namespaced_resource_claim_status(
        name, kube_namespace, {"status": {"allocation": allocation}}, _content_type=MERGE_PATCH
    )
    stored = api.read_namespaced_resource_claim(name, kube_namespace)
    requests = present(present(present(stored.spec).devices).requests)
    assert present(requests[0].exactly).device_class_name == "cpu"
    stored_allocation = present(present(stored.status).allocation)
    allocated_devices = present(stored_allocation.devices)
    [result] = present(allocated_devices.results)
    assert (result.request, result.driver, result.pool, result.device) == ("cpus", "cpu.example.com", "node-a", "numa0")
    assert result.share_id == share_id
    assert result.consumed_capacity == {"cpus": "4"}
    assert present(present(allocated_devices.config)[0].opaque).parameters == {"fullCores": True}
    assert present(stored_allocation.allocation_timestamp).year == 2026

    listed = api.list_namespaced_resource_claim(kube_namespace)
    assert [present(c.metadata).name for c in listed.items] == [name]
    api.delete_namespaced_resource_claim(name, kube_namespace, _preload_content=False)


def test_device_class_round_trip(kube_api: client.ApiClient) -> None:
    api = client.ResourceV1Api(kube_api)
    name = unique("cpu")
    selector = 'device.driver == "cpu.example.com"'
    device_class = client.V1DeviceClass(
        api_version="resource.k8s.io/v1",
        kind="DeviceClass",
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeviceClassSpec(
            selectors=[client.V1DeviceSelector(cel=client.V1CELDeviceSelector(expression=selector))],
            config=[
                client.V1DeviceClassConfiguration(
                    opaque=client.V1OpaqueDeviceConfiguration(
                        driver="cpu.example.com", parameters={"kind": "CpuConfig", "exclusive": True}
                    )
                )
            ],
        ),
    )
    api.create_device_class(device_class)

    stored = api.read_device_class(name)
    spec = present(stored.spec)
    assert present(present(spec.selectors)[0].cel).expression == selector
    assert present(present(spec.config)[0].opaque).parameters == {"kind": "CpuConfig", "exclusive": True}
    assert name in [present(c.metadata).name for c in api.list_device_class().items]
    api.delete_device_class(name, _preload_content=False)
    with pytest.raises(ApiException) as gone:
        api.read_device_class(name)
    assert gone.value.status == 404
