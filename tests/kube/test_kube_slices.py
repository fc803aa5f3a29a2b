"""Our ResourceSlices against the real kube-apiserver: every topology's slices pass its validation whole, and the
chart's RBAC and ValidatingAdmissionPolicy give the driver's service account exactly what the daemon calls and no
other node's slices. Everything is read back from the server."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dra_cpu.core.devices import DeviceConfig, DeviceMode, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.kube.apiserver import connect
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.node.sysfs import read_topology
from tests.harness.cluster.client import Kube, close_api_client, new_api_client
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import CHART, Helm
from tests.harness.cluster.objects import (
    DRIVER_ACCESS_KINDS,
    create_node,
    delete_node,
    ensure,
    new_namespace,
    pinned_pod,
    resource_slice,
)
from tests.harness.cluster.pods import wait_scheduled
from tests.harness.paths import SYSFS
from tests.harness.poll import wait_until
from tests.harness.synthetic_sysfs import ONE_STEP_CASES, one_step_machine

LOG = logging.getLogger("test.kube.slices")
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
FIXTURES = SYSFS


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def slices_of(kube: Kube, node: str, driver: str = "dra.cpu") -> list[dict[str, Any]]:
    found = kube.list(SLICES, field_selector=f"spec.nodeName={node},spec.driver={driver}")
    return sorted(found, key=lambda s: str(s["metadata"]["name"]))


@pytest.mark.parametrize("mode", [DeviceMode.GROUPED, DeviceMode.INDIVIDUAL])
def test_every_topology_is_published_whole(
    control_plane: ControlPlane, admin: Kube, sysfs_fixture: Path, mode: DeviceMode
) -> None:
    device_config = DeviceConfig(node_name=unique("node"), device_mode=mode)
    assert_published_whole(control_plane, admin, device_config, read_topology(sysfs_fixture))


@pytest.mark.parametrize("case", sorted(ONE_STEP_CASES))
def test_devices_of_one_step_are_published(control_plane: ControlPlane, admin: Kube, tmp_path: Path, case: str) -> None:
    """A lone isolated CPU, an isolated core with whole cores, a pool of one 1 GiB page: the server refuses a step
    that does not fit above the minimum, and with it the node's whole slice (the test guest's isolcpus found it)."""
    isolated, whole_cores = ONE_STEP_CASES[case]
    device_config = DeviceConfig(node_name=unique("node"), whole_cores=whole_cores)
    assert_published_whole(control_plane, admin, device_config, read_topology(one_step_machine(tmp_path, isolated)))


def assert_published_whole(
    control_plane: ControlPlane, admin: Kube, device_config: DeviceConfig, topology: Topology
) -> None:
    """The devices of `topology` published once by the daemon's publisher, and read back unchanged."""
    devices = build_devices(topology, device_config)
    kube = connect(str(control_plane.kubeconfig))
    try:
        publisher = SlicePublisher(kube, device_config, LOG)
        publisher.set_devices(devices)
        written = publisher.sync_once()
        assert (publisher.errors, publisher.dropped_field_warnings) == (0, 0)
    finally:
        close_api_client(kube.api_client)
    stored = slices_of(admin, device_config.node_name)
    try:
        assert written == len(stored) >= 1
        # Nothing dropped or defaulted away: the devices read back are the devices sent, in order.
        assert [d for s in stored for d in s["spec"]["devices"]] == [d.to_api() for d in devices]
        for s in stored:
            assert s["spec"]["pool"] == {
                "name": device_config.node_name,
                "generation": 1,
                "resourceSliceCount": len(stored),
            }
            assert len(s["spec"]["devices"]) <= 128  # the API's limit per slice
    finally:
        for s in stored:
            admin.delete(f"{SLICES}/{s['metadata']['name']}")


# ----------------------------------------------------------------------------------------------------------------
# The chart's identity for the driver.


