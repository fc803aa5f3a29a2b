"""The NRI node: the driver in the test's process with its NRI enforcer connected to a real containerd on this
machine, and no kubelet: prepares run in-process through the Driver with a claim folder (StandaloneAPI), and
containers get the claim's CDI device through CRI the way the kubelet passes it. For the NRI tests and
hack/bench/nri.py; the machine's own CPUs are the node's (it needs two online).

    with Containerd(newest_2x()) as daemon, NriNode(daemon, work_dir) as node:
        ref = node.claim([pod.uid])
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dra_cpu.core import cdi_spec
from dra_cpu.core.claims import ClaimRef, allocated_claim_object, allocation_result
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.desired import pins
from dra_cpu.core.devices import DeviceConfig
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.driver import Driver
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.node.sysfs import read_topology
from dra_cpu.nri.enforcer import NriConfig, NriEnforcer
from dra_cpu.reconciler import Reconciler
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from dra_cpu.store.metadata_files import MetadataStore
from tests.harness.claims import FolderClaims
from tests.harness.component import Component, Unavailable
from tests.harness.poll import NotYet, wait_until
from tests.harness.runtimes.containerd import Containerd
from tests.harness.runtimes.cri import Container, CriClient, Pod
from tests.harness.typed import present

NODE = "node-nri"
ONLINE = CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())


@dataclass
class NriNode(Component):
    """A driver with its NRI plugin, connected to `containerd`; its state and claim folder in `dir`."""

    containerd: Containerd
    dir: Path
    min_shared_cpus: int = 1
    driver: Driver = field(init=False)
    """On this machine's topology, its claims in a folder below `dir`, its CDI specs where containerd reads them."""
    _plugin: NriEnforcer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        settings = NodeSettings(DeviceConfig(node_name=NODE, min_shared_cpus=self.min_shared_cpus))
        files = Reconciler(
            CheckpointFile(self.dir / "checkpoint"),
            CDIStore(self.containerd.cdi_dir, settings.driver_name),
            MetadataStore(self.dir / "plugin", self.containerd.cdi_dir, settings.driver_name),
            boot_id="test-boot",
        )
        self.driver = Driver(StandaloneAPI(self.dir / "cluster"), NodeView.of(read_topology("/"), settings), files)

    @property
    def plugin(self) -> NriEnforcer:
        return present(self._plugin, "the NRI node's plugin (not started)")

    @property
    def cri(self) -> CriClient:
        return self.containerd.cri

    def start(self) -> None:
        if len(ONLINE) < 2:
            raise Unavailable("needs at least 2 online CPUs: one to claim, one to share")
        (self.dir / "checkpoint").mkdir(parents=True)
        self.driver.start()
        self.new_plugin()

    def stop(self) -> None:
        if self._plugin is not None:
            self._plugin.stop()
            self._plugin = None

    def new_plugin(self, grace_seconds: float = 10.0) -> NriEnforcer:
        """A new NRI plugin in the driver's place (the old one stopped by the caller), connected and synchronized."""
        now = self.driver.snapshot()
        plugin = NriEnforcer(
            NriConfig(socket=self.containerd.nri_socket, backoff_max=0.3, grace_seconds=grace_seconds),
            pins(now.ledger, now.view),
        )
        self.driver.enforce_with(plugin)
        plugin.start()
        assert plugin.wait_ready(10), "the plugin never synchronized with containerd"
        self._plugin = plugin
        return plugin

    def claim(self, pod_uids: list[str], cpus: int = 1, hugepages_2mi: str = "", memory: str = "") -> ClaimRef:
        """Write an allocated claim reserved for `pod_uids` (with `hugepages_2mi` bytes of 2 MiB pages and `memory`
        bytes of memory from NUMA node 0, e.g. "4Mi") and prepare it."""
        ref = ClaimRef("default", f"claim-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        results = [allocation_result("dra.cpu", NODE, "cpu-numa0", consumed={"dra.cpu/cpu": str(cpus)})]
        for device, request, amount in (
            ("hugepages-2mi-numa0", "mem", hugepages_2mi),
            ("memory-numa0", "memory", memory),
        ):
            if amount:
                consumed = {"dra.cpu/memory": amount}
                results.append(allocation_result("dra.cpu", NODE, device, request=request, consumed=consumed))
        FolderClaims(self.dir / "cluster" / "resourceclaims").put(
            allocated_claim_object(ref.namespace, ref.name, results, uid=ref.uid, pod_uids=pod_uids)
        )
        prepared = self.driver.prepare([ref])[ref.uid]
        assert prepared.claim is not None, prepared.error
        return ref

    def cpus_of(self, ref: ClaimRef) -> CPUSet:
        return self.driver.snapshot().ledger.claims[ref.uid].cpus

    def claimed_container(self, pod: Pod, ref: ClaimRef, name: str = "pinned") -> Container:
        return self.cri.create_container(pod, name, cdi_devices=[cdi_spec.device_id("dra.cpu", ref.uid)])

    def shared(self) -> CPUSet:
        now = self.driver.snapshot()
        return pins(now.ledger, now.view).shared

    def assert_allowed(self, container: Container, cpus: CPUSet, mems: CPUSet | None = None) -> None:
        """Inside (a new process in the container) and on the host (its init process) agree on cpus (and mems)."""

        def check() -> bool | NotYet:
            inside, host = self.cri.allowed_inside(container), self.cri.allowed_on_host(container)
            if inside.cpus == host.cpus == cpus and (mems is None or inside.mems == host.mems == mems):
                return True
            return NotYet((inside, host))

        wait_until(check, f"{container.name} should run on {cpus}")
