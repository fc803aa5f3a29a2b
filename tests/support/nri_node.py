"""A driver with its NRI enforcer connected to a real containerd, for NRI tests and hack/bench/nri.py.

Prepares run in-process through the Driver with a claim folder (StandaloneAPI); containers get the claim's CDI
device through CRI the way kubelet passes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dra_cpu.core import cdi_spec
from dra_cpu.core.claims import ClaimRef, allocated_claim, allocation_result
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, build_devices
from dra_cpu.driver import Driver
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.node.sysfs import read_topology
from dra_cpu.nri.enforcer import NriConfig, NriEnforcer
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from tests.harness.poll import NotYet, wait_until
from tests.harness.runtimes.containerd import Containerd
from tests.harness.runtimes.cri import Container, CriClient, Pod

NODE = "node-nri"
ONLINE = CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())


@dataclass
class Node:
    """A driver with its NRI plugin, connected to a containerd."""

    containerd: Containerd
    driver: Driver
    claims_dir: Path
    plugin: NriEnforcer = field(init=False)  # set by new_plugin()

    @property
    def cri(self) -> CriClient:
        return self.containerd.cri

    def new_plugin(self, grace_seconds: float = 10.0) -> NriEnforcer:
        plugin = NriEnforcer(
            NriConfig(socket=self.containerd.nri_socket, backoff_max=0.3, grace_seconds=grace_seconds),
            self.driver.topology,
            self.driver.state,
        )
        self.driver.enforcer = plugin
        plugin.start()
        assert plugin.wait_ready(10), "the plugin never synchronized with containerd"
        self.plugin = plugin
        return plugin

    def claim(self, pod_uids: list[str], cpus: int = 1, hugepages_2mi: str = "") -> ClaimRef:
        """Write an allocated claim reserved for `pod_uids` (with `hugepages_2mi` bytes of 2 MiB pages from NUMA
        node 0, e.g. "4Mi") and prepare it."""
        ref = ClaimRef("default", f"claim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        results = [allocation_result("dra.cpu", NODE, "cpu-numa0", consumed={"dra.cpu/cpu": str(cpus)})]
        if hugepages_2mi:
            consumed = {"dra.cpu/memory": hugepages_2mi}
            results.append(allocation_result("dra.cpu", NODE, "hugepages-2mi-numa0", request="mem", consumed=consumed))
        obj = allocated_claim(ref.namespace, ref.name, results, uid=ref.uid, pod_uids=pod_uids)
        path = self.claims_dir / "resourceclaims" / ref.namespace / f"{ref.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj))
        prepared = self.driver.prepare([ref])[ref.uid]
        assert prepared.claim is not None, prepared.error
        return ref

    def cpus_of(self, ref: ClaimRef) -> CPUSet:
        return self.driver.state.claims[ref.uid].cpus

    def claimed_container(self, pod: Pod, ref: ClaimRef, name: str = "pinned") -> Container:
        return self.cri.create_container(pod, name, cdi_devices=[cdi_spec.device_id("dra.cpu", ref.uid)])

    def shared(self) -> CPUSet:
        return self.driver.state.shared_cpus(self.driver.topology)

    def assert_allowed(self, container: Container, cpus: CPUSet, mems: CPUSet | None = None) -> None:
        """Inside (a new process in the container) and on the host (its init process) agree on cpus (and mems)."""

        def check() -> bool | NotYet:
            inside, host = self.cri.allowed_inside(container), self.cri.allowed_on_host(container)
            if inside.cpus == host.cpus == cpus and (mems is None or inside.mems == host.mems == mems):
                return True
            return NotYet((inside, host))

        wait_until(check, f"{container.name} should run on {cpus}")


def nri_node(containerd: Containerd, tmp_path: Path, min_shared_cpus: int = 1) -> Iterator[Node]:
    if len(ONLINE) < 2:
        pytest.skip("needs at least 2 online CPUs: one to claim, one to share")
    topology = read_topology("/")
    config = DeviceConfig(node_name=NODE)
    driver = Driver(
        api=StandaloneAPI(tmp_path / "cluster"),
        config=config,
        topology=topology,
        devices=build_devices(topology, config),
        checkpoint=CheckpointFile(tmp_path / "checkpoint"),
        cdi_store=CDIStore(containerd.cdi_dir, config.driver_name),
        boot_id="test-boot",
        min_shared_cpus=min_shared_cpus,
    )
    (tmp_path / "checkpoint").mkdir(parents=True)
    driver.start()
    node = Node(containerd, driver, tmp_path / "cluster")
    node.new_plugin()
    yield node
    node.plugin.stop()