@dataclass(frozen=True)
class Driver:
    namespace: str
    service_account: str
    node: str  # where the driver's pod runs
    kubeconfig: Path  # the pod-bound service-account token of the driver's pod

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def slice_for(node: str, name: str | None = None) -> dict[str, Any]:
    return resource_slice(name or unique(node), node, "dra.cpu", [{"name": "cpu-numa0"}])


@pytest.fixture(scope="module")
def driver(control_plane: ControlPlane, helm: Helm) -> Iterator[Driver]:
    """The chart's ServiceAccount, RBAC and ValidatingAdmissionPolicy applied (release and namespace of their own),
    a pod of that service account scheduled onto a node, and a token bound to that pod, as the kubelet mounts it."""
    api = control_plane.admin()
    kube = Kube(api)
    namespace, release, node = new_namespace(kube, "driver"), unique("dra-cpu"), unique("node")
    rendered = helm.run("template", release, str(CHART), "--namespace", namespace)
    assert rendered.returncode == 0, rendered.stderr
    objs = [o for o in yaml.safe_load_all(rendered.stdout) if o and o["kind"] in DRIVER_ACCESS_KINDS]
    assert {o["kind"] for o in objs} == DRIVER_ACCESS_KINDS
    ensure(kube, objs, namespace)
    [account] = [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]
    create_node(api, node, cpus=4, memory=8 << 30)
    pod = pinned_pod(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "driver", "namespace": namespace},
            "spec": {"serviceAccountName": account, "containers": [{"name": "driver", "image": "dra-cpu:test"}]},
        },
        node,
    )
    kube.create(pod)
    bound = wait_scheduled(kube, namespace, "driver")
    token_request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "driver", "uid": bound["metadata"]["uid"]},
        },
    }
    token = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", token_request)
    found = Driver(namespace, account, node, control_plane.kubeconfig_for_token(token["status"]["token"], release))

    # The policy takes effect some time after it is created: until a write for another node is refused (denied as
    # Invalid, 422, since the policy's validations give no `reason`).
    as_driver = client_for(found)
    try:

        def refused() -> bool:
            try:
                created = Kube(as_driver).create(slice_for("elsewhere"))
            except client.ApiException as err:
                return bool(err.status == 422)
            kube.delete(f"{SLICES}/{created['metadata']['name']}")
            return False

        wait_until(refused, "the ValidatingAdmissionPolicy to refuse writes for other nodes")
    finally:
        close_api_client(as_driver)
    try:
        yield found
    finally:
        kube.delete(f"/api/v1/namespaces/{namespace}/pods/driver", force=True)
        delete_node(api, node)
        close_api_client(api)


def client_for(found: Driver) -> client.ApiClient:
    return new_api_client(found.kubeconfig)


def test_the_driver_keeps_its_own_node_slices_with_its_service_account(driver: Driver, admin: Kube) -> None:
    kube = connect(str(driver.kubeconfig))  # lists slices once: refused without `list resourceslices`
    device_config = DeviceConfig(node_name=driver.node)
    devices = build_devices(read_topology(FIXTURES / "dual-socket-smt2"), device_config)
    publisher = SlicePublisher(kube, device_config, LOG)
    publisher.set_devices(devices)
    stop = threading.Event()
    thread = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        [first] = wait_until(lambda: slices_of(admin, driver.node) or None, "the first publish")
        # get nodes: the slice is owned by the Node.
        node_uid = admin.get(f"/api/v1/nodes/{driver.node}")["metadata"]["uid"]
        assert [o["uid"] for o in first["metadata"]["ownerReferences"]] == [node_uid]
        assert first["spec"]["devices"] == [d.to_api() for d in devices]
        # list + watch: a slice deleted by someone else comes back (create), an edit is undone (update).
        admin.delete(f"{SLICES}/{first['metadata']['name']}")
        wait_until(lambda: slices_of(admin, driver.node) or None, "the slice to come back")
        [back] = slices_of(admin, driver.node)
        edited = admin.patch(f"{SLICES}/{back['metadata']['name']}", {"spec": {"devices": [{"name": "x"}]}})
        wait_until(
            lambda: (
                slices_of(admin, driver.node)[0]["metadata"]["resourceVersion"] != edited["metadata"]["resourceVersion"]
            ),
            "the edit to be undone",
        )
        assert slices_of(admin, driver.node)[0]["spec"]["devices"] == [d.to_api() for d in devices]
    finally:
        stop.set()
        thread.join(timeout=10)
        close_api_client(kube.api_client)
    assert publisher.errors == 0
    # delete: what the publisher does with slices it no longer wants (a node that shrank to fewer slices).
    kube = connect(str(driver.kubeconfig))
    try:
        [left] = slices_of(admin, driver.node)
        kube.delete_slice(left["metadata"]["name"])
    finally:
        close_api_client(kube.api_client)
    assert slices_of(admin, driver.node) == []


