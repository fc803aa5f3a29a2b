"""The guest kubelet node: the multi-NUMA guest (tests/harness/guest) joined to the control plane as a second node with
a real kubelet: kube-scheduler allocates claims across the guest's NUMA nodes, the kubelet prepares them with dra-cpu
installed by the chart (tests/harness/cluster/chart.py), on a kernel that has them.

    with (
        ControlPlane(state_dir) as plane,
        GuestKubeletNode(plane) as node,
        DriverImage() as image,
        InstalledDriver(node, Helm.installed(), image.archive),
    ):
        node.kube.create(pod, namespace)

It boots a guest of its own, in the topology of `spec`. How the node is put together:
- Networking. The guest has a NIC on qemu's user-mode network with restrict=on: it reaches the kube-apiserver's port
  and nothing else, at the name `kubernetes` (GUEST_HOST in its /etc/hosts; a name the server's certificate
  carries). The kubelet serves on `port` in the guest, and qemu forwards the same port of the host's loopback
  address `name` (127.0.0.2) to it: the node is named by that address, as the real node is by 127.0.0.1, since a
  kubelet takes a loopback address as its node's address only as its name (it refuses it as --node-ip). So the API
  server reaches this kubelet at the node's address, as in any cluster: `kubectl exec`, `logs` and `port-forward`
  work, and nothing else reaches into the guest.
- Pods get a network of their own: a CNI bridge in the guest (the guest image has the bridge and veth modules and
  Debian's CNI plugins), without gateway or masquerade, as on the real node.
- The kubelet is hack/testenv/kubernetes.sh's, run from a read-only 9p share of its folder, with the real node's
  configuration (cgroupfs driver below containerd's cgroup parent, here on pure cgroup v2; cpuManagerPolicy none;
  the control plane's DRA gates) and credentials (a client certificate of system:node:<name> from the plane's PKI,
  which is shared read-only too). It sets the kernel's sysctls itself: the guest is throwaway.
- containerd 2.1 with NRI and CDI (hack/testenv/containerd.sh, in the guest), its folders, the kubelet's and the
  driver's laid out below `dir` as on the real node (NodeFolders), so that one set of chart values fits both.
- The driver is the chart's DaemonSet pod, its image imported into the guest's containerd from a host folder shared
  read-only (`import_image`), reaching the API server at `kubernetes` with the host network (`chart_values`).

On these 2-core machines the guest boots in 15 to 40 s and the kubelet takes a minute or more to get Ready under
TCG; START_SECONDS bounds each stage, and a failure carries the guest kubelet's and containerd's log tails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.pki import kubeconfig_text
from tests.harness.component import Unavailable
from tests.harness.driver_files import checkpoint_records
from tests.harness.guest.vm import GUEST_HOST, SPEC, Guest, GuestError, GuestSpec, boot, require_built
from tests.harness.nodes.guest_standin import VERSIONS, GuestStandinNode
from tests.harness.nodes.kubelet import (
    API_NAME,
    KubeletNode,
    NodeError,
    bridge_network,
    kubelet_argv,
    kubelet_configuration,
    kubelet_gates,
)
from tests.harness.processes import free_port
from tests.harness.runtimes.cri import Allowed
from tests.harness.typed import present

NODE_NAME = "127.0.0.2"
"""The node's name and address: the host's loopback address at which qemu forwards the kubelet's port."""
POD_SUBNET = "10.88.0.0/24"
"""The pods' bridge network in the guest (nothing routes it anywhere)."""
START_SECONDS = 300.0
"""For the Node to get Ready."""
IMPORT_SECONDS = 600.0
"""For `ctr images import` of the driver's image under TCG."""


