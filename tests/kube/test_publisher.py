"""SlicePublisher against the test API server: every outcome is read back from the server by another client."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceConfig, DeviceMode, build_devices
from dra_cpu.kube.api import ClusterError
from dra_cpu.kube.apiserver import GROUP, SLICES, VERSION, KubeAPI, connect
from dra_cpu.kube.kubeconfig import from_kubeconfig
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.kube.rest import RestClient
from dra_cpu.node.sysfs import read_topology
from tests.harness.cluster.control_plane import APISERVER_ONLY, FEATURE_GATES, ApiServer
from tests.harness.cluster.fixtures import started_plane
from tests.harness.cluster.objects import create_node, delete_node, resource_slice
from tests.harness.paths import SYSFS
from tests.harness.poll import wait_until
from tests.harness.synthetic_sysfs import uniform_machine, write_tree
from tests.harness.typed import as_dict

FIXTURES = SYSFS
LOG = logging.getLogger("test.publisher")
# Generous: these tests check that republishing happens; hack/bench/publisher.py shows how fast.
DEADLINE_SECONDS = 10.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config() -> DeviceConfig:
    return DeviceConfig(node_name=unique("node"))


@dataclass(frozen=True)
class Reader:
    """Another client's view of the server, independent of the code under test."""

    api: client.CustomObjectsApi
    config: DeviceConfig

    def slices(self, node: str | None = None, driver: str | None = None) -> dict[str, dict[str, Any]]:
        selector = f"spec.nodeName={node or self.config.node_name},spec.driver={driver or self.config.driver_name}"
        items = as_dict(self.api.list_cluster_custom_object(GROUP, VERSION, SLICES, field_selector=selector))["items"]
        return {s["metadata"]["name"]: s for s in items}

    def devices(self) -> list[dict[str, Any]]:
        return [d for _, s in sorted(self.slices().items()) for d in s["spec"]["devices"]]

    def generations(self) -> set[int]:
        return {s["spec"]["pool"]["generation"] for s in self.slices().values()}

    def versions(self) -> dict[str, str]:
        return {name: s["metadata"]["resourceVersion"] for name, s in self.slices().items()}

    def delete(self, name: str) -> None:
        self.api.delete_cluster_custom_object(GROUP, VERSION, SLICES, name, _preload_content=False)

    def replace(self, obj: dict[str, Any]) -> None:
        self.api.replace_cluster_custom_object(GROUP, VERSION, SLICES, obj["metadata"]["name"], obj)

    def create(self, obj: dict[str, Any]) -> str:
        created = as_dict(self.api.create_cluster_custom_object(GROUP, VERSION, SLICES, obj))
        version: str = created["metadata"]["resourceVersion"]
        return version


@pytest.fixture
def reader(kube_api: client.ApiClient, config: DeviceConfig) -> Reader:
    return Reader(client.CustomObjectsApi(kube_api), config)


def devices_of(root: Path, config: DeviceConfig) -> tuple[Device, ...]:
    return build_devices(read_topology(root), config)


def machine(root: Path, cpus_per_node: int, nodes: int = 2) -> Path:
    """A synthetic sysfs tree without SMT: `cpus_per_node` * `nodes` CPUs."""
    return write_tree(
        root, *uniform_machine(sockets=1, nodes_per_socket=nodes, cores_per_node=cpus_per_node, threads=1)
    )


def individual(config: DeviceConfig, reserved: CPUSet | None = None) -> DeviceConfig:
    return DeviceConfig(
        node_name=config.node_name, device_mode=DeviceMode.INDIVIDUAL, reserved_cpus=reserved or CPUSet()
    )


def published(devices: tuple[Device, ...]) -> list[dict[str, Any]]:
    return [d.to_api() for d in devices]


@contextlib.contextmanager
def running(publisher: SlicePublisher) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=publisher.run, args=(stop,), name="publisher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the publisher did not stop"


