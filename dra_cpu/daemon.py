"""`dra-cpu run`: wires discovery, the driver, the slice publisher, enforcement, the kubelet plugin and the HTTP
endpoints, in the order that keeps the node safe.

Start order: state first (checkpoint and CDI agree before anything is served), then slices, then enforcement,
and only when enforcement is connected and synchronized the kubelet registration: a kubelet that sees the plugin
may send prepares at once, and a prepared claim nobody enforces pins nothing.

Signals and the exit deadline are process.py's; re-discovery is rediscovery.py's; handing a claim over to the next
pod that reserved it is handover.py's, told by NRI enforcement which pods wait.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from dra_cpu import cdihook, observe
from dra_cpu.config import Config
from dra_cpu.core.capacity import check_settings, split_cpus
from dra_cpu.core.desired import pins
from dra_cpu.core.node_view import NodeView
from dra_cpu.driver import Driver
from dra_cpu.errors import DraCpuError
from dra_cpu.handover import Handover
from dra_cpu.kube.api import ClusterAPI
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.kubelet.plugin import KubeletPlugin
from dra_cpu.kubelet.registration import PluginPaths
from dra_cpu.node.sysfs import read_topology
from dra_cpu.nri.enforcer import NriConfig, NriCounters, NriEnforcer
from dra_cpu.process import Process
from dra_cpu.reconciler import Reconciler
from dra_cpu.rediscovery import Rediscovery
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from dra_cpu.store.fileio import boot_id
from dra_cpu.store.metadata_files import MetadataStore

LOG = logging.getLogger("dra_cpu.daemon")


def connect_cluster(config: Config) -> ClusterAPI:
    if config.standalone:
        return StandaloneAPI(Path(config.standalone))
    # Here, not at the top: a standalone daemon (the demo, development) never loads the API client.
    from dra_cpu.kube.apiserver import connect

    # With the node's name: the pods reserving a claim come from a watch of this node's pods (kube/pods.py).
    return connect(config.kubeconfig or None, node_name=config.node_name)


def writable_dir(key: str, path: Path) -> Path:
    """Create a host folder the daemon writes, or fail at start naming it: a missing or read-only mount would
    otherwise surface only at the first prepare, as a pod stuck in ContainerCreating."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DraCpuError(f"{key} {path}: cannot create: {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise DraCpuError(f"{key} {path}: not writable (a read-only mount?)")
    return path


@dataclass
class Daemon:
    config: Config
    stop: threading.Event = field(default_factory=threading.Event)
    registered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = observe.OperationMetrics(self.registry)
        self.plugin: KubeletPlugin | None = None
        self.nri: NriEnforcer | None = None
        self.handover: Handover | None = None
        # An error in a start-up thread, raised again by run() so that the command exits 2 naming it.
        self._fatal: DraCpuError | None = None
        self.process = Process(self.stop)

    def run(self) -> int:
        config = self.config
        self.process.install_signals()
        LOG.info("starting", extra={"config": config.as_dict()})
        if config.enforcement == "none":
            LOG.warning("enforcement is off: claims get CPUs on paper only (development mode)")
        hooks: tuple[dict[str, object], ...] = ()
        if config.enforcement == "cdi-hook":
            LOG.warning(cdihook.LIMITATION)
            # The runtime runs the hook on the host: this executable must exist there at the same path.
            hooks = (
                cdihook.hook(Path(sys.argv[0]).resolve(), cdi_dir=Path(config.cdi_root), driver=config.driver_name),
            )
        topology = read_topology(Path(config.sysfs_root), pcie_roots=config.publish_pcie_roots)
        check_settings(topology, config.device_config())
        view = NodeView.of(topology, config.node_settings(hooks))
        api = connect_cluster(config)
        state_dir = writable_dir("stateDir", Path(config.state_dir))
        cdi_root = writable_dir("cdiRoot", Path(config.cdi_root))
        paths = PluginPaths(Path(config.kubelet_root_dir), config.driver_name)
        reconciler = Reconciler(
            checkpoint=CheckpointFile(state_dir),
            cdi=CDIStore(cdi_root, config.driver_name),
            metadata=MetadataStore(paths.plugin_dir, cdi_root, config.driver_name),
            boot_id=boot_id(),
        )
        self.driver = Driver(api, view, reconciler, recorder=self.metrics)
        self.driver.start()
        self.nri = self._start_enforcement(config)
        self.publisher = SlicePublisher(api, view.settings.devices, LOG)
        self.publisher.set_devices(view.devices)
        self._spawn("publisher", self.publisher.run, self.stop)
        self.registry.register(observe.StateCollector(self._view))
        self.http = observe.serve(config.metrics_address, self.registry, self.not_ready)
        rediscovery = Rediscovery(
            Path(config.sysfs_root),
            config.publish_pcie_roots,
            config.hugepage_poll_seconds,
            self.driver,
            self.publisher,
        )
        self._spawn("topology", rediscovery.run, self.stop)
        self.plugin = KubeletPlugin(self.driver, paths, self.stop, self.registered)
        rediscovery.health = self.plugin.health
        if self.nri is None:
            self.plugin.start()
        else:
            # Fail closed: the kubelet sees the plugin only once enforcement is connected and synchronized.
            self._spawn("kubelet-plugin", self._register_when_enforced)
        if self.process.owned:
            # What start-up made (the kubernetes client's modules above all, some 100,000 objects) lives as long as
            # the process: out of the collector's sight, a full collection takes well under a millisecond instead of
            # stalling every thread, and the prepare in flight, for about 50 ms every few hundred prepares.
            gc.freeze()
        self.stop.wait()
        self.process.arm_exit_deadline()
        self.shutdown()
        self.process.exit_code = 0 if self._fatal is None else 2
        if self._fatal is not None:
            raise self._fatal
        return 0

    def _start_enforcement(self, config: Config) -> NriEnforcer | None:
        if config.enforcement != "nri":
            return None
        now = self.driver.snapshot()
        nri = NriEnforcer(
            NriConfig(socket=Path(config.nri_socket), plugin_index=config.nri_plugin_index),
            pins(now.ledger, now.view),
        )
        self.driver.enforce_with(nri)
        # Only NRI refuses a waiting pod's containers (and so tells which claims to hand over): the CDI hook runs
        # in the runtime's process, and leaves such a container unpinned instead.
        self.handover = Handover(self.driver, self.stop)
        nri.waiting = self.handover.waiting
        self.driver.api.on_pod_end(self.handover.holder_ended)
        self._spawn("handover", self.handover.run)
        nri.start()
        return nri

    def _register_when_enforced(self) -> None:
        if self.nri is not None:
            while not self.nri.wait_ready(timeout=10):
                if self.stop.is_set():
                    return
                LOG.warning(
                    "waiting for NRI before registering with the kubelet", extra={"socket": self.config.nri_socket}
                )
        if not self.stop.is_set():
            assert self.plugin is not None
            try:
                self.plugin.start()
            except DraCpuError as err:
                self._fatal = err
                self.stop.set()

    def _spawn(self, name: str, target: Callable[..., object], *args: object) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    def exit(self, code: int) -> None:
        """End the process with `code` once run() returned, when this daemon owns it (process.Process.exit)."""
        self.process.exit(code)

    def shutdown(self) -> None:
        LOG.info("shutting down")
        self.stop.set()
        if self.plugin is not None:
            self.plugin.stop()
        if self.nri is not None:
            self.nri.stop()
        if self.handover is not None:
            self.handover.close()
        self.http.shutdown()

    def not_ready(self) -> list[str]:
        reasons = []
        if self.nri is not None and not self.nri.ready.is_set():
            reasons.append("NRI not connected and synchronized")
        if not self.registered.is_set():
            reasons.append("not registered with the kubelet")
        if self.publisher.writes == 0 and self.publisher.errors:
            reasons.append("ResourceSlices not published")
        return reasons

    def _view(self) -> observe.View:
        now = self.driver.snapshot()
        ledger, topology = now.ledger, now.view.topology
        nri = self.nri.counters if self.nri is not None else NriCounters()
        split = split_cpus(topology, now.view.settings.devices)
        return observe.View(
            topology=topology,
            claims=tuple(ledger.claims.values()),
            allocatable=split.claimable,
            reserved=split.reserved,
            allocated=ledger.allocated_cpus,
            shared=split.floor.pool(topology, ledger.allocated_cpus),
            nri_connected=float(self.nri is not None and self.nri.ready.is_set()),
            memory=now.view.memory_capacity,
            memory_allocated=ledger.allocated_memory,
            counts=observe.Counts(
                claims_unrestorable=len(ledger.unrestorable),
                forged_env=nri.forged_env,
                nri_update_failures=nri.update_failures,
                shared_claim_refused=nri.shared_claim_refused,
                hugetlb_unenforced=nri.hugetlb_unenforced,
                slice_writes=self.publisher.writes,
                slice_publish_errors=self.publisher.errors,
                slice_dropped_field_warnings=self.publisher.dropped_field_warnings,
            ),
        )
