"""The guest kubelet node: the multi-NUMA guest (tests/harness/guest) joined to the control plane as a second node,
`numa-guest`, with a real kubelet: kube-scheduler allocates claims across the guest's NUMA nodes and the kubelet
prepares them with dra-cpu, on a kernel that has them.

    with ControlPlane(state_dir) as plane, GuestKubeletNode(plane, Helm.installed()) as node:
        node.kube.create(pod, namespace)

It boots a guest of its own (`forwards` and `shares`). How the node is put together:
- The guest has a NIC on qemu's user-mode network with restrict=on: it reaches the kube-apiserver's port and nothing
  else, at the name `kubernetes` (GUEST_HOST in its /etc/hosts; a name the server's certificate carries), and
  nothing reaches it. So the API server cannot reach this kubelet: no exec, logs or port-forward through the API;
  tests read the guest itself through its agent (the container's /proc/<pid>/status, the driver's files).
- The kubelet is hack/testenv/kubernetes.sh's, run from a read-only 9p share of its folder, with the real node's
  configuration (cgroupfs driver below containerd's cgroup parent, here on pure cgroup v2; cpuManagerPolicy none;
  the control plane's DRA gates) and credentials (a client certificate of system:node:numa-guest from the plane's
  PKI, which is shared read-only too). It sets the kernel's sysctls itself: the guest is throwaway.
- containerd 2.1 with NRI and CDI, started by GuestStandinNode as for the guest tests. Pods must use the host
  network (`hostNetwork: true`): the guest's kernel has no veth or bridge module loaded and no CNI plugins. A CNI
  configuration naming the loopback plugin is there only so that the runtime reports its network ready, which the
  Node's Ready condition needs; a pod of its own network fails at its sandbox.
- dra-cpu runs in the guest as `python3 -m dra_cpu run --kubeconfig ...` from the shared checkout (GuestStandinNode's
  start_driver), NRI enforcement on, with a token of the chart's ServiceAccount bound to the Node: the API server
  puts the node's name into it as it does for a pod-bound token, so the chart's ValidatingAdmissionPolicy applies
  unchanged. The chart's RBAC, policy and DeviceClasses are applied from `helm template` (release RELEASE, a
  namespace of its own), not by helm install: the driver is not a pod here.

On these 2-core machines the guest boots in 10 to 40 s, and the kubelet takes a minute or more to get Ready under
TCG; START_SECONDS bounds each stage, and a failure carries the guest kubelet's and the driver's log tails.
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
from pathlib import Path
from typing import Any

import yaml

from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.client import object_path
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import CHART, Helm
from tests.harness.cluster.objects import DRIVER, DRIVER_ACCESS_KINDS, ensure, new_namespace
from tests.harness.cluster.pki import kubeconfig_text
from tests.harness.component import Unavailable
from tests.harness.driver_files import checkpoint_records
from tests.harness.guest.vm import GUEST_ADDRESS, GUEST_HOST, Guest, GuestError, boot, kernel_package, require_built
from tests.harness.nodes.guest_standin import VERSIONS, GuestStandinNode
from tests.harness.nodes.kubelet import KubeletNode, NodeError, kubelet_argv, kubelet_configuration, kubelet_gates
from tests.harness.poll import wait_until
from tests.harness.runtimes.cri import Allowed
from tests.harness.typed import present

NODE_NAME = "numa-guest"
RELEASE = "dra-cpu-guest"
"""The chart's objects for this node are rendered as this release: other modules helm-install `dra-cpu`."""
API_NAME = "kubernetes"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
START_SECONDS = 300.0
"""For each of: the Node to get Ready, the driver to get ready."""