def test_first_publish(kube: KubeAPI, config: DeviceConfig, reader: Reader) -> None:
    devices = devices_of(FIXTURES / "big-8numa", config)
    publisher = SlicePublisher(kube, config, LOG)
    publisher.set_devices(devices)
    assert publisher.sync_once() == 1
    [stored] = reader.slices().values()
    assert stored["metadata"]["name"] == f"{config.node_name}-dra.cpu-0"
    assert stored["spec"]["nodeName"] == config.node_name
    assert stored["spec"]["driver"] == "dra.cpu"
    assert stored["spec"]["pool"] == {"name": config.node_name, "generation": 1, "resourceSliceCount": 1}
    assert stored["spec"]["devices"] == published(devices)
    # What kube-apiserver accepted passes the 1.34 schema too: older servers take it as well.
    kubernetes_validate.validate(
        {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", **stored}, "1.34.0", strict=True
    )
    assert "ownerReferences" not in stored["metadata"]  # no Node of that name exists
    assert publisher.sync_once() == 0
    assert (publisher.writes, publisher.errors, publisher.dropped_field_warnings) == (1, 0, 0)


def test_a_restart_with_the_same_devices_writes_nothing(kube: KubeAPI, config: DeviceConfig, reader: Reader) -> None:
    devices = devices_of(FIXTURES / "dual-socket-smt2", config)
    first = SlicePublisher(kube, config, LOG)
    first.set_devices(devices)
    first.sync_once()
    before = reader.versions()

    restarted = SlicePublisher(kube, config, LOG)
    restarted.set_devices(devices_of(FIXTURES / "dual-socket-smt2", config))
    assert restarted.sync_once() == 0
    with running(restarted):
        time.sleep(1)  # the running loop's first reconciles (start, first watch list) must write nothing either
    assert restarted.writes == 0
    assert reader.versions() == before


def test_a_deleted_slice_is_republished(kube: KubeAPI, config: DeviceConfig, reader: Reader) -> None:
    devices = devices_of(FIXTURES / "dual-socket-smt2", config)
    publisher = SlicePublisher(kube, config, LOG)
    publisher.set_devices(devices)
    with running(publisher):
        wait_until(lambda: bool(reader.slices()), "the first publish", DEADLINE_SECONDS)
        [name] = reader.slices()
        reader.delete(name)
        wait_until(lambda: bool(reader.slices()), "the slice to come back", DEADLINE_SECONDS)
    [stored] = reader.slices().values()
    assert stored["spec"]["devices"] == published(devices)
    # Never back to a generation some cache may still hold.
    assert stored["spec"]["pool"]["generation"] == 2
    assert publisher.writes == 2


def test_an_edit_by_another_client_is_undone(
    kube: KubeAPI, config: DeviceConfig, reader: Reader, tmp_path: Path
) -> None:
    devices = devices_of(machine(tmp_path, cpus_per_node=80), individual(config))
    publisher = SlicePublisher(kube, config, LOG)
    publisher.set_devices(devices)
    with running(publisher):
        wait_until(lambda: len(reader.slices()) == 2, "two slices", DEADLINE_SECONDS)
        edited = reader.slices()[f"{config.node_name}-dra.cpu-1"]
        edited["spec"]["devices"][0]["attributes"]["dra.cpu/socketID"] = {"int": 7}
        reader.replace(edited)
        wait_until(lambda: reader.devices() == published(devices), "the edit to be undone", DEADLINE_SECONDS)
    # Both slices carry the new generation, the one nobody touched too.
    assert reader.generations() == {2}


def test_a_topology_change_bumps_the_generation_everywhere(
    kube: KubeAPI, config: DeviceConfig, reader: Reader, tmp_path: Path
) -> None:
    root = shutil.copytree(FIXTURES / "dual-socket-smt2", tmp_path / "sysfs")
    config = individual(config)
    publisher = SlicePublisher(kube, config, LOG)
    devices = devices_of(root, config)
    publisher.set_devices(devices)
    with running(publisher):
        wait_until(lambda: reader.devices() == published(devices), "the first publish", DEADLINE_SECONDS)
        # CPU 15 goes offline, as `echo 0 > /sys/devices/system/cpu/cpu15/online` would show it.
        (root / "sys/devices/system/cpu/online").write_text("0-14\n")
        changed = devices_of(root, config)
        publisher.set_devices(changed)
        wait_until(lambda: reader.devices() == published(changed), "the offline CPU to disappear", DEADLINE_SECONDS)
    assert "cpu-15" not in {d["name"] for d in reader.devices()}
    assert reader.generations() == {2}


def test_a_big_node_gets_several_slices_and_loses_them_when_it_shrinks(
    kube: KubeAPI, config: DeviceConfig, reader: Reader, tmp_path: Path
) -> None:
    root = machine(tmp_path, cpus_per_node=150)
    publisher = SlicePublisher(kube, config, LOG)
    devices = devices_of(root, individual(config))
    publisher.set_devices(devices)
    assert publisher.sync_once() == 3
    stored = reader.slices()
    # 301 devices: 299 CPUs (CPU 0 stays shared, minSharedCpus 1) and each NUMA node's memory.
    assert [len(s["spec"]["devices"]) for _, s in sorted(stored.items())] == [128, 128, 45]
    assert {json.dumps(s["spec"]["pool"], sort_keys=True) for s in stored.values()} == {
        json.dumps({"generation": 1, "name": config.node_name, "resourceSliceCount": 3}, sort_keys=True)
    }
    assert reader.devices() == published(devices)

    # 200 CPUs reserved for the system: 102 devices left, which fit one slice.
    smaller = devices_of(root, individual(config, reserved=CPUSet.of(range(200))))
    publisher.set_devices(smaller)
    assert publisher.sync_once() == 3  # one update, two deletes
    [kept] = reader.slices().values()
    assert kept["metadata"]["name"] == f"{config.node_name}-dra.cpu-0"
    assert kept["spec"]["pool"] == {"name": config.node_name, "generation": 2, "resourceSliceCount": 1}
    assert kept["spec"]["devices"] == published(smaller)


def test_slices_of_other_nodes_drivers_and_pools_are_never_touched(
    kube: KubeAPI, config: DeviceConfig, reader: Reader, tmp_path: Path
) -> None:
    node = config.node_name

    def foreign(name: str, node_name: str, driver: str, pool: str) -> dict[str, Any]:
        return resource_slice(name, node_name, driver, [{"name": "x"}], pool=pool, generation=9)

    other_node = unique("node")
    others = {
        (other_node, "dra.cpu"): foreign(f"{other_node}-dra.cpu-0", other_node, "dra.cpu", other_node),
        (node, "gpu.example.com"): foreign(unique("gpu"), node, "gpu.example.com", node),
        (node, "dra.cpu"): foreign(unique("other-pool"), node, "dra.cpu", f"{node}-extra"),
    }
    versions = {key: reader.create(obj) for key, obj in others.items()}
    root = machine(tmp_path, cpus_per_node=150)
    publisher = SlicePublisher(kube, config, LOG)
    publisher.set_devices(devices_of(root, individual(config)))
    publisher.sync_once()
    publisher.set_devices(devices_of(root, config))  # grouped: one slice, two of ours deleted
    publisher.sync_once()

    for (node_name, driver), obj in others.items():
        name = obj["metadata"]["name"]
        assert reader.slices(node_name, driver)[name]["metadata"]["resourceVersion"] == versions[node_name, driver]
    ours = {n for n, s in reader.slices().items() if s["spec"]["pool"]["name"] == node}
    assert ours == {f"{node}-dra.cpu-0"}


@dataclass(frozen=True)
class NodeBlindAPI(KubeAPI):
    """A client that may not read Nodes, as a driver whose RBAC lacks `get nodes`."""

    def get_node(self, name: str) -> dict[str, Any] | None:
        return None


def test_slices_are_owned_by_the_node_when_it_can_be_read(
    kube: KubeAPI, kube_api: client.ApiClient, config: DeviceConfig, reader: Reader
) -> None:
    node = create_node(kube_api, config.node_name, cpus=2, memory=4 << 30)
    uid = node["metadata"]["uid"]
    devices = devices_of(FIXTURES / "kvm-2cpu", config)
    publisher = SlicePublisher(kube, config, LOG)
    publisher.set_devices(devices)
    assert publisher.sync_once() == 1
    [stored] = reader.slices().values()
    owner = {"apiVersion": "v1", "kind": "Node", "name": config.node_name, "uid": uid, "controller": True}
    assert stored["metadata"]["ownerReferences"] == [owner]

    # A restart that cannot read the Node leaves the owner in place and writes nothing.
    blind = SlicePublisher(NodeBlindAPI(kube.rest), config, LOG)
    blind.set_devices(devices)
    assert blind.sync_once() == 0
    # A re-created Node has a new uid: the slices follow it (or are made anew, if the garbage collector was quicker).
    delete_node(kube_api, config.node_name)
    create_node(kube_api, config.node_name, cpus=2, memory=4 << 30)
    recreated = SlicePublisher(kube, config, LOG)
    recreated.set_devices(devices)
    assert recreated.sync_once() == 1
    [stored] = reader.slices().values()
    assert stored["metadata"]["ownerReferences"][0]["uid"] != uid
    delete_node(kube_api, config.node_name)


@dataclass(frozen=True)
class RacingAPI(KubeAPI):
    """Another client edits each slice between the publisher's read and its update."""

    reader: Reader | None = None
    raced: list[str] = field(default_factory=list)

    def update_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if self.reader is not None and name not in self.raced:
            self.raced.append(name)
            current = self.reader.slices()[name]
            current["spec"]["devices"] = []
            self.reader.replace(current)
        return super().update_slice(obj)


def test_a_conflict_is_resolved_by_reading_again(kube: KubeAPI, config: DeviceConfig, reader: Reader) -> None:
    first = SlicePublisher(kube, config, LOG)
    first.set_devices(devices_of(FIXTURES / "dual-socket-smt2", config))
    first.sync_once()
    racing = RacingAPI(kube.rest, reader=reader)
    publisher = SlicePublisher(racing, config, LOG)
    devices = devices_of(FIXTURES / "big-8numa", config)
    publisher.set_devices(devices)
    assert publisher.sync_once() == 1
    assert racing.raced == [f"{config.node_name}-dra.cpu-0"]
    assert reader.devices() == published(devices)
    # The other client left generation 1 in place; the write after the re-read bumped it.
    assert reader.generations() == {2}


@pytest.fixture(scope="module")
def gateless_apiserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A kube-apiserver of its own with the DRAConsumableCapacity, DRANodeAllocatableResources and
    DRAListTypeAttributes gates off, which drops those features' fields as any server with the gates off does (the
    shared server keeps them on)."""
    gates = {
        **FEATURE_GATES,
        "DRAConsumableCapacity": False,
        "DRANodeAllocatableResources": False,
        "DRAListTypeAttributes": False,
    }
    with started_plane(request, tmp_path_factory, APISERVER_ONLY, gates, name="gateless") as plane:
        yield plane.apiserver


def test_fields_the_server_drops_are_reported_once(
    gateless_apiserver: ApiServer, config: DeviceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    kube = connect(str(gateless_apiserver.kubeconfig))
    publisher = SlicePublisher(kube, config, LOG)
    devices = devices_of(FIXTURES / "dual-socket-smt2", config)
    publisher.set_devices(devices)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert publisher.sync_once() == 1
        # What the server kept is current: no rewrite (and no second warning) every time.
        assert publisher.sync_once() == 0
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.__dict__["droppedFields"] == ",".join(
        [
            "spec.devices[*].allowMultipleAllocations",
            "spec.devices[*].capacity[dra.cpu/cpu].requestPolicy",
            "spec.devices[*].capacity[dra.cpu/memory].requestPolicy",
        ]
    )
    assert "allowMultipleAllocations" in warning.getMessage()
    assert publisher.dropped_field_warnings == 1
    [stored] = kube.list_slices(config.driver_name, config.node_name)
    assert all("allowMultipleAllocations" not in d for d in stored["spec"]["devices"])
    assert [d["name"] for d in stored["spec"]["devices"]] == [d.name for d in devices]
    kube.close()


def test_node_allocatable_mappings_are_kept_by_a_server_with_the_gate(
    kube: KubeAPI, kube_api: client.ApiClient, config: DeviceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The shared server has DRANodeAllocatableResources on: the mappings are stored as sent. Its admission
    (NodeDeclaredFeatures) wants the slice's Node to declare the feature, as a kubelet with the gate on does; until
    it does, the write is refused with the server's reason, which the publisher reports."""
    mapped = replace(config, node_allocatable=True)
    publisher = SlicePublisher(kube, mapped, LOG)
    devices = devices_of(FIXTURES / "dual-socket-smt2", mapped)
    create_node(kube_api, mapped.node_name, cpus=16, memory=8 << 30)
    try:
        publisher.set_devices(devices)
        with pytest.raises(ClusterError, match="does not support DRANodeAllocatableResources feature"):
            publisher.sync_once()
        status = {"status": {"declaredFeatures": ["DRANodeAllocatableResources"]}}
        client.CoreV1Api(kube_api).patch_node_status(mapped.node_name, status)
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            assert publisher.sync_once() == 1
            assert publisher.sync_once() == 0
        assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
        [stored] = kube.list_slices(mapped.driver_name, mapped.node_name)
        sent = {d.name: d.to_api()["nodeAllocatableResources"] for d in devices}
        assert {d["name"]: d["nodeAllocatableResources"] for d in stored["spec"]["devices"]} == sent
        assert sent["cpu-numa0"]["cpu"] == {"mapping": {"capacityKey": "dra.cpu/cpu", "capacityMultiplier": "1"}}
    finally:
        delete_node(kube_api, mapped.node_name)