@dataclass
class GuestKubeletNode(KubeletNode):
    plane: ControlPlane
    spec: GuestSpec = SPEC
    name: str = NODE_NAME
    dir: str = "/var/lib/dra-guest/node"
    """All of the node's state in the guest: containerd's, the kubelet's and the driver's folders (NodeFolders), the
    kubelet's files and log."""
    workdir: Path | None = None
    """The guest's folder on this machine (qemu's console, logs and disk overlay); a new one below /tmp if None."""
    drain_seconds: float = 120.0
    port: int = 0
    """The kubelet's, in the guest and at `name` on this machine; chosen free at start."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each stage of the start took, for the test report."""
    kubelet_pid: int = 0
    _guest: Guest | None = field(default=None, repr=False)
    _node: GuestStandinNode | None = field(default=None, repr=False)
    _images: Path | None = field(default=None, repr=False)

    @property
    def guest(self) -> Guest:
        return present(self._guest, "the guest (not booted)")

    @property
    def node(self) -> GuestStandinNode:
        """containerd in the guest, and its CRI."""
        return present(self._node, "the guest's containerd (not started)")

    @property
    def kubelet_log(self) -> str:
        return f"{self.dir}/kubelet.log"

    def kubelet_log_tail(self, lines: int = 40) -> str:
        return self.guest.run(["tail", f"-{lines}", self.kubelet_log], check=False).stdout

    def kubelet_exited(self) -> str:
        if self._guest is None or not self.kubelet_pid:
            return "the guest's kubelet is not started"
        try:
            rc = self.guest.wait(self.kubelet_pid, 0)
        except GuestError as err:
            return f"the guest is gone: {err}"
        return "" if rc is None else f"the guest's kubelet exited ({rc})"

    def plugin_watcher_ready(self) -> bool:
        return self.guest.run(["test", "-d", f"{self.node.kubelet_dir}/plugins_registry"], check=False).rc == 0

    def describe(self) -> str:
        """The guest kubelet's and containerd's log tails, for failure messages."""
        containerd = self.guest.run(["tail", "-20", f"{self.node.containerd_dir}/containerd.log"], check=False)
        return (
            f"guest kubelet ({self.kubelet_log}):\n{self.kubelet_log_tail(30)}\n"
            f"guest containerd:\n{containerd.stdout}{containerd.stderr}"
        )

    def keep_logs(self) -> Path:
        """The kubelet's, containerd's and the console's logs, copied to a new host folder."""
        keep = Path(tempfile.mkdtemp(prefix="dra-cpu-guest-node-logs-"))
        for path in (self.kubelet_log, f"{self.node.containerd_dir}/containerd.log"):
            found = self.guest.run(["cat", path], check=False)
            (keep / Path(path).name).write_text(found.stdout if found.rc == 0 else found.stderr)
        shutil.copy(self.guest.console, keep / "console.log")
        return keep

    # ------------------------------------------------------------------------------------------------------------
    # What the guest kernel and the driver's files say.

    def allowed(self, container_id: str) -> Allowed:
        """Cpus_allowed_list and Mems_allowed_list of the container's first process, from the guest's /proc."""
        return self.node.allowed(container_id)

    def cpuset(self, container_id: str) -> tuple[CPUSet, CPUSet]:
        """cpuset.cpus and cpuset.mems of the container's cgroup."""
        return CPUSet.parse(self.node.cgroup_file(container_id, "cpuset.cpus")), CPUSet.parse(
            self.node.cgroup_file(container_id, "cpuset.mems")
        )

    def checkpoint_claims(self) -> dict[str, dict[str, Any]]:
        """Claim UID -> record, from the driver's checkpoint in the guest."""
        found = self.guest.run(["cat", f"{self.node.state_dir}/checkpoint.json"], check=False)
        return checkpoint_records(found.stdout) if found.rc == 0 else {}

    def set_online(self, cpu: int, online: bool) -> None:
        self.guest.write(f"/sys/devices/system/cpu/cpu{cpu}/online", "1" if online else "0")

    # ------------------------------------------------------------------------------------------------------------
    # The driver on this node, as the chart installs it (tests/harness/cluster/chart.py).

    def chart_values(self, metrics_port: int) -> dict[str, Any]:
        """The chart's values for this node: its folders and sockets, the API server at `kubernetes`, the metrics at
        the node's address (127.0.0.2, a loopback address of the guest too), where the kubelet probes them."""
        return self.node.folders.chart_values(self.name, self.plane, metrics_port, API_NAME, self.name)

    def import_image(self, archive: Path) -> None:
        """An OCI archive into the guest containerd's k8s.io namespace, through the host folder shared with it."""
        shared = present(self._images, "the guest's image folder (not booted)") / archive.name
        shutil.copyfile(archive, shared)
        try:
            ctr = f"{self.node.bin_dir}/ctr"
            self.guest.run(
                [ctr, "-a", self.node.cri_socket, "-n", "k8s.io", "images", "import", str(shared)],
                timeout=IMPORT_SECONDS,
            )
        finally:
            shared.unlink()

    # ------------------------------------------------------------------------------------------------------------
    # Starting and stopping.

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("the guest's node needs root (qemu's 9p shares of root-owned folders)")
        build = require_built()
        start = time.monotonic()
        self.port = free_port(self.name)
        self._images = Path(tempfile.mkdtemp(prefix="dra-guest-images-"))
        shares = [self.plane.binaries.path("kubelet").parent, self.plane.pki.dir, self._images]
        self._guest = boot(
            build,
            self.spec,
            forwards=[self.plane.port],
            inbound=[(self.name, self.port)],
            shares=shares,
            workdir=self.workdir,
        )
        self._node = GuestStandinNode(self.guest, VERSIONS[0], self.dir)
        self.timings["guest booted"] = time.monotonic() - start
        start = time.monotonic()
        server = f"https://{API_NAME}:{self.plane.port}"
        self.guest.run(f"echo '{GUEST_HOST} {API_NAME}' >>/etc/hosts")
        self._check_api(server)
        self._start_containerd()
        self._start_kubelet(server)
        self.timings["kubelet Ready"] = time.monotonic() - start

    def _check_api(self, server: str) -> None:
        """The API server answers through the forwarded port, over TLS with the plane's CA, at its name."""
        code = (
            "import ssl, sys, urllib.request\n"
            "context = ssl.create_default_context(cafile=sys.argv[2])\n"
            "print(urllib.request.urlopen(sys.argv[1] + '/readyz', timeout=30, context=context).read().decode())\n"
        )
        reached = self.guest.run(["python3", "-c", code, server, str(self.plane.pki.ca)], check=False, timeout=90)
        if reached.rc != 0:
            raise NodeError(f"the guest cannot reach the API server at {server}:\n{reached.stderr[-2000:]}")

    def _start_containerd(self) -> None:
        folders = self.node.folders
        cni = f"{folders.containerd}/cni"
        self.guest.run(["mkdir", "-p", cni])
        network = bridge_network("dra-cni0", POD_SUBNET, folders.root / "cni-ipam")
        self.guest.write(f"{cni}/10-dra-cpu-test.conflist", json.dumps(network))
        self.node.start_containerd()

    def _start_kubelet(self, server: str) -> None:
        directory = PurePosixPath(self.dir)
        self.guest.run(["mkdir", "-p", self.node.kubelet_dir, f"/sys/fs/cgroup{self.node.cgroup_parent}"])
        user = self.plane.pki.node_user(self.name, f"kubelet-{self.name}-{uuid.uuid4().hex[:8]}")
        self.guest.write(f"{directory}/kubelet.kubeconfig", kubeconfig_text(server, self.plane.pki.ca, user))
        config = kubelet_configuration(
            self.plane,
            address="0.0.0.0",
            port=self.port,
            cri_socket=self.node.cri_socket,
            cgroup_root=self.node.cgroup_parent,
            pod_logs_dir=f"{directory}/pod-logs",
            feature_gates=kubelet_gates(self.plane),
        )
        self.guest.write(f"{directory}/kubelet.yaml", json.dumps(config, indent=2))
        argv = kubelet_argv(self.plane.binaries.path("kubelet"), directory, self.node.folders.kubelet, self.name)
        self.kubelet_pid = self.guest.spawn(argv, self.kubelet_log)
        self.wait_ready(START_SECONDS)

    def stop_parts(self) -> None:
        """Stops the kubelet and containerd, and powers the guest off."""
        try:
            if self._node is not None:
                if self.kubelet_pid:
                    with contextlib.suppress(GuestError):
                        self.guest.run(["kill", "-TERM", str(self.kubelet_pid)], check=False)
                        if self.guest.wait(self.kubelet_pid, 20) is None:
                            self.guest.run(["kill", "-KILL", str(self.kubelet_pid)], check=False)
                    self.kubelet_pid = 0
                with contextlib.suppress(Exception):
                    self.node.stop_containerd()
        finally:
            if self._guest is not None:
                self._guest.shutdown()
                self._guest = None
            if self._images is not None:
                shutil.rmtree(self._images, ignore_errors=True)
                self._images = None