@dataclass
class GuestKubeletNode(KubeletNode):
    plane: ControlPlane
    helm: Helm
    name: str = NODE_NAME
    drain_seconds: float = 120.0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each stage of the start took, for the test report."""
    kubelet_pid: int = 0
    driver_namespace: str = ""
    chart_objects: list[dict[str, Any]] = field(default_factory=list)
    _guest: Guest | None = field(default=None, repr=False)
    _node: GuestStandinNode | None = field(default=None, repr=False)

    dir: str = f"/var/lib/dra-guest/{NODE_NAME}"
    """All of the node's state in the guest: containerd's, the driver's and the kubelet's root folder (laid out by
    `node`), and the kubelet's log."""

    @property
    def guest(self) -> Guest:
        return present(self._guest, "the guest (not booted)")

    @property
    def node(self) -> GuestStandinNode:
        """containerd and the driver in the guest."""
        return present(self._node, "the guest's containerd and driver (not started)")

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
        """The guest kubelet's and the driver's log tails, for failure messages."""
        return (
            f"guest kubelet ({self.kubelet_log}):\n{self.kubelet_log_tail(30)}\n"
            f"dra-cpu ({self.node.driver_log}):\n{self.node.log_tail(20)}"
        )

    def keep_logs(self) -> Path:
        """The kubelet's, the driver's, containerd's and the console's logs, copied to a new host folder."""
        keep = Path(tempfile.mkdtemp(prefix="dra-cpu-guest-node-logs-"))
        for path in (self.kubelet_log, self.node.driver_log, f"{self.node.containerd_dir}/containerd.log"):
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
    # Starting and stopping.

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("the guest's node needs root (qemu's 9p shares of root-owned folders)")
        build = require_built()
        deb, why = kernel_package(build)
        if deb is None:
            raise Unavailable(f"the guest's NIC driver cannot be loaded: {why}")
        start = time.monotonic()
        shares = [self.plane.binaries.path("kubelet").parent, self.plane.pki.dir]
        self._guest = boot(build, forwards=[self.plane.port], shares=shares)
        self._node = GuestStandinNode(self.guest, VERSIONS[0], self.dir)
        self.timings["guest booted"] = time.monotonic() - start
        start = time.monotonic()
        server = f"https://{API_NAME}:{self.plane.port}"
        self.guest.run(f"echo '{GUEST_HOST} {API_NAME}' >>/etc/hosts")
        self._check_api(server)
        self._start_containerd()
        self._start_kubelet(server)
        self.timings["kubelet Ready"] = time.monotonic() - start
        start = time.monotonic()
        self._start_driver(server)
        self.timings["dra-cpu ready"] = time.monotonic() - start

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
        cni = f"{self.node.containerd_dir}/cni"
        self.guest.run(["mkdir", "-p", cni])
        # Loaded, never run: hostNetwork pods have no CNI calls (see the module).
        loopback = {"cniVersion": "1.0.0", "name": "dra-guest-lo", "plugins": [{"type": "loopback"}]}
        self.guest.write(f"{cni}/10-loopback.conflist", json.dumps(loopback))
        self.node.start_containerd()

    def _start_kubelet(self, server: str) -> None:
        directory = self.dir
        self.guest.run(["mkdir", "-p", self.node.kubelet_dir, f"/sys/fs/cgroup{self.node.cgroup_parent}"])
        user = self.plane.pki.node_user(self.name, f"kubelet-{self.name}-{uuid.uuid4().hex[:8]}")
        self.guest.write(f"{directory}/kubelet.kubeconfig", kubeconfig_text(server, self.plane.pki.ca, user))
        config = kubelet_configuration(
            self.plane,
            port=10250,
            cri_socket=self.node.cri_socket,
            cgroup_root=self.node.cgroup_parent,
            pod_logs_dir=f"{directory}/pod-logs",
            feature_gates=kubelet_gates(self.plane),
        )
        self.guest.write(f"{directory}/kubelet.yaml", json.dumps(config, indent=2))
        argv = [
            *kubelet_argv(self.plane.binaries.path("kubelet"), Path(directory), Path(self.node.kubelet_dir), self.name),
            # Else the kubelet looks the node's name up, which nothing in the guest resolves.
            f"--node-ip={GUEST_ADDRESS}",
        ]
        self.kubelet_pid = self.guest.spawn(argv, self.kubelet_log)
        self.wait_ready(START_SECONDS)

    def _start_driver(self, server: str) -> None:
        kube = self.kube
        self.driver_namespace = new_namespace(kube, "dra-guest")
        rendered = self.helm.run("template", RELEASE, str(CHART), "--namespace", self.driver_namespace)
        if rendered.returncode != 0:
            raise NodeError(f"helm template failed:\n{rendered.stderr}")
        docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        self.chart_objects = [d for d in docs if d["kind"] in DRIVER_ACCESS_KINDS]
        # DeviceClasses are shared by every node of the cluster: kept when another test put them there.
        ensure(kube, [*self.chart_objects, *(d for d in docs if d["kind"] == "DeviceClass")], self.driver_namespace)
        [account] = [d["metadata"]["name"] for d in self.chart_objects if d["kind"] == "ServiceAccount"]
        node_uid = kube.get(f"/api/v1/nodes/{self.name}")["metadata"]["uid"]
        token_request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node_uid},
            },
        }
        path = f"/api/v1/namespaces/{self.driver_namespace}/serviceaccounts/{account}/token"
        token = kube.request("POST", path, token_request)["status"]["token"]
        kubeconfig = f"{self.dir}/driver.kubeconfig"
        self.guest.write(kubeconfig, kubeconfig_text(server, self.plane.pki.ca, {"token": token}))
        # Against an API server the daemon imports the Kubernetes client first: slower to start under TCG.
        self.node.start_driver(kubeconfig=kubeconfig, node_name=self.name, register_seconds=int(START_SECONDS))

        wait_until(
            lambda: self.node.call("http_get", url=f"http://127.0.0.1:{self.node.metrics_port}/readyz"),
            "dra-cpu in the guest to be ready (NRI, registered)",
            START_SECONDS,
            2,
            retry_on=(GuestError,),
            details=self.describe,
            error=NodeError,
        )
        # Ready comes before the first write of the slices, and stays so while writes fail.
        wait_until(
            lambda: kube.list(SLICES, field_selector=f"spec.nodeName={self.name},spec.driver={DRIVER}"),
            f"ResourceSlices of {self.name}",
            START_SECONDS,
            1,
            details=self.describe,
            error=NodeError,
        )

    def stop_parts(self) -> None:
        """Stops the driver, the kubelet and containerd, deletes the chart's objects, and powers the guest off."""
        try:
            if self._node is not None:
                with contextlib.suppress(Exception):
                    self.node.stop_driver()
                if self.kubelet_pid:
                    with contextlib.suppress(GuestError):
                        self.guest.run(["kill", "-TERM", str(self.kubelet_pid)], check=False)
                        if self.guest.wait(self.kubelet_pid, 20) is None:
                            self.guest.run(["kill", "-KILL", str(self.kubelet_pid)], check=False)
                    self.kubelet_pid = 0
                with contextlib.suppress(Exception):
                    self.node.stop_containerd()
            for obj in self.chart_objects:
                if obj["kind"] != "ServiceAccount":  # goes with its namespace
                    with contextlib.suppress(Exception):
                        self.kube.delete(object_path(obj, self.driver_namespace))
            if self.driver_namespace:
                with contextlib.suppress(Exception):
                    self.kube.delete(f"/api/v1/namespaces/{self.driver_namespace}")
        finally:
            if self._guest is not None:
                self._guest.shutdown()
                self._guest = None
