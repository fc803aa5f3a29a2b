"""`dra-cpu run`: wires discovery, the driver, the slice publisher, enforcement, the kubelet plugin and the HTTP
endpoints, in the order that keeps the node safe.

Start order: state first (checkpoint and CDI agree before anything is served), then slices, then enforcement,
and only when enforcement is connected and synchronized the kubelet registration: a kubelet that sees the plugin
may send prepares at once, and a prepared claim nobody enforces pins nothing.

Signals: SIGTERM or SIGINT starts one shutdown, on the main thread; another SIGTERM during it is only logged; a
third signal, or a SIGINT during the shutdown, ends the process at once (exit 128 + the signal's number). Once a
shutdown starts, the process is gone within SHUTDOWN_SECONDS whatever else hangs (a request to a dead API server,
a stuck disk): the checkpoint is built to survive an exit at any instant.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from dra_cpu import cdihook, observe
from dra_cpu.config import Config
from dra_cpu.core.capacity import check_settings, settings_problems, split_cpus
from dra_cpu.core.devices import Device, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.driver import Driver
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import ClusterAPI
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.kube.standalone import StandaloneAPI
from dra_cpu.kubelet.plugin import KubeletPlugin
from dra_cpu.kubelet.registration import PluginPaths
from dra_cpu.node.sysfs import read_topology
from dra_cpu.node.watch import topology_events
from dra_cpu.nri.enforcer import NriConfig, NriCounters, NriEnforcer
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import CheckpointFile
from dra_cpu.store.fileio import boot_id
from dra_cpu.store.metadata_files import MetadataStore

LOG = logging.getLogger("dra_cpu.daemon")

# From the first stop request to the end of the process, at most (the kubelet's grace period is 30 s by default).
SHUTDOWN_SECONDS = 10.0
# The signal that ends the process at once, counting the one that started the shutdown.
FORCE_EXIT_SIGNALS = 3
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def connect_cluster(config: Config) -> ClusterAPI:
    if config.standalone:
        return StandaloneAPI(Path(config.standalone))
    # The kubernetes client takes about a second to import; a standalone node never needs it.
    from dra_cpu.kube.apiserver import connect

    return connect(config.kubeconfig or None)


def _end_process(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _ignore_in_handler(signum: int, frame: object) -> None:
    """The Python-level handler of SIGTERM and SIGINT: nothing at all (see Daemon._install_signals)."""


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
        # An error in a start-up thread, raised again by run() so that the command exits 2 naming it.
        self._fatal: DraCpuError | None = None
        # Set when this daemon owns the process (runs on its main thread): only then may it end the process.
        self._owns_process = False
        self._exit_code = 1
        self._deadline_armed = threading.Lock()

    def run(self) -> int:
        config = self.config
        self._install_signals()
        LOG.info("starting", extra={"config": config.as_dict()})
        if config.enforcement == "none":
            LOG.warning("enforcement is off: claims get CPUs on paper only (development mode)")
        device_config = config.device_config()
        topology = read_topology(Path(config.sysfs_root), pcie_roots=config.publish_pcie_roots)
        check_settings(topology, device_config)
        devices = build_devices(topology, device_config)
        api = connect_cluster(config)
        state_dir = writable_dir("stateDir", Path(config.state_dir))
        cdi_root = writable_dir("cdiRoot", Path(config.cdi_root))
        hooks: tuple[dict[str, object], ...] = ()
        if config.enforcement == "cdi-hook":
            LOG.warning(cdihook.LIMITATION)
            # The runtime runs the hook on the host: this executable must exist there at the same path.
            hooks = (cdihook.hook(Path(sys.argv[0]).resolve(), cdi_dir=cdi_root, driver=config.driver_name),)
        self.driver = Driver(
            api=api,
            config=device_config,
            topology=topology,
            devices=devices,
            checkpoint=CheckpointFile(state_dir),
            cdi_store=CDIStore(cdi_root, config.driver_name),
            boot_id=boot_id(),
            recorder=self.metrics,
            cdi_hooks=hooks,
        )
        self.driver.start()
        self.nri = self._start_enforcement(config)
        self.publisher = SlicePublisher(api, device_config, LOG)
        self.publisher.set_devices(devices)
        self._spawn("publisher", self.publisher.run, self.stop)
        self.registry.register(observe.StateCollector(self._view))
        self.http = observe.serve(config.metrics_address, self.registry, self.not_ready)
        self._spawn("topology", self._watch_topology)
        paths = PluginPaths(Path(config.kubelet_root_dir), config.driver_name)
        self.plugin = KubeletPlugin(
            self.driver,
            paths,
            self.stop,
            self.registered,
            metadata=MetadataStore(paths.plugin_dir, cdi_root, config.driver_name, enabled=config.device_metadata),
        )
        if self.nri is None:
            self.plugin.start()
        else:
            # Fail closed: the kubelet sees the plugin only once enforcement is connected and synchronized.
            self._spawn("kubelet-plugin", self._register_when_enforced)
        if self._owns_process:
            # What start-up made (the kubernetes client's modules above all, some 100,000 objects) lives as long as
            # the process: out of the collector's sight, a full collection takes well under a millisecond instead of
            # stalling every thread, and the prepare in flight, for about 50 ms every few hundred prepares.
            gc.freeze()
        self.stop.wait()
        self._arm_exit_deadline()
        self.shutdown()
        self._exit_code = 0 if self._fatal is None else 2
        if self._fatal is not None:
            raise self._fatal
        return 0

    def _start_enforcement(self, config: Config) -> NriEnforcer | None:
        if config.enforcement != "nri":
            return None
        nri = NriEnforcer(
            NriConfig(
                socket=Path(config.nri_socket),
                plugin_index=config.nri_plugin_index,
                reserved_cpus=config.reserved_cpu_set,
                strict_reserved=config.strict_reserved,
            ),
            self.driver.topology,
            self.driver.state,
        )
        self.driver.enforcer = nri
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

    def _install_signals(self) -> None:
        """Re-entrancy safe: Python runs a signal handler on the main thread between any two bytecodes, also while
        that thread holds a lock (inside Event.set, a logging call, shutdown itself), so the handler must take none.
        It does nothing; the interpreter's C handler writes each signal's number to a pipe that a thread of ours
        reads, and everything else (logging, setting `stop`, counting, forcing the exit) happens on that thread."""
        if threading.current_thread() is not threading.main_thread():
            return  # the demo and tests run a daemon in a thread; the process and its signals are not ours
        self._owns_process = True
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, _ignore_in_handler)
        self._spawn("signals", self._read_signals, read_fd)

    def _read_signals(self, read_fd: int) -> None:
        received = 0
        while data := os.read(read_fd, 64):
            for number in data:
                if number not in SHUTDOWN_SIGNALS:
                    continue
                received += 1
                name = signal.Signals(number).name
                if received == 1:
                    LOG.info(f"{name} received: shutting down", extra={"boundSeconds": SHUTDOWN_SECONDS})
                    self.stop.set()
                    self._arm_exit_deadline()
                elif received >= FORCE_EXIT_SIGNALS or number == signal.SIGINT:
                    LOG.error(f"{name} during the shutdown: exiting at once", extra={"exitCode": 128 + number})
                    _end_process(128 + number)
                else:
                    LOG.warning(
                        f"{name} received again: already shutting down; one more, or SIGINT, exits at once",
                    )

    def _arm_exit_deadline(self) -> None:
        """However the shutdown goes, the process ends SHUTDOWN_SECONDS after it started: a worker thread blocked
        in a request (a dead API server) would otherwise hold the interpreter's exit, which joins them all."""
        if self._owns_process and self._deadline_armed.acquire(blocking=False):
            self._spawn("exit-deadline", self._exit_by_deadline)

    def _exit_by_deadline(self) -> None:
        threading.Event().wait(SHUTDOWN_SECONDS)
        busy = sorted({t.name for t in threading.enumerate() if t.is_alive() and not t.daemon} - {"MainThread"})
        LOG.error(
            "shutdown did not end in time: exiting now",
            extra={"boundSeconds": SHUTDOWN_SECONDS, "busyThreads": ",".join(busy), "exitCode": self._exit_code},
        )
        _end_process(self._exit_code)

    def exit(self, code: int) -> None:
        """End the process with `code` once run() returned, when this daemon owns it; otherwise return.

        Not through the interpreter's exit: that waits for every worker thread (one blocked on a dead API server
        holds it for as long as its request), and it puts the default signal actions back before the process is
        gone, so that a SIGTERM in that window kills it with a signal instead of the shutdown's exit code. A
        thread left behind holds nothing that must still be written: a prepare answers only after its checkpoint
        is on disk, and the checkpoint survives an exit at any instant."""
        if self._owns_process:
            _end_process(code)

    def shutdown(self) -> None:
        LOG.info("shutting down")
        self.stop.set()
        if self.plugin is not None:
            self.plugin.stop()
        if self.nri is not None:
            self.nri.stop()
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
        driver = self.driver
        state, topology = driver.state, driver.topology
        nri = self.nri.counters if self.nri is not None else NriCounters()
        split = split_cpus(topology, driver.config)
        return observe.View(
            topology=topology,
            claims=tuple(state.claims.values()),
            allocatable=split.claimable,
            reserved=split.reserved,
            allocated=state.allocated_cpus,
            shared=split.floor.pool(topology, state.allocated_cpus),
            nri_connected=float(self.nri is not None and self.nri.ready.is_set()),
            counters=(
                (
                    "dra_cpu_claims_unrestorable",
                    "claims prepared before a restart that this node can no longer honour (the log names each)",
                    float(len(state.unrestorable)),
                ),
                (
                    "dra_cpu_forged_env",
                    "containers whose claim env was not theirs",
                    float(nri.forged_env),
                ),
                (
                    "dra_cpu_nri_update_failures",
                    "failed NRI container updates",
                    float(nri.update_failures),
                ),
                (
                    "dra_cpu_shared_claim_refused",
                    "containers refused for using a claim prepared for another pod",
                    float(nri.shared_claim_refused),
                ),
                (
                    "dra_cpu_hugetlb_unenforced",
                    "hugepage claims' containers whose cgroup hugetlb limits could not be set",
                    float(nri.hugetlb_unenforced),
                ),
                ("dra_cpu_slice_writes", "ResourceSlice writes", float(self.publisher.writes)),
                ("dra_cpu_slice_publish_errors", "failed ResourceSlice writes", float(self.publisher.errors)),
                (
                    "dra_cpu_slice_dropped_field_warnings",
                    "slices the API server stored without some of our fields",
                    float(self.publisher.dropped_field_warnings),
                ),
            ),
        )

    def _watch_topology(self) -> None:
        """Re-discover on cpu/node/memory uevents, and every hugepagePollSeconds (hugepage reservations send no
        uevent, and a pod without hostNetwork receives none at all)."""
        try:
            events = topology_events(timeout=self.config.hugepage_poll_seconds)
        except OSError as err:
            LOG.warning("no uevents (%s): polling sysfs only", err.strerror)
            events = None
        while not self.stop.is_set():
            if events is not None:
                next(events)
            elif self.stop.wait(self.config.hugepage_poll_seconds):
                return
            self.refresh()

    def refresh(self) -> None:
        health = self.plugin.health if self.plugin is not None else None
        try:
            topology = read_topology(Path(self.config.sysfs_root), pcie_roots=self.config.publish_pcie_roots)
            if topology == self.driver.topology:
                if health is not None:
                    health.discovery_ok()
                return
            devices = build_devices(topology, self.driver.config)
        except DraCpuError as err:
            LOG.error("re-discovery failed; keeping the previous topology", extra={"reason": str(err)})
            if health is not None:
                # The devices may or may not still be there: the kubelet is told so (Unknown), not "healthy".
                health.discovery_failed(str(err))
            return
        for problem in settings_problems(topology, self.driver.config):
            LOG.error("the settings contradict the node as re-discovered", extra={"reason": problem})
        self._set(topology, devices)
        if health is not None:
            health.discovery_ok()

    def _set(self, topology: Topology, devices: tuple[Device, ...]) -> None:
        LOG.info("topology changed", extra={"online": str(topology.online_cpus), "devices": len(devices)})
        self.driver.set_topology(topology, devices)
        if self.nri is not None:
            self.nri.set_topology(topology)
        self.publisher.set_devices(devices)
        if self.plugin is not None:
            self.plugin.health.notify()