def test_node_allocatable_mappings_a_server_without_the_gate_drops_name_their_gate(
    gateless_apiserver: ApiServer, config: DeviceConfig, caplog: pytest.LogCaptureFixture
) -> None:
    kube = connect(str(gateless_apiserver.kubeconfig))
    mapped = replace(config, node_allocatable=True)
    publisher = SlicePublisher(kube, mapped, LOG)
    publisher.set_devices(devices_of(FIXTURES / "dual-socket-smt2", mapped))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert publisher.sync_once() == 1
        assert publisher.sync_once() == 0
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "spec.devices[*].nodeAllocatableResources" in warning.__dict__["droppedFields"].split(",")
    assert "DRANodeAllocatableResources" in warning.getMessage()
    [stored] = kube.list_slices(mapped.driver_name, mapped.node_name)
    assert all("nodeAllocatableResources" not in d for d in stored["spec"]["devices"])
    kube.close()


class Outage:
    """A TCP forwarder in front of the API server. While down it cuts every connection, old and new, as a server
    behind a load balancer that lost its backend; `refused` counts the connections it cut, so tests can wait for
    the client to have tried."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("https://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self.refused = 0
        self._serving = False
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def up(self) -> None:
        with self._lock:
            self._serving = True

    def down(self) -> None:
        with self._lock:
            self._serving = False
            for sock in self._sockets:
                # shutdown() wakes the threads blocked in recv(); close() alone would not.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def close(self) -> None:
        self.down()
        self._closed.set()
        self._thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                if not self._serving:
                    self.refused += 1
                    downstream.close()
                    continue
                upstream = socket.create_connection(self._target)
                self._sockets |= {downstream, upstream}
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other direction or down() closed the connection


def test_the_publisher_rides_out_an_unreachable_server(
    apiserver: ApiServer, config: DeviceConfig, reader: Reader, tmp_path: Path
) -> None:
    outage = Outage(apiserver.url)
    kubeconfig = yaml.safe_load(apiserver.kubeconfig.read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = outage.url
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    # Not connect(): that refuses to start against a server that does not answer.
    kube = KubeAPI(RestClient(from_kubeconfig(tmp_path / "kubeconfig")))
    publisher = SlicePublisher(kube, config, LOG, retry_seconds=(0.05, 0.5))
    devices = devices_of(FIXTURES / "xeon-16cpu", config)
    publisher.set_devices(devices)
    try:
        with running(publisher):
            wait_until(lambda: publisher.errors >= 3, "failed attempts", DEADLINE_SECONDS)
            assert reader.slices() == {}
            outage.up()
            wait_until(
                lambda: reader.devices() == published(devices), "the publish once the server answers", DEADLINE_SECONDS
            )

            outage.down()
            [name] = reader.slices()
            reader.delete(name)  # while the publisher cannot see it
            cut = outage.refused
            wait_until(lambda: outage.refused > cut, "the publisher to try while the server is away", DEADLINE_SECONDS)
            outage.up()
            wait_until(lambda: bool(reader.slices()), "the slice to come back after the outage", DEADLINE_SECONDS)
        assert reader.devices() == published(devices)
        assert reader.generations() == {2}
    finally:
        outage.close()
        kube.close()


def test_pcie_roots_without_the_list_gate_are_refused_with_the_servers_reason(
    gateless_apiserver: ApiServer, config: DeviceConfig
) -> None:
    """publishPcieRoots against a server without DRAListTypeAttributes: it drops the list value, and the attribute
    left without a value fails validation, so no slice is written (what docs/admin.md says)."""
    kube = connect(str(gateless_apiserver.kubeconfig))
    pcie = replace(config, node_name=f"{config.node_name}-pcie", pcie_roots=True)
    publisher = SlicePublisher(kube, pcie, LOG)
    topology = read_topology(FIXTURES / "pcie-expander-3numa", pcie_roots=True)
    publisher.set_devices(build_devices(topology, pcie))
    try:
        with pytest.raises(ClusterError, match=r"pcieRoot]: Invalid value: \"\": must specify one of: `int`"):
            publisher.sync_once()
        assert kube.list_slices(pcie.driver_name, pcie.node_name) == []
    finally:
        kube.close()