def test_slices_of_other_nodes_are_refused_by_the_policy(driver: Driver, admin: Kube) -> None:
    api = client_for(driver)
    as_driver = Kube(api)
    other = unique("node")
    theirs = admin.create(slice_for(other))
    name = theirs["metadata"]["name"]
    try:
        attempts: dict[str, Any] = {
            "create": lambda: as_driver.create(slice_for(other)),
            "update": lambda: as_driver.request("PUT", f"{SLICES}/{name}", {**theirs, "spec": {**theirs["spec"]}}),
            "delete": lambda: as_driver.request("DELETE", f"{SLICES}/{name}"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(client.ApiException) as refused:
                attempt()
            assert refused.value.status == 422, what
            assert f"the dra.cpu driver on node '{driver.node}' may not modify ResourceSlices of node '{other}'" in str(
                refused.value.body
            ), what
        # Nothing changed: the other node's slice is as the admin wrote it.
        assert admin.get(f"{SLICES}/{name}")["metadata"]["resourceVersion"] == theirs["metadata"]["resourceVersion"]
        # Its own node's slices it may write.
        mine = as_driver.create(slice_for(driver.node))
        as_driver.delete(f"{SLICES}/{mine['metadata']['name']}")
    finally:
        admin.delete(f"{SLICES}/{name}")
        close_api_client(api)


# What dra_cpu.kube.apiserver.KubeAPI calls, and so the daemon: get_node, list_slices/watch_slices, create_slice,
# update_slice, delete_slice, get_claim, get_pod.
DAEMON_CALLS = {
    ("get", "nodes"),
    ("list", "resourceslices.resource.k8s.io"),
    ("watch", "resourceslices.resource.k8s.io"),
    ("create", "resourceslices.resource.k8s.io"),
    ("update", "resourceslices.resource.k8s.io"),
    ("delete", "resourceslices.resource.k8s.io"),
    ("get", "resourceclaims.resource.k8s.io"),
    ("get", "pods"),
}
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RESOURCES = (
    "nodes",
    "resourceslices.resource.k8s.io",
    "resourceclaims.resource.k8s.io",
    "resourceclaimtemplates.resource.k8s.io",
    "deviceclasses.resource.k8s.io",
    "pods",
    "secrets",
    "configmaps",
    "serviceaccounts",
)


def test_the_service_account_may_do_exactly_what_the_daemon_calls(control_plane: ControlPlane, driver: Driver) -> None:
    allowed = set()
    for verb in VERBS:
        for resource in RESOURCES:
            answer = control_plane.kubectl("auth", "can-i", verb, resource, f"--as={driver.username}", "-A")
            assert answer.returncode in (0, 1), answer.stderr
            assert answer.stdout.strip() == ("yes" if answer.returncode == 0 else "no"), answer.stdout
            if answer.returncode == 0:
                allowed.add((verb, resource))
    assert allowed == DAEMON_CALLS
    # The status of a claim is the scheduler's and the kubelet's to write, not the driver's.
    status = control_plane.kubectl(
        "auth", "can-i", "update", "resourceclaims.resource.k8s.io", "--subresource=status", f"--as={driver.username}"
    )
    assert status.stdout.strip() == "no"
