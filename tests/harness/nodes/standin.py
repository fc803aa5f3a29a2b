"""The kubelet stand-in node, for prepare tests: the real Driver in the test's process behind the real kubelet
sockets (registration, DRA, health), a standalone folder for the cluster (or the API server), and the test playing the
kubelet through dra_cpu.kubelet.client. Claims are written the way the scheduler leaves them (tests/harness/claims.py).
The node's machine is one of the sysfs captures of tests/fixtures/sysfs; a node starts in well under a second.

    nodes = StandinNodes()
    node = nodes.start("dual-socket-smt2")
    cpus = node.cpus_of(node.claim([result("cpu-numa0", cpus=2)]))
    nodes.stop()
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dra_cpu.core.claims import ClaimRef, allocated_claim_object
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, DeviceMode
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.driver import Driver
from dra_cpu.kube.api import ClusterAPI
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.kubelet.client import KubeletClient
from dra_cpu.kubelet.plugin import KubeletPlugin
from dra_cpu.kubelet.registration import PluginPaths
from dra_cpu.node.sysfs import read_topology
from dra_cpu.reconciler import Reconciler
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from dra_cpu.store.metadata_files import MetadataStore
from tests.harness.claims import DRIVER, NODE, ClaimStore, FolderClaims
from tests.harness.paths import SYSFS


@dataclass
class StandinNode:
    root: Path
    driver: Driver
    plugin: KubeletPlugin
    kubelet: KubeletClient
    claims: ClaimStore
    namespace: str = "default"
    pod_uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    fixture: str = ""
    # The name of the pod claims are reserved for (status.reservedFor); such a pod exists only where a test made it.
    pod_name: str = "pod-0"

    def rediscover(self, edit: Callable[[Path], None]) -> None:
        """Change this node's sysfs (a copy of its fixture) with `edit`, then re-discover as the daemon does on a
        uevent: the driver gets the new topology and devices, and health streams are told."""
        sysfs = self.root / "sysfs"
        if not sysfs.exists():
            shutil.copytree(SYSFS / self.fixture, sysfs)
        edit(sysfs)
        topology = read_topology(sysfs)
        self.driver.set_topology(topology)
        self.plugin.health.notify()

    def claim(
        self,
        results: list[dict[str, Any]],
        config: list[dict[str, Any]] | None = None,
        name: str | None = None,
        uid: str | None = None,
        status: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> ClaimRef:
        ref = ClaimRef(self.namespace, name or f"claim-{uuid.uuid4().hex[:8]}", uid or str(uuid.uuid4()))
        obj = allocated_claim_object(
            ref.namespace, ref.name, results, uid=ref.uid, pod_uids=[self.pod_uid], config=config or []
        )
        obj["status"]["reservedFor"][0]["name"] = self.pod_name
        if status is not None:
            obj["status"] = status
        if annotations:
            obj["metadata"]["annotations"] = annotations
        self.claims.put(obj)
        # The API server assigns the uid: the claim as stored is what the kubelet would name.
        return ClaimRef(ref.namespace, ref.name, str(obj["metadata"]["uid"]))

    def prepare(self, ref: ClaimRef, service: str | None = None) -> Any:
        return self.kubelet.prepare([ref], service=service).claims[ref.uid]

    def cpus_of(self, ref: ClaimRef) -> CPUSet:
        response = self.prepare(ref)
        assert not response.error, response.error
        cpus = self.env(ref.uid)[f"DRA_CPUSET_{ref.uid}"]
        assert isinstance(cpus, CPUSet)
        return cpus

    def env(self, uid: str) -> dict[str, Any]:
        """The environment the claim's CDI spec gives containers: DRA_CPUSET_* and DRA_MEMS_* as CPUSets, the
        rest as strings."""
        spec = json.loads(self.driver.reconciler.cdi.path(uid).read_text())
        env = dict(e.split("=", 1) for e in spec["devices"][0]["containerEdits"]["env"])
        return {k: CPUSet.parse(v) if k.startswith(("DRA_CPUSET_", "DRA_MEMS_")) else v for k, v in env.items()}


def make_driver(
    root: Path,
    fixture: str,
    mode: DeviceMode = DeviceMode.GROUPED,
    api: ClusterAPI | None = None,
    metadata: bool = True,
    **config: Any,
) -> Driver:
    """A driver rooted at `root`, device metadata on (the default) or off."""
    device_config = DeviceConfig(node_name=NODE, driver_name=DRIVER, device_mode=mode, **config)
    view = NodeView.of(read_topology(SYSFS / fixture), NodeSettings(device_config, device_metadata=metadata))
    plugin_dir = PluginPaths(root / "kubelet", DRIVER).plugin_dir
    files = Reconciler(
        CheckpointFile(root / "state"),
        CDIStore(root / "cdi", DRIVER),
        MetadataStore(plugin_dir, root / "cdi", DRIVER),
        boot_id="boot-1",
    )
    return Driver(api or StandaloneAPI(root / "cluster"), view, files)


def write_claim(root: Path, uid: str, results: list[dict[str, Any]]) -> ClaimRef:
    """A claim named after its uid, in namespace default, with an allocation of `results` and nothing more, in the
    standalone folder of the driver make_driver(root, ...) made."""
    FolderClaims(root / "cluster/resourceclaims").put(
        {
            "metadata": {"name": uid, "namespace": "default", "uid": uid},
            "status": {"allocation": {"devices": {"results": results}}},
        }
    )
    return ClaimRef("default", uid, uid)


def start_plugin(driver: Driver, root: Path) -> KubeletPlugin:
    """The kubelet plugin of a node rooted at `root`, started."""
    paths = PluginPaths(root / "kubelet", DRIVER)
    plugin = KubeletPlugin(driver, paths, threading.Event(), threading.Event())
    plugin.start()
    return plugin


class NodeFactory(Protocol):
    """`StandinNodes.start`: a node on a sysfs fixture (the `node_factory` fixture; the test's teardown stops it)."""

    def __call__(
        self,
        fixture: str = ...,
        mode: DeviceMode = ...,
        api: ClusterAPI | None = ...,
        claims: ClaimStore | None = ...,
        namespace: str = ...,
        **config: Any,
    ) -> StandinNode: ...


@dataclass
class StandinNodes:
    """Stand-in nodes under one folder, stopped together."""

    # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp")))
    started: list[StandinNode] = field(default_factory=list)

    def start(
        self,
        fixture: str = "dual-socket-smt2",
        mode: DeviceMode = DeviceMode.GROUPED,
        api: ClusterAPI | None = None,
        claims: ClaimStore | None = None,
        namespace: str = "default",
        **config: Any,
    ) -> StandinNode:
        root = self.base / f"n{len(self.started)}"
        (root / "state").mkdir(parents=True)
        driver = make_driver(root, fixture, mode, api, **config)
        driver.start()
        plugin = start_plugin(driver, root)
        kubelet = KubeletClient.register(plugin.paths.registration_socket)
        claims = claims or FolderClaims(root / "cluster/resourceclaims")
        node = StandinNode(root, driver, plugin, kubelet, claims, namespace, fixture=fixture)
        self.started.append(node)
        return node

    def stop(self) -> None:
        for node in self.started:
            node.kubelet.close()
            node.plugin.stop()
        self.started.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def offline_cpus(cpus: CPUSet) -> Callable[[Path], None]:
    """A sysfs edit: the CPUs go offline as the kernel shows it (cpuN/online 0, cpu/online and cpu/offline, and out
    of their node's cpulist)."""

    def edit(sysfs: Path) -> None:
        base = sysfs / "sys/devices/system/cpu"
        online = CPUSet.parse((base / "online").read_text().strip())
        offline = CPUSet.parse((base / "offline").read_text().strip()) if (base / "offline").exists() else CPUSet()
        (base / "online").write_text(f"{online - cpus}\n")
        (base / "offline").write_text(f"{offline | cpus}\n")
        for cpu in cpus:
            (base / f"cpu{cpu}/online").write_text("0\n")
        for cpulist in (sysfs / "sys/devices/system/node").glob("node*/cpulist"):
            cpulist.write_text(f"{CPUSet.parse(cpulist.read_text().strip()) - cpus}\n")

    return edit


def remove_memory(node: int) -> Callable[[Path], None]:
    """A sysfs edit: all of the NUMA node's memory is hot-removed (MemTotal 0)."""

    def edit(sysfs: Path) -> None:
        meminfo = sysfs / f"sys/devices/system/node/node{node}/meminfo"
        meminfo.write_text(f"Node {node} MemTotal:       0 kB\nNode {node} MemFree:        0 kB\n")

    return edit
